import io
from typing import List, Tuple

import numpy as np
import pytest
import torch
from PIL import Image

from kubeseg.data.transforms import (IMAGENET_MEAN, IMAGENET_STD, EvalTransform,
                                     TrainTransform, normalise_batch, to_tensor)


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


# --------------------------------------------------------------------------------------------
# The augmentation's statistics: scale, crop position and flip recovered from the output pixels
# of a coordinate-ramp image (red = x, green = y), checked against SPEC 2's distributions.
def _ramp_image(fmt: str) -> Tuple[Image.Image, np.ndarray]:
    ys, xs = np.mgrid[0:192, 0:256]
    pixels = np.stack([xs, ys, np.full_like(xs, 128)], axis=-1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format=fmt, quality=98, subsampling=0)
    return buf.getvalue(), np.zeros((192, 256), dtype=np.uint8)


def _axis_params(ramp: np.ndarray, flipped: bool) -> Tuple[float, float]:
    """(scale, offset in target pixels) from one channel's source coordinates along an axis,
    fitted on the inner columns (the borders are clamped by the resampling)."""
    n = len(ramp)
    inner = np.arange(n // 6, n - n // 6)
    slope, intercept = np.polyfit(inner, ramp[inner], 1)
    scale = 1.0 / abs(slope)
    first_target = intercept if not flipped else intercept + slope * (n - 1)
    return scale, (first_target + 0.5) * scale - 0.5


def _draws(transform: "TrainTransform", fmt: str, n: int):
    """(long side / base_size, x offset / room, y offset / room, flipped) per draw."""
    data, mask = _ramp_image(fmt)
    rng = np.random.default_rng(2024)
    out = []
    for _ in range(n):
        x, _ = transform(Image.open(io.BytesIO(data)), mask, rng)
        red, green = x[0].float().mean(0).numpy(), x[1].float().mean(1).numpy()
        flipped = red[-1] < red[0]
        sx, x0 = _axis_params(red, flipped)
        sy, y0 = _axis_params(green, False)
        tw, th = round(256 * sx), round(192 * sy)
        room_x, room_y = tw - transform.crop_size, th - transform.crop_size
        out.append((256 * sx / transform.base_size, x0 / room_x, y0 / room_y, flipped))
    return np.array(out, dtype=np.float64)


def _ks_uniform(values: np.ndarray, low: float, high: float) -> float:
    """Kolmogorov-Smirnov distance between the sample and U(low, high)."""
    v = np.sort((values - low) / (high - low))
    n = len(v)
    cdf = np.clip(v, 0, 1)
    return float(max((np.arange(1, n + 1) / n - cdf).max(), (cdf - np.arange(n) / n).max()))


def _check_declared(draws: np.ndarray, scale_range=(0.5, 2.0)) -> List[str]:
    n = len(draws)
    limit = 1.95 / np.sqrt(n)  # KS critical distance at p = 0.001
    problems = []
    for name, column, (low, high) in (("scale", 0, scale_range), ("x offset", 1, (0, 1)),
                                      ("y offset", 2, (0, 1))):
        d = _ks_uniform(draws[:, column], low, high)
        if d > limit:
            problems.append(f"{name}: KS distance {d:.3f} > {limit:.3f}")
    flips = int(draws[:, 3].sum())
    if abs(flips - n / 2) > 3.3 * np.sqrt(n) / 2:  # binomial(n, 0.5), p ~ 0.001
        problems.append(f"flip: {flips} of {n}")
    return problems


@pytest.mark.parametrize("fmt,base_size", [("PNG", 256), ("JPEG", 160)])
def test_train_transform_draws_follow_the_declared_distribution(fmt, base_size):
    # JPEG at base_size 160: a third of the draws decode at reduced size (draft).
    transform = TrainTransform(base_size, 48, normalise=False)
    draws = _draws(transform, fmt, 300)
    assert _check_declared(draws) == []
    # The check has teeth: a narrower scale range, or no flips, is caught.
    narrow = _draws(TrainTransform(base_size, 48, scale_range=(0.5, 1.5), normalise=False),
                    fmt, 300)
    assert any(p.startswith("scale") for p in _check_declared(narrow))
    unflipped = _draws(TrainTransform(base_size, 48, flip=False, normalise=False), fmt, 300)
    assert any(p.startswith("flip") for p in _check_declared(unflipped))


def test_recovered_parameters_match_the_drawn_ones():
    # The estimator itself: replay the generator to get the drawn long side and offsets. The
    # realised window is within half a source pixel of the drawn one at each edge (s target
    # pixels at scale s), so its offset may move by s / 2 and its scale by one source pixel
    # in the 48 / s the window spans, on top of the estimator's own error.
    transform = TrainTransform(256, 48, normalise=False)
    draws = _draws(transform, "PNG", 40)
    rng = np.random.default_rng(2024)
    for row in draws:
        long_side = 256 * rng.uniform(0.5, 2.0)
        tw, th = round(256 * long_side / 256), round(192 * long_side / 256)
        x0, y0 = rng.integers(0, tw - 48 + 1), rng.integers(0, th - 48 + 1)
        flip = rng.random() < 0.5
        s = long_side / 256
        assert row[0] == pytest.approx(s, rel=0.02 + s / 48)
        assert row[1] * (tw - 48) == pytest.approx(x0, abs=1.0 + s / 2)
        assert row[2] * (th - 48) == pytest.approx(y0, abs=1.0 + s / 2)
        assert bool(row[3]) == flip


# --------------------------------------------------------------------------------------------
# Alignment: a picture of flat colour blocks whose mask is derived from the colours.
def _blocks(fmt: str = "PNG"):
    ys, xs = np.mgrid[0:144, 0:192]
    cls = (ys // 24) * 8 + xs // 24  # 6 x 8 blocks of 24 px, classes 0..47
    palette = np.stack([(np.arange(48) % 8) * 32 + 16, (np.arange(48) // 8) * 40 + 20,
                        np.full(48, 200)], axis=-1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(palette[cls], "RGB").save(buf, format=fmt, quality=98, subsampling=0)
    return buf.getvalue(), cls.astype(np.uint8)


def _class_of_colour(pixels: np.ndarray) -> np.ndarray:
    """uint8 [3,H,W] -> the class whose block colour is nearest."""
    col = np.clip(np.round((pixels[0].astype(np.float64) - 16) / 32), 0, 7)
    row = np.clip(np.round((pixels[1].astype(np.float64) - 20) / 40), 0, 5)
    return (row * 8 + col).astype(np.int64)


@pytest.mark.parametrize("base_size,fmt", [(192, "PNG"), (60, "PNG"), (100, "JPEG")])
def test_mask_follows_the_pixels_through_scale_crop_pad_and_flip(base_size, fmt):
    data, mask = _blocks(fmt)
    transform = TrainTransform(base_size, 64, normalise=False)
    rng = np.random.default_rng(7)
    flips = 0
    for _ in range(40):
        x, y = transform(Image.open(io.BytesIO(data)), mask, rng)
        assert x.dtype == torch.uint8 and y.dtype == torch.uint8
        labels, seen = y.numpy().astype(np.int64), _class_of_colour(x.numpy())
        valid = labels != 255
        # Away from block edges (where bilinear blends colours) the colour names the label.
        flat = np.ones_like(valid)
        for dy, dx in ((0, 1), (1, 0), (0, -1), (-1, 0)):
            flat &= np.roll(labels, (dy, dx), axis=(0, 1)) == labels
        flat[[0, -1], :] = flat[:, [0, -1]] = False
        assert (seen[valid & flat] == labels[valid & flat]).mean() > 0.99
        assert (x.numpy()[:, ~valid] == 0).all()  # padding is black where labels are ignored
        flips += bool(valid.any() and _row_decreasing(x.numpy()[0], valid))
    assert 5 < flips < 35


def _row_decreasing(red: np.ndarray, valid: np.ndarray) -> bool:
    cols = np.nonzero(valid.any(axis=0))[0]
    row = int(np.nonzero(valid.any(axis=1))[0][0])
    return red[row, cols[-1]] < red[row, cols[0]]


def test_uint8_output_normalised_on_the_batch_equals_the_float_output():
    data, mask = _blocks("JPEG")
    for seed in range(5):
        xf, yf = TrainTransform(100, 64)(Image.open(io.BytesIO(data)), mask, seed)
        xu, yu = TrainTransform(100, 64, normalise=False)(Image.open(io.BytesIO(data)), mask,
                                                          seed)
        assert torch.equal(normalise_batch(xu[None])[0], xf)
        assert torch.equal(yu.long(), yf)
    xe, ye = EvalTransform(crop_size=40)(Image.open(io.BytesIO(data)), mask)
    xu, yu = EvalTransform(crop_size=40, normalise=False)(Image.open(io.BytesIO(data)), mask)
    assert torch.equal(normalise_batch(xu[None])[0], xe) and torch.equal(yu.long(), ye)


def test_normalise_batch_rejects_float_input():
    from kubeseg.errors import DataError

    with pytest.raises(DataError, match="expected uint8 images"):
        normalise_batch(torch.zeros(2, 3, 8, 8))
