"""Training and evaluation transforms (SPEC section 2), image and mask together.

Training: the long side is rescaled to ``base_size x U(0.5, 2.0)``, the result is padded with
ignore (255) up to ``crop_size`` (rounded up to a multiple of the output stride), a random
square crop is taken, flipped horizontally with probability 0.5, and normalised. Evaluation:
the whole image, or a centre crop after rescaling the short side to ``crop_size`` (for batched
scoring).

Only the pixels that survive the crop are resampled: the crop window is mapped back to the
nearest whole source pixels, and only those are resized, as a uint8 tensor with torch's
vectorised bilinear kernel (antialiased when shrinking). The realised window is within half a
source pixel of the drawn one at each edge. The mask follows the same mapping with
nearest-neighbour sampling (only the window's source indices), so image and mask stay aligned;
the flip is applied to the crop only.

Images come as a PIL image or, from the datasets, as an :class:`EncodedImage` (the file's bytes
and its header): a JPEG is then decoded by torchvision straight into a [3,H,W] tensor, or by
Pillow at a reduced size (``draft``) when the target is at most half the image's size.

Output: normalised float32 images and int64 masks, or, with ``normalise=False``, uint8 images
and masks (a quarter and an eighth of the bytes through DataLoader workers' shared memory) for
:func:`normalise_batch` and ``masks.long()`` where the batch is used.
"""
from __future__ import annotations

import io
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image

from kubeseg.config import IGNORE_INDEX, round_crop_size, value_problem
from kubeseg.data.codecs import decode_jpeg_rgb, readonly_tensor
from kubeseg.errors import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

RngLike = Union[None, int, np.random.Generator]


def _generator(rng: RngLike) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None:
        # Seeded per DataLoader worker from torch's seed (see the training loop's worker init).
        return np.random.default_rng(np.random.randint(0, 2**31 - 1))
    return np.random.default_rng(rng)


def _normaliser(mean: Sequence[float], std: Sequence[float]) -> Tuple[torch.Tensor, torch.Tensor]:
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise DataError(f"mean={tuple(mean)} / std={tuple(std)}: expected three values each, "
                        "std > 0")
    m = torch.tensor([255.0 * v for v in mean], dtype=torch.float32).view(3, 1, 1)
    inv = torch.tensor([1.0 / (255.0 * v) for v in std], dtype=torch.float32).view(3, 1, 1)
    return m, inv


def _chw(pixels: np.ndarray) -> torch.Tensor:
    """uint8 [H,W,3] -> a new contiguous uint8 tensor [3,H,W] (NumPy's transposing copy of
    bytes is several times faster than torch's)."""
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))


def _to_normalised_tensor(pixels: np.ndarray, mean255: torch.Tensor,
                          inv_std255: torch.Tensor) -> torch.Tensor:
    """uint8 [H,W,3] -> float32 [3,H,W], (x/255 - mean) / std."""
    return _chw(pixels).to(torch.float32).sub_(mean255).mul_(inv_std255)


