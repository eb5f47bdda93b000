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
    metrics.json              written last: overall and per-class metrics and the settings

Every file is written atomically (kubeseg.storage); metrics.json comes last, so a reader that
finds it finds the rest. Evaluation decides nothing: the quality gate
(:func:`kubeseg.engine.gate.apply_gate`) takes the :class:`EvaluationResult`, adds its
gate.json and shows its decision in the report.
"""
from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from kubeseg import storage
from kubeseg.device import resolve_device
from kubeseg.metrics import ConfusionMatrix
from kubeseg.strict_json import json_safe

logger = logging.getLogger(__name__)

DEFAULT_TILE_SIZE = 1024  # images with a longer side are scored with a sliding window
METRICS_FILE = "metrics.json"
CONFUSION_JSON = "confusion_matrix.json"
CONFUSION_PNG = "confusion_matrix.png"
REPORT_MD = "report.md"
REPORT_HTML = "report.html"
OVERLAY_DIR = "overlays"
OVERALL_METRICS = ("mIOU", "pixel_accuracy", "mean_class_accuracy", "fw_iou")


@dataclass(frozen=True)
class Scoring:
    """How each image is scored: ``tile_size`` is the longest side scored in one pass (larger
    images use a sliding window with ``tile_overlap``; None or 0: never tile); ``scales`` and
    ``flip`` are test-time augmentations whose logits are averaged."""

    tile_size: Optional[int] = DEFAULT_TILE_SIZE
    tile_overlap: float = 1 / 3
    scales: Tuple[float, ...] = (1.0,)
    flip: bool = False

    def problems(self) -> List[str]:
        out = [f"scales: {s} is not a positive number" for s in self.scales
               if not (math.isfinite(float(s)) and float(s) > 0)]
        if self.tile_size is not None and int(self.tile_size) < 0:
            out.append(f"tile_size={self.tile_size}: must be > 0 (or 0/None to never tile)")
        if not 0 <= self.tile_overlap < 1:
            out.append(f"tile_overlap={self.tile_overlap}: must be in [0, 1)")
        return out

    @property
    def tile(self) -> Optional[int]:
        return int(self.tile_size) if self.tile_size else None

    def to_dict(self) -> Dict[str, Any]:
        return {"tile_size": self.tile, "tile_overlap": round(self.tile_overlap, 4),
                "scales": [float(s) for s in self.scales] or [1.0], "flip": bool(self.flip)}


@dataclass(frozen=True)
class EvalOptions:
    """What an evaluation draws and how it uses this process: ``num_overlays`` sample pictures
    spread over the split, DataLoader ``workers``, a progress line every ``log_every`` images."""

    num_overlays: int = 4
    workers: int = 2
    log_every: int = 20


@dataclass(frozen=True)
class EvaluationResult:
    """What an evaluation found and where its files are.

    ``metrics``: the content of metrics.json (undefined values are None). ``matrix``: pixel
    counts, rows ground truth, columns prediction. ``pictures``: relative name -> PNG bytes
    (the confusion matrix and the overlays), kept for pages that embed them.
    """

    output_uri: str
    metrics: Dict[str, Any]
    matrix: List[List[int]]
    overlays: Tuple[str, ...] = ()
    pictures: Mapping[str, bytes] = field(default_factory=dict, repr=False)

    @property
    def class_names(self) -> List[str]:
        return list(self.metrics["class_names"])

    @property
    def per_class(self) -> List[Dict[str, Any]]:
        return list(self.metrics["per_class"])

    def uri(self, name: str) -> str:
        """Where the output file ``name`` (e.g. :data:`METRICS_FILE`) is."""
        return storage.join(self.output_uri, name)

    @property
    def files(self) -> Dict[str, str]:
        """Relative name -> URI of every file the evaluation wrote."""
        names = (METRICS_FILE, CONFUSION_JSON, CONFUSION_PNG, REPORT_MD, REPORT_HTML,
                 *self.overlays)
        return {name: self.uri(name) for name in names}

    def overall(self) -> Dict[str, float]:
        """The overall metrics and the per-class IoU (``iou/<class>``) that are defined."""
        out = {key: float(self.metrics[key]) for key in OVERALL_METRICS
               if self.metrics.get(key) is not None}
        for row in self.per_class:
            if row.get("iou") is not None:
                out[f"iou/{row['name']}"] = float(row["iou"])
        return out

    def markdown(self, gate: Optional[str] = None, pictures: bool = True) -> str:
        """The report as Markdown; ``pictures=False`` leaves out the (relative) picture links,
        for viewers that cannot reach them."""
        from kubeseg.report.pages import render_markdown

        if not pictures:
            return render_markdown(self.metrics, gate=gate)
        return render_markdown(self.metrics, overlays=self.overlays,
                               confusion_png=CONFUSION_PNG, gate=gate)

    def html(self, gate: Optional[str] = None) -> str:
        """The report as one self-contained HTML page (pictures embedded)."""
        from kubeseg.report.pages import render_html
        from kubeseg.report.pictures import palette

        return render_html(self.metrics, overlays=self.overlays, confusion_png=CONFUSION_PNG,
                           gate=gate, images=self.pictures,
                           colours=palette(len(self.class_names)))

    def write_report(self, gate: Optional[str] = None) -> None:
        """(Re)write report.md and report.html, with the quality gate's line when given."""
        storage.write_bytes(self.uri(REPORT_MD), self.markdown(gate).encode(),
                            content_type="text/markdown; charset=utf-8")
        storage.write_bytes(self.uri(REPORT_HTML), self.html(gate).encode(),
                            content_type="text/html; charset=utf-8")


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
                    class_names: Sequence[str], info) -> List[Dict[str, Any]]:
    m = matrix.double().cpu()
    total = float(m.sum()) or 1.0
    gt, pred = m.sum(dim=1), m.sum(dim=0)
    baseline = _training_baseline(info)
    train_shares = baseline.class_shares if baseline is not None else None
    rows = []
    for c, name in enumerate(class_names):
        rows.append({"name": name, "iou": metrics["per_class_iou"][c],
                     "accuracy": metrics["per_class_accuracy"][c],
                     "gt_pixels": int(gt[c]), "predicted_pixels": int(pred[c]),
                     "gt_share": float(gt[c]) / total, "predicted_share": float(pred[c]) / total,
                     "train_share": None if train_shares is None else float(train_shares[c])})
    return rows


