"""The torchvision decoding paths give what Pillow gives, or step aside for it."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from kubeseg.data.codecs import decode_jpeg_rgb, decode_png_ids
from kubeseg.data.manifest import decode_mask
from kubeseg.data.transforms import EncodedImage, EvalTransform, TrainTransform
from kubeseg.errors import DataError


def _encoded(array: np.ndarray, mode, fmt: str, **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, format=fmt, **save)
    return buf.getvalue()


def _photo(seed: int = 0, size=(61, 83)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:size[0], 0:size[1]]
    smooth = np.stack([xs * 3, ys * 4, (xs + ys) * 2], axis=-1) % 256
    return (smooth + rng.integers(0, 40, smooth.shape)).clip(0, 255).astype(np.uint8)


@pytest.mark.parametrize("subsampling", [0, 1, 2])
def test_jpeg_pixels_equal_pillows(subsampling):
    data = _encoded(_photo(), "RGB", "JPEG", quality=90, subsampling=subsampling)
    ours = decode_jpeg_rgb(data)
    assert ours is not None and ours.dtype == torch.uint8 and ours.shape == (3, 61, 83)
    expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    np.testing.assert_array_equal(ours.permute(1, 2, 0).numpy(), expected)


def test_greyscale_jpeg_becomes_rgb_as_in_pillow():
    data = _encoded(_photo()[..., 0], "L", "JPEG", quality=90)
    expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    np.testing.assert_array_equal(decode_jpeg_rgb(data).permute(1, 2, 0).numpy(), expected)


@pytest.mark.parametrize("mode", ["L", "P"])
def test_mask_pngs_read_as_pillow_reads_them(mode):
    ids = np.random.default_rng(1).integers(0, 30, (37, 53)).astype(np.uint8)
    image = Image.fromarray(ids, "L")
    if mode == "P":
        image = Image.fromarray(ids, "P")
        image.putpalette([v for c in range(256) for v in (c, 255 - c, c // 2)])
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    data = buf.getvalue()
    np.testing.assert_array_equal(decode_png_ids(data), ids)
    np.testing.assert_array_equal(decode_mask(data), np.asarray(Image.open(io.BytesIO(data))))


def test_files_it_does_not_take_are_left_to_pillow():
    ids = np.arange(12, dtype=np.uint8).reshape(3, 4)
    rgb = _encoded(np.stack([ids] * 3, axis=-1), "RGB", "PNG")
    sixteen = _encoded(ids.astype(np.uint16) * 1000, None, "PNG")
    jpeg = _encoded(_photo(), "RGB", "JPEG")
    assert decode_png_ids(rgb) is None and decode_png_ids(sixteen) is None
    assert decode_png_ids(jpeg) is None and decode_jpeg_rgb(rgb) is None
    grey = _encoded(_photo()[..., 0], "L", "PNG")
    truncated = grey[:len(grey) // 2]
    assert decode_png_ids(truncated) is None and decode_jpeg_rgb(jpeg[:300]) is None
    # Pillow then reports the truncated annotation, naming it.
    with pytest.raises(DataError, match="ann.png: cannot decode the annotation"):
        decode_mask(truncated, source="ann.png")


def test_transforms_give_the_same_tensors_from_bytes_and_from_a_pil_image():
    data = _encoded(_photo(3, (90, 120)), "RGB", "JPEG", quality=92)
    mask = np.random.default_rng(4).integers(0, 5, (90, 120)).astype(np.uint8)
    # base_size 40 reaches Pillow's reduced-size decoding for part of the draws.
    for transform in (TrainTransform(150, 48), TrainTransform(40, 24), EvalTransform(),
                      EvalTransform(crop_size=32)):
        for seed in range(8):
            a = transform(EncodedImage(data), mask, seed)
            b = transform(Image.open(io.BytesIO(data)), mask, seed)
            assert all(torch.equal(u, v) for u, v in zip(a, b)), (transform, seed)