def normalise_batch(images: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN,
                    std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """uint8 [N,3,H,W] (from transforms with ``normalise=False``) -> float32, (x/255 - mean) /
    std, on the batch's device. Normalising the batch where it is used (e.g. on the GPU) keeps
    DataLoader workers from shipping 4x the bytes as float32."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise DataError(f"normalise_batch: expected uint8 images [N,3,H,W], got "
                        f"{images.dtype} {list(images.shape)}")
    m, inv = _normaliser(mean, std)
    return images.to(torch.float32).sub_(m.to(images.device)).mul_(inv.to(images.device))


class _Output:
    """The transforms' last step: float32 [3,H,W] normalised image and int64 [H,W] mask, or
    (``normalise=False``) uint8 image and uint8 mask, for :func:`normalise_batch` and
    ``masks.long()`` on the batch."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], normalise: bool):
        self.mean255, self.inv_std255 = _normaliser(mean, std)
        self.normalise = bool(normalise)

    def __call__(self, pixels: torch.Tensor,
                 mask: np.ndarray) -> Tuple[torch.Tensor, torch.Tensor]:
        """``pixels``: uint8 [3,H,W]; ``mask``: uint8 [H,W]."""
        if not self.normalise:
            return pixels, torch.from_numpy(np.array(mask, dtype=np.uint8, order="C"))
        return (pixels.to(torch.float32).sub_(self.mean255).mul_(self.inv_std255),
                torch.from_numpy(mask.astype(np.int64)))


def _rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


def to_tensor(image: Image.Image, mean: Sequence[float] = IMAGENET_MEAN,
              std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """A PIL image -> normalised float32 tensor [3,H,W] (for inference)."""
    m, inv = _normaliser(mean, std)
    return _to_normalised_tensor(np.asarray(_rgb(image)), m, inv)


def _check(image: ImageSource, mask: np.ndarray) -> Tuple[int, int]:
    w, h = image.size
    if mask.ndim != 2 or mask.shape != (h, w):
        raise DataError(f"image is {w}x{h} but its annotation is "
                        f"{'x'.join(str(s) for s in mask.shape[::-1])}; they must have the same "
                        "size and the annotation must be single-channel")
    return w, h


class EncodedImage:
    """An encoded image file: its bytes and Pillow's reading of its header (nothing decoded).

    ``EncodedImage(data)`` raises what ``PIL.Image.open`` raises for data that is no image.
    """

    __slots__ = ("data", "header", "size")

    def __init__(self, data: bytes):
        self.data = data
        self.header = Image.open(io.BytesIO(data))
        self.size: Tuple[int, int] = self.header.size  # (width, height) as stored


ImageSource = Union[Image.Image, EncodedImage]


def _decode(image: ImageSource, target: Tuple[int, int]) -> Tuple[torch.Tensor, float, float]:
    """``image`` decoded for a resize to ``target`` (tw, th): uint8 [3,H',W'] (possibly a view)
    and the factors (kx, ky) from the image's size to the decoded one (below 1 where a JPEG
    was decoded at a reduced size)."""
    header = image.header if isinstance(image, EncodedImage) else image
    w, h = header.size
    tw, th = target
    if header.format == "JPEG" and (tw * 2 <= w or th * 2 <= h):
        # Decode at 1/2, 1/4 or 1/8 of the size; PIL keeps the result >= the requested size.
        header.draft("RGB", (max(1, tw), max(1, th)))
    elif isinstance(image, EncodedImage) and header.format == "JPEG":
        pixels = decode_jpeg_rgb(image.data)
        if pixels is not None and tuple(pixels.shape[1:]) == (h, w):
            return pixels, 1.0, 1.0
    dw, dh = header.size
    pixels = readonly_tensor(np.asarray(_rgb(header))).permute(2, 0, 1)
    return pixels, dw / w, dh / h


def _window_bounds(start: float, stop: float, size: int) -> Tuple[int, int]:
    """The whole pixels [a, b) nearest to the span [start, stop): at least one, inside [0, size)."""
    a = min(max(int(round(start)), 0), size - 1)
    return a, min(max(int(round(stop)), a + 1), size)


def _resample_window(image: ImageSource, mask: np.ndarray, target: Tuple[int, int],
                     window: Tuple[int, int, int, int],
                     flip: bool = False) -> Tuple[torch.Tensor, np.ndarray]:
    """Resize ``image``/``mask`` (size w x h) to ``target`` (tw, th) and return only the pixels of
    ``window`` = (x0, y0, cw, ch) in target coordinates, mirrored left-right with ``flip``:
    uint8 [3,ch,cw] and uint8 [ch,cw]."""
    h, w = mask.shape
    tw, th = target
    x0, y0, cw, ch = window
    sx, sy = tw / w, th / h
    source, kx, ky = _decode(image, target)
    dh, dw = source.shape[1:]
    ax0, ax1 = _window_bounds(x0 / sx * kx, (x0 + cw) / sx * kx, dw)
    ay0, ay1 = _window_bounds(y0 / sy * ky, (y0 + ch) / sy * ky, dh)
    region = source[:, ay0:ay1, ax0:ax1]
    if (ax1 - ax0, ay1 - ay0) == (cw, ch):
        pixels = region
    else:
        pixels = torch.nn.functional.interpolate(region[None], size=(ch, cw), mode="bilinear",
                                                 antialias=True, align_corners=False)[0]
    if flip:
        pixels = pixels.flip(-1)
    # The mask's nearest neighbours: the source pixel under each window pixel's centre.
    xs = np.minimum(((ax0 + (np.arange(cw) + 0.5) * ((ax1 - ax0) / cw)) / kx).astype(np.intp),
                    w - 1)
    ys = np.minimum(((ay0 + (np.arange(ch) + 0.5) * ((ay1 - ay0) / ch)) / ky).astype(np.intp),
                    h - 1)
    patch = mask.take(ys, axis=0).take(xs[::-1] if flip else xs, axis=1)
    return pixels.contiguous(), patch


class TrainTransform:
    """Random scale, pad with ignore, random square crop, horizontal flip, normalise.

    ``transform(image, mask, rng=None) -> (FloatTensor [3,C,C], LongTensor [C,C])``, or with
    ``normalise=False`` uint8 image and mask (see :func:`normalise_batch`); ``rng``: a numpy
    Generator or seed (None draws one from NumPy's global state).
    """

    def __init__(self, base_size: int, crop_size: int, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, scale_range: Tuple[float, float] = (0.5, 2.0),
                 flip: bool = True, *, normalise: bool = True):
        problems = [value_problem("base_size", base_size), value_problem("crop_size", crop_size)]
        if any(problems):
            raise DataError("; ".join(p for p in problems if p))
        self.base_size = int(base_size)
        self.crop_size = round_crop_size(crop_size)
        self.mean, self.std = tuple(mean), tuple(std)
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.flip = flip
        self._output = _Output(self.mean, self.std, normalise)

    def __repr__(self) -> str:
        return (f"TrainTransform(base_size={self.base_size}, crop_size={self.crop_size}, "
                f"scale_range={self.scale_range}, flip={self.flip}, "
                f"normalise={self._output.normalise})")

    def __call__(self, image: ImageSource, mask: np.ndarray, rng: RngLike = None):
        rng = _generator(rng)
        w, h = _check(image, mask)
        long_side = self.base_size * rng.uniform(*self.scale_range)
        scale = long_side / max(w, h)
        tw, th = max(1, int(round(w * scale))), max(1, int(round(h * scale)))
        c = self.crop_size
        cw, ch = min(c, tw), min(c, th)
        x0 = int(rng.integers(0, tw - cw + 1))
        y0 = int(rng.integers(0, th - ch + 1))
        flip = self.flip and rng.random() < 0.5
        pixels, patch = _resample_window(image, mask, (tw, th), (x0, y0, cw, ch), flip)
        if (cw, ch) != (c, c):
            # Pad bottom/right (bottom/left once flipped): black image, ignored labels.
            left = c - cw if flip else 0
            canvas = torch.zeros((3, c, c), dtype=torch.uint8)
            canvas[:, :ch, left:left + cw] = pixels
            labels = np.full((c, c), IGNORE_INDEX, dtype=np.uint8)
            labels[:ch, left:left + cw] = patch
            pixels, patch = canvas, labels
        return self._output(pixels, patch)


class EvalTransform:
    """Whole images (``crop_size=None``), or the short side rescaled to ``crop_size`` (rounded
    up to a multiple of the output stride) and a centre crop of that size, so images can be
    batched.

    ``transform(image, mask, rng=None) -> (FloatTensor [3,H,W], LongTensor [H,W])``, or with
    ``normalise=False`` uint8 image and mask (see :func:`normalise_batch`).
    """

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 crop_size: Optional[int] = None, *, normalise: bool = True):
        problem = None if crop_size is None else value_problem("crop_size", crop_size)
        if problem:
            raise DataError(f"{problem} (or None for whole images)")
        self.mean, self.std = tuple(mean), tuple(std)
        self.crop_size = None if crop_size is None else round_crop_size(crop_size)
        self._output = _Output(self.mean, self.std, normalise)

    def __repr__(self) -> str:
        return f"EvalTransform(crop_size={self.crop_size}, normalise={self._output.normalise})"

    def __call__(self, image: ImageSource, mask: np.ndarray, rng: RngLike = None):
        w, h = _check(image, mask)
        if self.crop_size is None:
            pixels, patch = _decode(image, (w, h))[0].contiguous(), mask
        else:
            c = self.crop_size
            scale = c / min(w, h)
            tw, th = max(c, int(round(w * scale))), max(c, int(round(h * scale)))
            x0, y0 = (tw - c) // 2, (th - c) // 2
            pixels, patch = _resample_window(image, mask, (tw, th), (x0, y0, c, c))
        return self._output(pixels, patch)
