"""Champion promotion: after a model passed the quality gate and was deployed, copy it and its
evaluation metrics to a stable prefix that the next retraining run gates against and the
serving overlays serve.

Layout below ``champion_uri``: ``model/`` (the artifact, as written by training) and
``metrics.json`` (its evaluation). The model's files are copied first and its completion marker
last, and ``metrics.json`` is written after the model, so a reader that finds the metrics also
finds the complete model. Files of the previous champion that the new one lacks are removed
once the new one is complete.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Dict, List

from kubeseg import storage
from kubeseg.artifact import MARKER_FILE as COMPLETE_MARKER
from kubeseg.errors import DataError

logger = logging.getLogger(__name__)

MODEL_DIR = "model"
METRICS_FILE = "metrics.json"


@dataclass(frozen=True)
class Promotion:
    champion_uri: str
    model_uri: str
    metrics_uri: str
    files: int

    def to_dict(self) -> Dict[str, Any]:
        return {"champion_uri": self.champion_uri, "model_uri": self.model_uri,
                "metrics_uri": self.metrics_uri, "files": self.files}


def champion_metrics_uri(champion_uri: str) -> str:
    """Where the champion's metrics are (what a retraining run gates against)."""
    return storage.join(champion_uri, METRICS_FILE)


def _ordered(keys: List[str]) -> List[str]:
    return sorted(keys, key=lambda key: (storage.basename(key) == COMPLETE_MARKER, key))


def promote(model_uri: str, metrics_uri: str, champion_uri: str) -> Promotion:
    """Make the artifact at ``model_uri`` (evaluated in ``metrics_uri``) the champion."""
    keys = storage.list_files(model_uri)
    if not any(storage.basename(k) == COMPLETE_MARKER for k in keys):
        raise DataError(f"{model_uri} is not a complete model artifact (no {COMPLETE_MARKER}); "
                        "only a finished training run can be promoted")
    metrics_text = storage.read_text(metrics_uri)
    target_model = storage.join(champion_uri, MODEL_DIR)
    previous = set(storage.list_files(target_model)) if storage.exists(
        storage.join(target_model, COMPLETE_MARKER)) else set()
    for key in _ordered(keys):
        storage.write_bytes(storage.join(target_model, key),
                            storage.read_bytes(storage.join(model_uri, key)))
    for stale in sorted(previous - set(keys)):
        storage.delete(storage.join(target_model, stale))
    target_metrics = champion_metrics_uri(champion_uri)
    storage.write_text(target_metrics, metrics_text)
    logger.info("promoted %s to the champion at %s", model_uri, champion_uri)
    return Promotion(champion_uri, target_model, target_metrics, len(keys))


__all__ = ["promote", "champion_metrics_uri", "Promotion", "MODEL_DIR", "METRICS_FILE"]
