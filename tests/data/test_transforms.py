import io

import numpy as np
import pytest
import torch
from PIL import Image

from kubeseg.data.transforms import (IMAGENET_MEAN, IMAGENET_STD, EvalTransform,
                                     TrainTransform, to_tensor)

def _coordinate_sample(width=96, height=64, fmt="PNG"):
    """Image whose red/green channels are x/y ramps, and a mask that is a function of the
    pixel coordinates: class = 8 * (y // cell) + x // cell, with cell = width / 8."""
    cell = width // 8
    ys, xs = np.mgrid[0:height, 0:width]
    pixels = np.stack([xs * 255 // (width - 1), ys * 255 // (height - 1),
                       np.full_like(xs, 128)], axis=-1).astype(np.uint8)
    mask = (8 * (ys // cell) + xs // cell).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format=fmt, quality=95)
    buf.seek(0)
    return buf, mask, (width, height)


def _denormalise(x: torch.Tensor) -> np.ndarray:
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((x * std + mean) * 255).numpy()


def _assert_aligned(x: torch.Tensor, y: torch.Tensor, size, tolerance_px: float):
    """Every labelled output pixel shows image coordinates inside the mask's cell."""
    width, height = size
    pixels = _denormalise(x)
    src_x = pixels[0] * (width - 1) / 255  # source coordinates the image pixel came from
    src_y = pixels[1] * (height - 1) / 255
    labels = y.numpy()
    valid = labels != 255
    assert valid.sum() > 50
    cell = width // 8
    lo_x, lo_y = (labels % 8) * cell, (labels // 8) * cell
    assert np.all(src_x[valid] >= lo_x[valid] - tolerance_px)
    assert np.all(src_x[valid] <= lo_x[valid] + cell - 1 + tolerance_px)
    assert np.all(src_y[valid] >= lo_y[valid] - tolerance_px)
    assert np.all(src_y[valid] <= lo_y[valid] + cell - 1 + tolerance_px)


@pytest.mark.parametrize("base_size,crop", [(96, 48), (40, 32), (300, 64)])
def test_train_transform_keeps_image_and_mask_aligned(base_size, crop):
    flips = set()
    for seed in range(12):
        buf, mask, size = _coordinate_sample()
        x, y = TrainTransform(base_size, crop)(Image.open(buf), mask, np.random.default_rng(seed))
        assert x.shape == (3, crop, crop) and y.shape == (crop, crop)
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        # A downscaled long side of 96 * 0.5 .. 2 px: pixels blend across ~2 source pixels.
        scale = max(1.0, 96 / (base_size * 0.5))
        _assert_aligned(x, y, size, tolerance_px=1.5 * scale)
        labels = y.numpy()
        valid_cols = np.nonzero((labels != 255).any(axis=0))[0]
        if len(valid_cols) > 1:
            cx = labels[:, valid_cols] % 8
            flips.add(bool(cx[:, 0].max() > cx[:, -1].min()))
    assert flips == {True, False}  # both flipped and unflipped crops occurred


def test_train_transform_aligned_on_reduced_jpeg_decode():
    # 256x192 JPEG scaled to a long side of 40..160: the decoder works at 1/2..1/4 size.
    for seed in range(6):
        buf, mask, size = _coordinate_sample(256, 192, fmt="JPEG")
        x, y = TrainTransform(80, 32)(Image.open(buf), mask, seed)
        _assert_aligned(x, y, size, tolerance_px=10)


def test_train_transform_pads_with_ignore_and_is_deterministic():
    buf, mask, _ = _coordinate_sample(40, 24)
    image = Image.open(buf).convert("RGB")
    x1, y1 = TrainTransform(20, 64)(image, mask, 7)  # long side 10..40 px < crop 64
    x2, y2 = TrainTransform(20, 64)(image, mask, 7)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert (y1 == 255).float().mean() > 0.5
    assert y1.shape == (64, 64)
    assert TrainTransform(100, 30).crop_size == 32  # rounded up to a multiple of 8


def test_eval_transform_whole_image_and_centre_crop():
    buf, mask, size = _coordinate_sample(96, 64)
    image = Image.open(buf).convert("RGB")
    x, y = EvalTransform()(image, mask)
    assert x.shape == (3, 64, 96)
    np.testing.assert_array_equal(y.numpy(), mask)
    torch.testing.assert_close(x, to_tensor(image))
    x, y = EvalTransform(crop_size=40)(image, mask)
    assert x.shape == (3, 40, 40) and y.shape == (40, 40)
    _assert_aligned(x, y, size, tolerance_px=2)


def test_mismatched_mask_is_reported():
    from kubeseg.errors import DataError

    buf, mask, _ = _coordinate_sample(96, 64)
    with pytest.raises(DataError, match="96x64 but its annotation is 95x64"):
        TrainTransform(96, 32)(Image.open(buf), mask[:, :95], 0)
