"""Ground Truth style samples and manifests, built on the test S3 server (or local paths)."""
from __future__ import annotations

import io
import json

import numpy as np
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



def gt_line(prefix: str, key: str, mask: np.ndarray, rng: np.random.Generator, *,
            style: str = "rgb", order=None, present_only: bool = False,
            meta_key: str = "labels-ref-metadata", attribute: str = "labels-ref",
            extra_colours=()) -> dict:
    """Upload one sample as a Ground Truth job writes it and return its manifest line.

    ``mask`` holds GT_CLASSES ids. ``order``: the job's class list as GT_CLASSES ids (job index
    j is class order[j]); palette masks hold job indices. ``present_only``: the line's
    internal-color-map lists only the classes present in its mask. ``extra_colours``:
    (job index, name, hex) entries appended to the map. ``meta_key`` None: no metadata.
    """
    order = list(range(len(GT_CLASSES))) if order is None else list(order)
    job_index = {gt: j for j, gt in enumerate(order)}
    size = mask.shape[0]
    pixels = (np.asarray([_rgb(c) for _, c in GT_CLASSES], dtype=np.uint8)[mask] // 2
              + rng.integers(0, 40, (size, size, 3)).astype(np.uint8))
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="JPEG", quality=90)
    image_uri = storage.join(prefix, "images", f"{key}.jpg")
    storage.write_bytes(image_uri, buf.getvalue())
    buf = io.BytesIO()
    if style == "rgb":
        colours = np.asarray([_rgb(c) for _, c in GT_CLASSES], dtype=np.uint8)
        Image.fromarray(colours[mask], "RGB").save(buf, format="PNG")
    else:
        lut = np.zeros(256, dtype=np.uint8)
        for gt, j in job_index.items():
            lut[gt] = j
        image = Image.fromarray(lut[mask], "P")
        palette = [v for gt in order for v in _rgb(GT_CLASSES[gt][1])]
        image.putpalette(palette + [0] * (768 - len(palette)))
        image.save(buf, format="PNG")
    mask_uri = storage.join(prefix, "labels", f"{key}.png")
    storage.write_bytes(mask_uri, buf.getvalue())
    present = set(np.unique(mask).tolist())
    colour_map = {str(j): {"class-name": GT_CLASSES[gt][0], "hex-color": GT_CLASSES[gt][1],
                           "confidence": 0.9}
                  for j, gt in enumerate(order) if not present_only or gt in present}
    for j, name, hex_colour in extra_colours:
        colour_map[str(j)] = {"class-name": name, "hex-color": hex_colour, "confidence": 0.9}
    line = {"source-ref": image_uri, attribute: mask_uri}
    if meta_key:
        line[meta_key] = {"internal-color-map": colour_map,
                          "type": "groundtruth/semantic-segmentation", "human-annotated": "yes"}
    return line


def random_mask(rng: np.random.Generator, size: int = 32, classes=(1, 2, 3)) -> np.ndarray:
    """Rectangles of ``classes`` on class 0 (GT_CLASSES ids)."""
    mask = np.zeros((size, size), dtype=np.uint8)
    for cls in classes:
        x0, y0 = (int(v) for v in rng.integers(0, size - 10, 2))
        mask[y0:y0 + 8, x0:x0 + 8] = cls
    return mask


def write_manifest(uri: str, lines, *, bom: bool = False, newline: str = "\n") -> str:
    text = newline.join(line if isinstance(line, str) else json.dumps(line) for line in lines)
    data = (b"\xef\xbb\xbf" if bom else b"") + (text + newline).encode("utf-8")
    storage.write_bytes(uri, data)
    return uri
