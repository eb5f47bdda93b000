"""Fast paths for decoding training data: torchvision's libjpeg-turbo and libpng bindings.

On CamVid's 480x360 files they decode a JPEG straight into a uint8 [3,H,W] tensor about 10%
faster than Pillow, which also needs a copy out of its own pixel layout, and an 8-bit
annotation PNG about a third faster. Each function returns None for a file it does not take
or cannot decode; the caller then uses Pillow, which decodes the file or says why it cannot.

torchvision marks these decoders deprecated from 0.29 on, in favour of TorchCodec. kubeseg
pins torchvision below 0.30, and a missing decoder only means the Pillow path: a later
torchvision can cost speed, never correctness.
"""
from __future__ import annotations

import warnings
from typing import Optional

import numpy as np
import torch

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def readonly_tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor over a read-only array's memory (Pillow's pixels, file bytes); never write
    to it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def _quietly(decode, data: bytes, mode_name: str) -> Optional[torch.Tensor]:
    try:
        from torchvision import io as tvio
    except ImportError:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return getattr(tvio, decode)(readonly_tensor(np.frombuffer(data, dtype=np.uint8)),
                                         mode=getattr(tvio.ImageReadMode, mode_name))
        except (AttributeError, RuntimeError):  # gone from torchvision, or a file it refuses
            return None


def decode_jpeg_rgb(data: bytes) -> Optional[torch.Tensor]:
    """uint8 [3,H,W] RGB pixels of JPEG ``data`` (greyscale converted to RGB), or None."""
    pixels = _quietly("decode_jpeg", data, "RGB")
    return pixels if pixels is not None and pixels.ndim == 3 and pixels.shape[0] == 3 else None


def decode_png_ids(data: bytes) -> Optional[np.ndarray]:
    """uint8 [H,W] of an 8-bit greyscale or palette PNG: its values, or its palette indices,
    exactly as Pillow reads them (modes L and P); None for any other file."""
    # IHDR comes first: bit depth at byte 24, colour type at byte 25 (0 grey, 3 palette).
    if len(data) < 26 or data[:8] != PNG_SIGNATURE or data[12:16] != b"IHDR" \
            or data[24] != 8 or data[25] not in (0, 3):
        return None
    ids = _quietly("decode_png", data, "UNCHANGED")
    return ids[0].numpy() if ids is not None and ids.ndim == 3 and ids.shape[0] == 1 else None