def _training_baseline(info):
    """The artifact's :class:`~kubeseg.monitoring.drift.TrainingBaseline`; None (with a
    warning when it is malformed) when there is none to use."""
    from kubeseg.errors import DataError
    from kubeseg.monitoring.drift import TrainingBaseline

    try:
        return TrainingBaseline.from_dict(info.training_baseline,
                                          source=f"{info.uri} training_baseline")
    except DataError as exc:
        logger.warning("%s; the report shows no training baseline", exc)
        return None


def _monitoring_summary(info, outputs) -> Dict[str, Any]:
    """The model's confidence on this split beside the baseline its artifact records (the
    validation split's at training time), and this split's drift statistics against it."""
    from kubeseg.monitoring import drift

    counts = drift.OutputCounts(outputs.class_pixels.cpu().numpy(),
                                outputs.confidence_pixels.cpu().numpy(), int(outputs.images))
    out: Dict[str, Any] = {
        "confidence_edges": list(drift.CONFIDENCE_EDGES),
        "confidence_pixels": counts.confidence_pixels.tolist(),
        "low_confidence_below": drift.LOW_CONFIDENCE_BELOW,
        "low_confidence_fraction": drift.low_confidence_fraction(counts.confidence_pixels),
        "baseline": None}
    baseline = _training_baseline(info)
    if baseline is not None:
        out["baseline"] = baseline.to_dict()
        stats = drift.drift_statistics(baseline, counts)
        out.update(baseline_low_confidence_fraction=stats.baseline_low_confidence_fraction,
                   class_shift=stats.class_shift,
                   low_confidence_excess=stats.low_confidence_excess)
    return out


