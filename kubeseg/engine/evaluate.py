"""Score a model artifact on a dataset split and write the evaluation outputs.

:func:`evaluate` is what ``kubeseg evaluate`` and the pipeline's evaluate component call. Each
image is scored whole, at its own size (images with a side above ``tile_size`` with a sliding
window), optionally averaged over several scales and a horizontal flip. One confusion matrix
is accumulated over the split on the model's device, so mIoU is over the dataset, not averaged
per image (SPEC section 5). Outputs, at ``output_uri`` (local folder or s3:// prefix)::

    overlays/<key>.png        image | ground truth | prediction, with a class legend
    confusion_matrix.png      row-normalised heatmap with class names
    confusion_matrix.json     {"class_names", "matrix" (rows: ground truth, columns: prediction)}
    report.md                 per-class table, overall metrics, links to the pictures
    report.html               the same page, self-contained (pictures embedded)
    gate.json                 only when a quality gate was asked for: {"passed", "reason", ...}
    metrics.json              written last: overall and per-class metrics and the settings

Every file is written atomically (kubeseg.storage); metrics.json comes last, so a reader that
finds it finds the rest.
"""
from __future__ import annotations

import json
import logging
import math
import sys
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch

from kubeseg import storage
from kubeseg.device import resolve_device
from kubeseg.metrics import ConfusionMatrix, json_safe

logger = logging.getLogger(__name__)

DEFAULT_TILE_SIZE = 1024  # images with a longer side are scored with a sliding window
METRICS_FILE = "metrics.json"
CONFUSION_JSON = "confusion_matrix.json"
CONFUSION_PNG = "confusion_matrix.png"
REPORT_MD = "report.md"
REPORT_HTML = "report.html"
GATE_FILE = "gate.json"
OVERLAY_DIR = "overlays"





def _denormalise(image: torch.Tensor, mean: Sequence[float], std: Sequence[float]):
    """Normalised ``[3, H, W]`` tensor -> PIL RGB image (for the overlays)."""
    from PIL import Image

    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    rgb = (image.detach().float().cpu() * s + m).clamp(0, 1).mul(255).round().byte()
    return Image.fromarray(rgb.permute(1, 2, 0).numpy(), "RGB")


def _overlay_positions(total: Optional[int], count: int) -> List[int]:
    """Sample positions spread evenly over the split (the first ``count`` when unknown)."""
    if count <= 0:
        return []
    if not total:
        return list(range(count))
    if total <= count:
        return list(range(total))
    return sorted({int(round(i * (total - 1) / (count - 1))) for i in range(count)}
                  if count > 1 else {0})


def _safe_name(key: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(key))
    return keep.strip("._") or "sample"


class _Progress:
    """tqdm on a terminal, otherwise a log line every ``log_every`` images."""

    def __init__(self, total: Optional[int], log_every: int):
        self.total, self.log_every, self.count = total, max(1, int(log_every)), 0
        self.start = time.perf_counter()
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="evaluate", unit="img", leave=False,
                            dynamic_ncols=True)

    def update(self, n: int, running_miou) -> None:
        """``running_miou``: a callable, only called when a line or the bar is refreshed."""
        self.count += n
        if self.bar is not None:
            self.bar.update(n)
            if self.count % self.log_every < n:
                self.bar.set_postfix(mIoU=f"{running_miou():.4f}")
        elif self.count % self.log_every < n or self.count == self.total:
            rate = self.count / max(time.perf_counter() - self.start, 1e-9)
            of = f"/{self.total}" if self.total else ""
            logger.info("evaluated %d%s images, running mIoU %.4f, %.2f images/s", self.count,
                        of, running_miou(), rate)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _per_class_rows(matrix: torch.Tensor, metrics: Mapping[str, Any],
                    class_names: Sequence[str]) -> List[Dict[str, Any]]:
    m = matrix.double().cpu()
    total = float(m.sum()) or 1.0
    gt, pred = m.sum(dim=1), m.sum(dim=0)
    rows = []
    for c, name in enumerate(class_names):
        rows.append({"name": name, "iou": metrics["per_class_iou"][c],
                     "accuracy": metrics["per_class_accuracy"][c],
                     "gt_pixels": int(gt[c]), "predicted_pixels": int(pred[c]),
                     "gt_share": float(gt[c]) / total, "predicted_share": float(pred[c]) / total})
    return rows


