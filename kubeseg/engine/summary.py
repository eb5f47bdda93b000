"""What a finished training run left behind: the per-epoch metrics, the best epoch, and where
the model artifact is.

Training in this process returns it directly (``TrainResult.summary()``); a distributed job
(TrainJob, PyTorchJob) ran in other pods, so the step that launched it reads the same summary
from the object store (:func:`summarize_training`).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from kubeseg import storage
from kubeseg.errors import DataError

METRICS_FILE = "metrics.jsonl"
ARTIFACT_DIR = "model"
TRAIN_DIR = "train"  # below <output_root>/<run_id>/ in a pipeline run
EPOCH_METRICS = ("train:loss", "validation:mIOU", "validation:pixel_accuracy", "throughput")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value)


@dataclass(frozen=True)
class TrainingSummary:
    """The outcome of one training run below ``output_uri``."""

    output_uri: str
    artifact_uri: str
    epochs: List[Dict[str, Any]] = field(default_factory=list)

    @property
    def best(self) -> Optional[Dict[str, Any]]:
        """The epoch record with the highest finite ``validation:mIOU`` (None without one)."""
        scored = [row for row in self.epochs if _finite(row.get("validation:mIOU"))]
        return max(scored, key=lambda row: row["validation:mIOU"]) if scored else None

    def model_metadata(self, hyperparameters: Any) -> Dict[str, Any]:
        """What a pipeline's Model artifact records about this run (its store location, the
        model's kind and its best validation mIoU)."""
        hp = hyperparameters
        out = {"uri": self.artifact_uri, "algorithm": hp.algorithm, "backbone": hp.backbone,
               "num_classes": hp.num_classes, "framework": "pytorch", "format": "kubeseg"}
        if self.best is not None:
            out["validation_mIOU"] = float(self.best["validation:mIOU"])
        return out

    def metrics(self) -> Dict[str, float]:
        """Flat name -> value pairs for a metrics dashboard (KFP Metrics, Katib, logs)."""
        out: Dict[str, float] = {}
        for row in self.epochs:
            epoch = int(row["epoch"])
            for key in EPOCH_METRICS:
                if _finite(row.get(key)):
                    out[f"epoch_{epoch:03d}/{key}"] = float(row[key])
        best = self.best
        if best is not None:
            out["best/validation:mIOU"] = float(best["validation:mIOU"])
            out["best/epoch"] = float(best["epoch"])
        out["epochs"] = float(len(self.epochs))
        return out


def publish_training(summary: TrainingSummary, hyperparameters: Any, model: Any,
                     metrics: Any) -> None:
    """Record a run in a pipeline step's outputs: every metric through ``metrics.log_metric``,
    the artifact copied to ``model.path`` and described in ``model.metadata`` (KFP's Model and
    Metrics artifacts, or anything shaped like them)."""
    for name, value in summary.metrics().items():
        metrics.log_metric(name, value)
    storage.download_prefix(summary.artifact_uri, model.path)
    model.metadata.update(summary.model_metadata(hyperparameters))


def training_output_uri(output_root: str, run_id: str) -> str:
    """Where a pipeline run's training writes (the same on every retry of the step, so a
    retried step resumes from the checkpoint there)."""
    return storage.join(output_root, run_id, TRAIN_DIR)


def summarize_training(output_uri: str) -> TrainingSummary:
    """Read ``<output_uri>/metrics.jsonl``; the artifact is ``<output_uri>/model``."""
    uri = storage.join(output_uri, METRICS_FILE)
    if not storage.exists(uri):
        raise DataError(f"{uri} does not exist: the training run below {output_uri} wrote no "
                        "epoch (see its log)")
    epochs = []
    for number, line in enumerate(storage.read_text(uri).splitlines(), start=1):
        if line.strip():
            try:
                epochs.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{uri} line {number} is not JSON: {exc}") from None
    return TrainingSummary(output_uri, storage.join(output_uri, ARTIFACT_DIR), epochs)


__all__ = ["TrainingSummary", "summarize_training", "publish_training", "training_output_uri",
           "METRICS_FILE", "ARTIFACT_DIR", "TRAIN_DIR"]
