"""Helpers shared by the serving tests: images, limits, expected answers, free ports."""
from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image
from s3server import free_port  # noqa: F401 (re-exported for the serving tests)

MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.2)
CLASS_NAMES = ["background", "disc", "square"]
# server limits the tests rely on
MAX_PIXELS = 64 * 64            # larger images are scored downscaled
TILE_SIZE = 48                  # larger sides are scored with a sliding window
MAX_IMAGE_PIXELS = 1000 * 1000  # larger images are refused (413)
MAX_REQUEST_BYTES = 1_000_000


def encode(image: Image.Image, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    # smooth blobs rather than noise, so JPEG round trips stay close
    small = rng.integers(0, 256, size=(max(2, height // 8), max(2, width // 8), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.BILINEAR)


def expected_probabilities(reference, image: Image.Image, *, tile_size=TILE_SIZE,
                           max_pixels=MAX_PIXELS) -> np.ndarray:
    """What the server should answer, computed with the plain model: [1, C, H, W]."""
    import torch.nn.functional as F

    from kubeseg.data.transforms import to_tensor
    from kubeseg.inference import predict_logits

    model, info = reference
    width, height = image.size
    scored = image
    if width * height > max_pixels:
        factor = math.sqrt(max_pixels / (width * height))
        scored = image.resize((max(1, int(width * factor)), max(1, int(height * factor))),
                              Image.BILINEAR)
    x = to_tensor(scored.convert("RGB"), info.mean, info.std)[None]
    logits = predict_logits(model, x, tile_size=tile_size)
    if logits.shape[-2:] != (height, width):
        logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
    return logits.softmax(dim=1).numpy()