def evaluate(model_uri: str, channels, output_uri: str, *, split: str = "validation",
             tile_size: Optional[int] = DEFAULT_TILE_SIZE, tile_overlap: float = 1 / 3,
             scales: Sequence[float] = (1.0,), flip: bool = False,
             device: Optional[str] = None, num_overlays: int = 4, workers: int = 2,
             log_every: int = 20, min_miou: Optional[float] = None,
             previous_metrics: Optional[Mapping[str, Any]] = None,
             max_regression: float = 0.0) -> Dict[str, Any]:
    """Evaluate the artifact at ``model_uri`` on ``split`` of ``channels``; write the outputs
    listed in the module docstring to ``output_uri`` and return the content of metrics.json.

    ``channels``: a :class:`kubeseg.data.channels.Channels` (folders, or ``shards``).
    ``tile_size``: longest side scored in one pass; larger images use a sliding window with
    ``tile_overlap`` (``None`` or 0: never tile). ``scales``/``flip``: test-time augmentation
    (logits averaged). ``device``: "cpu", "cuda", ... or None (CUDA when available).
    ``num_overlays``: sample pictures to draw, spread over the split.
    ``min_miou``/``previous_metrics``/``max_regression``: when ``min_miou`` or
    ``previous_metrics`` is given, the quality gate (:func:`kubeseg.engine.gate.quality_gate`)
    is applied; its decision is returned under ``"gate"``, written to gate.json and shown in
    the report (the caller decides what a failed gate means).
    """
    from torch.utils.data import DataLoader

    from kubeseg import report
    from kubeseg.artifact import load_model
    from kubeseg.data.datasets import build_dataset
    from kubeseg.data.transforms import EvalTransform
    from kubeseg.engine.inference import predict_logits
    from kubeseg.errors import ConfigError, DataError

    scales = tuple(float(s) for s in scales) or (1.0,)
    problems = [f"scales: {s} is not a positive number" for s in scales
                if not (math.isfinite(s) and s > 0)]
    if tile_size is not None and int(tile_size) < 0:
        problems.append(f"tile_size={tile_size}: must be > 0 (or 0/None to never tile)")
    if not 0 <= tile_overlap < 1:
        problems.append(f"tile_overlap={tile_overlap}: must be in [0, 1)")
    for name, value in (("min_miou", min_miou), ("max_regression", max_regression)):
        if value is not None and not 0.0 <= float(value) <= 1.0:
            problems.append(f"{name}={value}: allowed range is [0, 1] (mIoU as a fraction)")
    if problems:
        raise ConfigError(problems)
    tile = int(tile_size) if tile_size else None

    dev = resolve_device(device)
    model, info = load_model(model_uri, device=str(dev))
    class_names = list(info.class_names)
    num_classes = info.num_classes
    transform = EvalTransform(mean=tuple(info.mean), std=tuple(info.std), crop_size=None)
    dataset = build_dataset(channels, split, transform, return_key=True)
    try:
        total = len(dataset)
    except TypeError:
        total = None
    if total == 0:
        raise DataError(f"the {split} data is empty: check the {split} and {split}_annotation "
                        "channels (or the shards)")
    wanted = set(_overlay_positions(total, num_overlays))
    loader = DataLoader(dataset, batch_size=1, shuffle=False, num_workers=max(0, int(workers)),
                        pin_memory=dev.type == "cuda")
    logger.info("evaluating %s on %s (%s images) on %s: tile %s, scales %s, flip %s", info.uri,
                split, total if total is not None else "?", dev, tile or "off",
                ",".join(f"{s:g}" for s in scales), flip)

    cm = ConfusionMatrix(num_classes, device=dev)
    colours = report.palette(num_classes)
    overlays: Dict[str, bytes] = {}
    progress = _Progress(total, log_every)
    images_seen = 0
    start = time.perf_counter()
    try:
        for position, (image, mask, batch_keys) in enumerate(loader):
            image = image.to(dev, non_blocking=True)
            mask = mask.to(dev, non_blocking=True)
            logits = predict_logits(model, image, tile_size=tile, tile_overlap=tile_overlap,
                                    scales=scales, flip=flip)
            pred = logits.argmax(dim=1)
            cm.update(pred, mask)
            images_seen += image.shape[0]
            if position in wanted:
                key = str(batch_keys[0]) if batch_keys else f"sample_{position:05d}"
                one = ConfusionMatrix(num_classes, device=dev)
                one.update(pred[0], mask[0])
                miou = one.compute()["mIOU"]
                picture = report.side_by_side(
                    _denormalise(image[0], info.mean, info.std),
                    mask[0].cpu().numpy(), pred[0].cpu().numpy(), class_names,
                    colours=colours, title=f"{key}   image mIoU {miou:.3f}")
                overlays[f"{OVERLAY_DIR}/{_safe_name(key)}.png"] = report.png_bytes(picture)
            progress.update(image.shape[0], lambda: cm.compute()["mIOU"])
    finally:
        progress.close()
    elapsed = time.perf_counter() - start
    if images_seen == 0:
        raise DataError(f"the {split} data yielded no images: check the channels or shards")

    metrics = cm.compute()
    matrix = cm.matrix.cpu()
    summary: Dict[str, Any] = {
        "mIOU": metrics["mIOU"], "pixel_accuracy": metrics["pixel_accuracy"],
        "mean_class_accuracy": metrics["mean_class_accuracy"], "fw_iou": metrics["fw_iou"],
        "per_class_iou": metrics["per_class_iou"],
        "per_class_accuracy": metrics["per_class_accuracy"],
        "class_names": class_names,
        "per_class": _per_class_rows(matrix, metrics, class_names),
        "pixels": metrics["pixels"], "images": images_seen, "split": split,
        "model": info.uri,
        "settings": {"tile_size": tile, "tile_overlap": round(tile_overlap, 4),
                     "scales": list(scales), "flip": bool(flip), "device": str(dev)},
        "seconds": round(elapsed, 3),
    }

    gate_text = None
    if min_miou is not None or previous_metrics is not None:
        from kubeseg.engine.gate import quality_gate

        decision = quality_gate(summary, min_miou=min_miou or 0.0,
                                previous_metrics=previous_metrics,
                                max_regression=max_regression)
        summary["gate"] = decision.to_dict()
        gate_text = decision.reason

    confusion_png = report.png_bytes(report.confusion_matrix_image(matrix, class_names))
    pictures = {CONFUSION_PNG: confusion_png, **overlays}
    for name, data in pictures.items():
        storage.write_bytes(storage.join(output_uri, name), data, content_type="image/png")
    storage.write_bytes(
        storage.join(output_uri, CONFUSION_JSON),
        json.dumps({"class_names": class_names, "rows": "ground truth",
                    "columns": "prediction", "matrix": matrix.tolist()}).encode(),
        content_type="application/json")
    safe = json_safe(summary)
    storage.write_bytes(storage.join(output_uri, REPORT_MD),
                        report.render_markdown(safe, overlays=list(overlays),
                                               confusion_png=CONFUSION_PNG,
                                               gate=gate_text).encode(),
                        content_type="text/markdown; charset=utf-8")
    storage.write_bytes(storage.join(output_uri, REPORT_HTML),
                        report.render_html(safe, overlays=list(overlays),
                                           confusion_png=CONFUSION_PNG, gate=gate_text,
                                           images=pictures, colours=colours).encode(),
                        content_type="text/html; charset=utf-8")
    if "gate" in summary:
        storage.write_bytes(storage.join(output_uri, GATE_FILE),
                            json.dumps(safe["gate"], indent=2).encode(),
                            content_type="application/json")
    storage.write_bytes(storage.join(output_uri, METRICS_FILE),
                        json.dumps(safe, indent=2).encode(), content_type="application/json")
    logger.info("%s mIoU %.4f, pixel accuracy %.4f over %d images (%.1f s); outputs in %s",
                split, metrics["mIOU"], metrics["pixel_accuracy"], images_seen, elapsed,
                output_uri)
    return summary


__all__ = ["evaluate", "DEFAULT_TILE_SIZE", "METRICS_FILE", "CONFUSION_JSON", "CONFUSION_PNG",
           "REPORT_MD", "REPORT_HTML", "GATE_FILE", "OVERLAY_DIR"]