def evaluate(model_uri: str, channels, output_uri: str, *, split: str = "validation",
             scoring: Scoring = Scoring(), device: Optional[str] = None,
             options: EvalOptions = EvalOptions()) -> EvaluationResult:
    """Evaluate the artifact at ``model_uri`` on ``split`` of ``channels``; write the outputs
    listed in the module docstring to ``output_uri`` and return them as an
    :class:`EvaluationResult`.

    ``channels``: a :class:`kubeseg.data.channels.Channels` (folders, or ``shards``).
    ``scoring``: tiling and test-time augmentation (:class:`Scoring`). ``device``: "cpu",
    "cuda", ... or None (CUDA when available). ``options``: sample pictures, loader workers,
    progress lines (:class:`EvalOptions`).
    """
    from kubeseg.artifact import load_model
    from kubeseg.errors import ConfigError

    problems = scoring.problems()
    if problems:
        raise ConfigError(problems)

    dev = resolve_device(device)
    model, info = load_model(model_uri, device=str(dev))
    scored = _score(model, info, channels, split, scoring, dev, options)
    metrics = scored.confusion.compute()
    matrix = scored.confusion.matrix.cpu()
    summary = json_safe({
        **{key: metrics[key] for key in OVERALL_METRICS},
        "per_class_iou": metrics["per_class_iou"],
        "per_class_accuracy": metrics["per_class_accuracy"],
        "class_names": list(info.class_names),
        "per_class": _per_class_rows(matrix, metrics, info.class_names, info),
        "monitoring": _monitoring_summary(info, scored.outputs),
        "pixels": metrics["pixels"], "images": scored.images, "split": split,
        "model": info.uri, "settings": {**scoring.to_dict(), "device": str(dev),
                                        "inference_size": info.hyperparameters.inference_size},
        "seconds": round(scored.seconds, 3),
    })
    result = _write_outputs(output_uri, summary, matrix, scored.overlays)
    logger.info("%s mIoU %.4f, pixel accuracy %.4f over %d images (%.1f s); outputs in %s",
                split, metrics["mIOU"], metrics["pixel_accuracy"], scored.images,
                scored.seconds, output_uri)
    return result


@dataclass
class _Scored:
    confusion: ConfusionMatrix
    overlays: Dict[str, bytes]
    images: int
    seconds: float
    outputs: Any = None  # kubeseg.engine.loop.OutputTotals


def _loader(info, channels, split: str, workers: int, dev: torch.device):
    from torch.utils.data import DataLoader

    from kubeseg.data.datasets import build_dataset
    from kubeseg.data.transforms import EvalTransform
    from kubeseg.errors import DataError

    transform = EvalTransform(mean=tuple(info.mean), std=tuple(info.std), crop_size=None)
    dataset = build_dataset(channels, split, transform, return_key=True)
    try:
        total = len(dataset)
    except TypeError:
        total = None
    if total == 0:
        raise DataError(f"the {split} data is empty: check the {split} and {split}_annotation "
                        "channels (or the shards)")
    loader = DataLoader(dataset, batch_size=1, shuffle=False, num_workers=max(0, int(workers)),
                        pin_memory=dev.type == "cuda")
    return loader, total


def _score(model, info, channels, split: str, scoring: Scoring, dev: torch.device,
           options: EvalOptions) -> _Scored:
    """One pass over the split: the accumulated confusion matrix and the sample overlays."""
    from kubeseg.inference import predict_logits
    from kubeseg.errors import DataError

    loader, total = _loader(info, channels, split, options.workers, dev)
    wanted = set(_overlay_positions(total, options.num_overlays))
    long_side = info.hyperparameters.inference_long_side
    logger.info("evaluating %s on %s (%s images) on %s: tile %s, scales %s of %s, flip %s",
                info.uri, split, total if total is not None else "?", dev, scoring.tile or "off",
                ",".join(f"{s:g}" for s in scoring.scales),
                f"a long side of {long_side} px (inference_size=base_size)" if long_side
                else "each image's own size", scoring.flip)
    from kubeseg.engine.loop import OutputTotals

    cm = ConfusionMatrix(info.num_classes, device=dev)
    scored = _Scored(cm, {}, 0, 0.0, OutputTotals(info.num_classes, dev))
    progress = _Progress(total, options.log_every)
    start = time.perf_counter()
    try:
        for position, (image, mask, batch_keys) in enumerate(loader):
            image = image.to(dev, non_blocking=True)
            mask = mask.to(dev, non_blocking=True)
            logits = predict_logits(model, image, tile_size=scoring.tile,
                                    tile_overlap=scoring.tile_overlap,
                                    scales=tuple(scoring.scales) or (1.0,),
                                    flip=scoring.flip, long_side=long_side)
            pred = logits.max(dim=1).indices  # argmax across the strided class axis is slower
            cm.update(pred, mask)
            scored.outputs.add(logits)
            scored.images += image.shape[0]
            if position in wanted:
                key = str(batch_keys[0]) if batch_keys else f"sample_{position:05d}"
                name = f"{OVERLAY_DIR}/{_safe_name(key)}.png"
                scored.overlays[name] = _overlay_png(image[0], mask[0], pred[0], info, key)
            progress.update(image.shape[0], lambda: cm.compute()["mIOU"])
    finally:
        progress.close()
    scored.seconds = time.perf_counter() - start
    if scored.images == 0:
        raise DataError(f"the {split} data yielded no images: check the channels or shards")
    return scored


