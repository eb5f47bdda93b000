"""Pictures for an evaluation: coloured masks, overlays, image | ground truth | prediction
panels with a class legend, a confusion matrix heatmap, and their PNG bytes.

Pillow only. Class ``c`` is drawn in ``palette(C)[c]``; the ignore label (255) and any value
outside ``0..C-1`` are drawn black (:data:`IGNORE_COLOUR`). Every picture that shows classes
carries a legend with the class names.
"""
from __future__ import annotations

import colorsys
import io
import math
from typing import Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont


IGNORE_COLOUR = (0, 0, 0)

# Distinct, saturated colours first (readable on photos), then generated hues.
_BASE_COLOURS = [
    (128, 64, 128), (70, 130, 180), (220, 20, 60), (0, 180, 0), (255, 165, 0),
    (30, 30, 230), (250, 230, 40), (150, 90, 40), (0, 220, 220), (255, 105, 180),
    (190, 255, 0), (160, 160, 160), (128, 128, 0), (0, 100, 80), (255, 0, 255),
    (250, 128, 114), (0, 0, 120), (120, 60, 200), (110, 0, 0), (255, 220, 180),
]


def palette(num_classes: int) -> np.ndarray:
    """``[num_classes, 3]`` uint8 colours, distinct and stable (class c always gets the same)."""
    colours = list(_BASE_COLOURS[:num_classes])
    golden = 0.618033988749895
    i = 0
    while len(colours) < num_classes:
        hue = (i * golden) % 1.0
        light = 0.45 + 0.15 * ((i // 7) % 2)
        r, g, b = colorsys.hls_to_rgb(hue, light, 0.85)
        colours.append((int(r * 255), int(g * 255), int(b * 255)))
        i += 1
    return np.asarray(colours, dtype=np.uint8).reshape(num_classes, 3)


def colorize(mask: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """``HxW`` class ids -> ``HxWx3`` uint8 colours; ignore/out-of-range pixels are black."""
    mask = np.asarray(mask)
    colours = np.asarray(colours, dtype=np.uint8)
    table = np.zeros((256, 3), dtype=np.uint8)
    table[:] = IGNORE_COLOUR
    n = min(len(colours), 255)
    table[:n] = colours[:n]
    return table[np.clip(mask, 0, 255).astype(np.uint8)]


def overlay(image: Image.Image, mask: np.ndarray, colours: np.ndarray,
            alpha: float = 0.5) -> Image.Image:
    """The image with the coloured mask blended on top (``alpha`` = weight of the colours)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha}: must be in [0, 1]")
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    mask = np.asarray(mask)
    if rgb.shape[:2] != mask.shape:
        raise ValueError(f"image size {rgb.shape[1]}x{rgb.shape[0]} != mask size "
                         f"{mask.shape[1]}x{mask.shape[0]}")
    blended = (1 - alpha) * rgb + alpha * colorize(mask, colours).astype(np.float32)
    return Image.fromarray(np.clip(blended + 0.5, 0, 255).astype(np.uint8), "RGB")


# --------------------------------------------------------------------------------------------
# drawing
def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: fixed bitmap font
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> Tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def _class_label(names: Sequence[str], c: int) -> str:
    return names[c] if c < len(names) else f"class_{c}"


def _legend(classes: Sequence[int], names: Sequence[str], colours: np.ndarray, width: int,
            font, with_ignore: bool) -> Image.Image:
    """Rows of colour swatch + class name, wrapped to ``width``."""
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    _, line_h = _text_size(probe, "Ag", font)
    swatch = line_h + 4
    entries = [(tuple(int(v) for v in colours[c]), f"{c} {_class_label(names, c)}")
               for c in classes]
    if with_ignore:
        entries.append((IGNORE_COLOUR, "ignore"))
    pad, gap = 8, 16
    rows, row, x = [], [], pad
    for colour, label in entries:
        w = swatch + 6 + _text_size(probe, label, font)[0]
        if row and x + w > width - pad:
            rows.append(row)
            row, x = [], pad
        row.append((x, colour, label))
        x += w + gap
    if row:
        rows.append(row)
    row_h = swatch + 6
    legend = Image.new("RGB", (width, pad * 2 + row_h * max(1, len(rows))), "white")
    draw = ImageDraw.Draw(legend)
    for r, items in enumerate(rows):
        y = pad + r * row_h
        for x, colour, label in items:
            draw.rectangle([x, y, x + swatch, y + swatch], fill=colour, outline=(60, 60, 60))
            draw.text((x + swatch + 6, y + 2), label, fill="black", font=font)
    return legend


def side_by_side(image: Image.Image, ground_truth: np.ndarray, prediction: np.ndarray,
                 class_names: Sequence[str], *, colours: Optional[np.ndarray] = None,
                 title: Optional[str] = None, alpha: float = 0.6,
                 min_panel_width: int = 256) -> Image.Image:
    """``image | ground truth | prediction`` panels with captions, a title and a class legend.

    The masks are blended onto the image; the legend lists the classes that occur in the
    ground truth or the prediction (and "ignore" when the ground truth has ignored pixels).
    Small images are enlarged (nearest neighbour) to ``min_panel_width`` so text stays legible.
    """
    image = image.convert("RGB")
    ground_truth = np.asarray(ground_truth)
    prediction = np.asarray(prediction)
    num_classes = len(class_names)
    colours = palette(num_classes) if colours is None else np.asarray(colours, dtype=np.uint8)
    panels = [image, overlay(image, ground_truth, colours, alpha),
              overlay(image, prediction, colours, alpha)]
    w, h = image.size
    scale = max(1, math.ceil(min_panel_width / w))
    if scale > 1:
        panels = [p.resize((w * scale, h * scale), Image.NEAREST) for p in panels]
        w, h = w * scale, h * scale
    font = _font(max(12, min(20, w // 22)))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    _, text_h = _text_size(probe, "Ag", font)
    gap = 6
    caption_h = text_h + 10
    title_h = caption_h if title else 0
    total_w = 3 * w + 4 * gap
    present = sorted(int(c) for c in np.union1d(np.unique(ground_truth), np.unique(prediction))
                     if 0 <= c < num_classes)
    has_ignore = bool(((ground_truth < 0) | (ground_truth >= num_classes)).any())
    legend = _legend(present, class_names, colours, total_w, font, has_ignore)
    canvas = Image.new("RGB", (total_w, title_h + caption_h + h + gap + legend.height), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((gap, 4), title, fill="black", font=font)
    for i, (panel, caption) in enumerate(zip(panels, ("image", "ground truth", "prediction"))):
        x = gap + i * (w + gap)
        draw.text((x + (w - _text_size(draw, caption, font)[0]) // 2, title_h + 4), caption,
                  fill="black", font=font)
        canvas.paste(panel, (x, title_h + caption_h))
    canvas.paste(legend, (0, title_h + caption_h + h + gap))
    return canvas


def _heat_colour(value: float) -> Tuple[int, int, int]:
    """0 -> white, 1 -> dark blue."""
    if not math.isfinite(value):
        return (235, 235, 235)
    v = min(max(value, 0.0), 1.0)
    start, end = np.array([255, 255, 255]), np.array([8, 48, 107])
    return tuple(int(round(c)) for c in start + (end - start) * v)


def confusion_matrix_image(matrix, class_names: Sequence[str], *,
                           cell: int = 0) -> Image.Image:
    """Row-normalised confusion matrix heatmap (rows: ground truth, columns: prediction).

    Each cell shows the share of the row's ground-truth pixels, in percent; rows with no
    pixels are grey. Class names label both axes (columns vertically).
    """
    m = np.asarray(matrix, dtype=np.float64)
    n = m.shape[0]
    names = [f"{i} {_class_label(class_names, i)}" for i in range(n)]
    rows = m.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        norm = np.where(rows > 0, m / np.where(rows > 0, rows, 1), np.nan)
    cell = cell or max(18, min(56, 900 // max(n, 1)))
    font = _font(max(9, min(15, cell // 3)))
    label_font = _font(14)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max(_text_size(probe, s, label_font)[0] for s in names) + 12
    axis_h = _text_size(probe, "Ag", label_font)[1] + 10
    left, top = label_w + axis_h, label_w + axis_h
    width, height = left + n * cell + 10, top + n * cell + axis_h + 10
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    for r in range(n):
        for c in range(n):
            value = norm[r, c]
            x0, y0 = left + c * cell, top + r * cell
            fill = _heat_colour(value)
            draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=fill,
                           outline=(200, 200, 200))
            if math.isfinite(value) and cell >= 18:
                text = f"{100 * value:.0f}"
                tw, th = _text_size(draw, text, font)
                colour = "white" if value > 0.5 else (40, 40, 40)
                draw.text((x0 + (cell - tw) / 2, y0 + (cell - th) / 2 - 1), text, fill=colour,
                          font=font)
    for i, name in enumerate(names):  # row labels (ground truth)
        tw, th = _text_size(draw, name, label_font)
        draw.text((left - tw - 6, top + i * cell + (cell - th) / 2 - 2), name, fill="black",
                  font=label_font)
    for i, name in enumerate(names):  # column labels (prediction), written vertically
        tw, th = _text_size(probe, name, label_font)
        label = Image.new("RGB", (tw + 4, th + 6), "white")
        ImageDraw.Draw(label).text((2, 0), name, fill="black", font=label_font)
        label = label.rotate(90, expand=True)
        img.paste(label, (left + i * cell + (cell - label.width) // 2, top - label.height - 6))
    # axis titles
    draw.text((left, height - axis_h), "predicted class (columns); % of each true row",
              fill="black", font=label_font)
    axis = Image.new("RGB", (n * cell, axis_h), "white")
    ImageDraw.Draw(axis).text((0, 2), "true class (rows)", fill="black", font=label_font)
    axis = axis.rotate(90, expand=True)
    img.paste(axis, (2, top))
    return img


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


__all__ = ["IGNORE_COLOUR", "palette", "colorize", "overlay", "side_by_side",
           "confusion_matrix_image", "png_bytes"]
