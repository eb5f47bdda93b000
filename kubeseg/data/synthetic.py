"""A small generated dataset of coloured shapes, for the local demo, tests and smoke runs.

Each image shows a textured background (class 0) and a few shapes; every other class has its
own colour (with noise) and shape, so a model can learn the classes quickly. Written in the
four-channel layout (SPEC section 3): JPEG images, single-channel PNG annotations, a label map.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict

import numpy as np
from PIL import Image, ImageDraw

CHANNELS = ("train", "validation", "train_annotation", "validation_annotation")

# Base colours for classes 1.. (class 0 is the background).
_COLOURS = [(220, 40, 40), (40, 180, 60), (40, 80, 220), (230, 200, 40), (200, 60, 200),
            (40, 200, 210), (240, 130, 30), (130, 70, 20), (250, 250, 250)]


def class_names(num_classes: int) -> list:
    shapes = ["background", "disc", "square", "triangle", "ring", "bar", "diamond", "cross",
              "blob", "star"]
    return [shapes[i] if i < len(shapes) else f"class_{i}" for i in range(num_classes)]


def _draw_shape(draw: ImageDraw.ImageDraw, cls: int, box, fill) -> None:
    x0, y0, x1, y1 = box
    kind = (cls - 1) % 4
    if kind == 0:
        draw.ellipse(box, fill=fill)
    elif kind == 1:
        draw.rectangle(box, fill=fill)
    elif kind == 2:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    else:
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)


def make_sample(rng: np.random.Generator, size: int, num_classes: int):
    """One (RGB image, uint8 mask) pair."""
    noise = rng.normal(0, 12, (size, size, 3))
    background = np.array([90, 90, 90]) + rng.normal(0, 10, 3)
    pixels = np.clip(background + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    mask = Image.new("L", (size, size), 0)
    draw_img, draw_mask = ImageDraw.Draw(image), ImageDraw.Draw(mask)
    for _ in range(int(rng.integers(1, 4))):
        cls = int(rng.integers(1, num_classes))
        side = int(rng.integers(size // 4, size // 2 + 1))
        x0 = int(rng.integers(0, size - side))
        y0 = int(rng.integers(0, size - side))
        box = (x0, y0, x0 + side - 1, y0 + side - 1)
        colour = np.array(_COLOURS[(cls - 1) % len(_COLOURS)]) + rng.normal(0, 15, 3)
        _draw_shape(draw_img, cls, box, tuple(int(c) for c in np.clip(colour, 0, 255)))
        _draw_shape(draw_mask, cls, box, cls)
    return image, np.asarray(mask, dtype=np.uint8)


def make_shapes_dataset(root, *, n_train: int = 8, n_val: int = 4, size: int = 64,
                        num_classes: int = 3, seed: int = 0) -> Dict[str, str]:
    """Write the dataset under ``root``; returns the channel name -> folder mapping."""
    if not 2 <= num_classes <= len(_COLOURS) + 1:
        raise ValueError(f"num_classes={num_classes}: the shapes dataset supports 2.."
                         f"{len(_COLOURS) + 1}")
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, count in (("train", n_train), ("validation", n_val)):
        (root / split).mkdir(parents=True, exist_ok=True)
        (root / f"{split}_annotation").mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image, mask = make_sample(rng, size, num_classes)
            image.save(root / split / f"{split}_{i:04d}.jpg", quality=95)
            Image.fromarray(mask, "L").save(root / f"{split}_annotation" / f"{split}_{i:04d}.png")
    label_map = root / "label_map"
    label_map.mkdir(exist_ok=True)
    mapping = json.dumps({"map": {str(c): c for c in range(num_classes)}})
    for split in ("train", "validation"):
        (label_map / f"{split}_label_map.json").write_text(mapping)
    out = {name: str(root / name) for name in CHANNELS}
    out["label_map"] = str(label_map)
    return out
