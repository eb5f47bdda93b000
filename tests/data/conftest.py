"""Small datasets for the data tests: Ground Truth style manifests on the test S3 server."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from kubeseg import storage

GT_CLASSES = [("BACKGROUND", "#ffffff"), ("car", "#2ca02c"), ("person", "#1f77b4"),
              ("tree", "#ff7f0e")]


def _rgb(hex_colour: str):
    return tuple(int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))


def gt_sample(rng: np.random.Generator, size: int = 32):
    """(JPEG bytes, class-id mask): rectangles of classes 1..3 on class 0."""
    mask = np.zeros((size, size), dtype=np.uint8)
    for _ in range(3):
        cls = int(rng.integers(1, len(GT_CLASSES)))
        x0, y0 = (int(v) for v in rng.integers(0, size - 8, 2))
        w, h = (int(v) for v in rng.integers(4, 12, 2))
        mask[y0:y0 + h, x0:x0 + w] = cls
    pixels = (np.asarray([_rgb(c) for _, c in GT_CLASSES], dtype=np.uint8)[mask] // 2
              + rng.integers(0, 40, (size, size, 3)).astype(np.uint8))
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="JPEG", quality=90)
    return buf.getvalue(), mask


def encode_mask(mask: np.ndarray, style: str) -> bytes:
    """A class-id mask as Ground Truth writes it: 'rgb' (colours of the map) or 'palette'."""
    buf = io.BytesIO()
    if style == "rgb":
        colours = np.asarray([_rgb(c) for _, c in GT_CLASSES], dtype=np.uint8)
        Image.fromarray(colours[mask], "RGB").save(buf, format="PNG")
    else:
        image = Image.fromarray(mask, "P")
        palette = [v for _, c in GT_CLASSES for v in _rgb(c)]
        image.putpalette(palette + [0] * (768 - len(palette)))
        image.save(buf, format="PNG")
    return buf.getvalue()


def gt_metadata() -> dict:
    return {"internal-color-map": {str(i): {"class-name": n, "hex-color": c, "confidence": 0.9}
                                   for i, (n, c) in enumerate(GT_CLASSES)},
            "type": "groundtruth/semantic-segmentation", "human-annotated": "yes"}


def write_gt_manifest(prefix: str, n: int, style: str, seed: int = 0,
                      attribute: str = "labels-ref") -> dict:
    """Upload ``n`` samples below ``prefix`` and a manifest; returns
    {"manifest": URI, "masks": {key: class-id mask}}."""
    rng = np.random.default_rng(seed)
    lines, masks = [], {}
    for i in range(n):
        key = f"img{i:03d}"
        image, mask = gt_sample(rng)
        storage.write_bytes(storage.join(prefix, "images", f"{key}.jpg"), image)
        storage.write_bytes(storage.join(prefix, "labels", f"{key}.png"), encode_mask(mask, style))
        masks[key] = mask
        lines.append(json.dumps({"source-ref": storage.join(prefix, "images", f"{key}.jpg"),
                                 attribute: storage.join(prefix, "labels", f"{key}.png"),
                                 f"{attribute}-metadata": gt_metadata(), "other": i}))
    manifest = storage.join(prefix, f"{style}.manifest")
    storage.write_text(manifest, "\n".join(lines) + "\n")
    return {"manifest": manifest, "masks": masks}


@pytest.fixture
def gt_manifest_factory():
    return write_gt_manifest