def _overlay_png(image: torch.Tensor, mask: torch.Tensor, pred: torch.Tensor, info,
                 key: str) -> bytes:
    """image | ground truth | prediction of one sample, titled with its own mIoU."""
    from kubeseg.report import pictures

    one = ConfusionMatrix(info.num_classes, device=pred.device)
    one.update(pred, mask)
    miou = one.compute()["mIOU"]
    picture = pictures.side_by_side(
        _denormalise(image, info.mean, info.std), mask.cpu().numpy(), pred.cpu().numpy(),
        list(info.class_names), colours=pictures.palette(info.num_classes),
        title=f"{key}   image mIoU {miou:.3f}")
    return pictures.png_bytes(picture)


def _write_outputs(output_uri: str, summary: Dict[str, Any], matrix: torch.Tensor,
                   overlays: Dict[str, bytes]) -> EvaluationResult:
    """Write every output, metrics.json last; the result that describes them."""
    from kubeseg.report import pictures

    class_names = summary["class_names"]
    confusion_png = pictures.png_bytes(pictures.confusion_matrix_image(matrix, class_names))
    result = EvaluationResult(output_uri=output_uri, metrics=summary, matrix=matrix.tolist(),
                              overlays=tuple(overlays),
                              pictures={CONFUSION_PNG: confusion_png, **overlays})
    for name, data in result.pictures.items():
        storage.write_bytes(result.uri(name), data, content_type="image/png")
    storage.write_bytes(
        result.uri(CONFUSION_JSON),
        json.dumps({"class_names": class_names, "rows": "ground truth",
                    "columns": "prediction", "matrix": result.matrix}).encode(),
        content_type="application/json")
    result.write_report()
    storage.write_bytes(result.uri(METRICS_FILE), json.dumps(summary, indent=2).encode(),
                        content_type="application/json")
    return result



def publish_evaluation(result: EvaluationResult, gate: Any, metrics: Any,
                       confusion_matrix: Any, report: Any, summary: Any) -> None:
    """Record ``result`` and the quality ``gate``'s decision in a pipeline step's outputs
    (KFP's Metrics, ClassificationMetrics, HTML and Markdown artifacts, or anything shaped
    like them): every defined metric, the confusion matrix, the self-contained HTML report, and
    the report's text as Markdown (a Markdown viewer cannot reach the relative pictures)."""
    for name, value in result.overall().items():
        metrics.log_metric(name, value)
    metrics.metadata.update({"evaluation_uri": result.output_uri,
                             "metrics_uri": result.uri(METRICS_FILE),
                             "gate_passed": bool(gate.passed), "gate_reason": str(gate.reason)})
    confusion_matrix.log_confusion_matrix(result.class_names,
                                          [[int(v) for v in row] for row in result.matrix])
    with open(report.path, "w") as f:
        f.write(result.html(gate.reason))
    with open(summary.path, "w") as f:
        f.write(result.markdown(gate.reason, pictures=False))


__all__ = ["evaluate", "publish_evaluation", "EvaluationResult", "Scoring", "EvalOptions",
           "DEFAULT_TILE_SIZE", "METRICS_FILE", "CONFUSION_JSON", "CONFUSION_PNG", "REPORT_MD",
           "REPORT_HTML", "OVERLAY_DIR", "OVERALL_METRICS"]
