"""Training checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint is one file (``<output>/checkpoints/last.pt``) written atomically through
:mod:`kubeseg.storage` after every epoch: model, optimizer, scheduler and loss-scaler states,
the random number generator states (Python, NumPy, torch CPU and CUDA), the epoch, the best
validation mIoU so far, early-stopping counters and the per-epoch history. It holds only
tensors and plain Python values, so ``torch.load(..., weights_only=True)`` reads it.
"""
from __future__ import annotations

import io
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from kubeseg import storage
from kubeseg.errors import DataError

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
LAST = "last.pt"
FORMAT_VERSION = 1


@dataclass
class EarlyStopping:
    """Stop when validation mIoU has not beaten its reference by the relative ``tolerance`` for
    ``patience`` epochs, once ``min_epochs`` have run. The counters go into the checkpoint."""

    enabled: bool = False
    min_epochs: int = 0
    patience: int = 1
    tolerance: float = 0.0
    reference: float = -1.0  # the mIoU to beat; negative before the first epoch
    bad_epochs: int = 0

    @classmethod
    def from_hyperparameters(cls, hp) -> "EarlyStopping":
        return cls(enabled=hp.early_stopping, min_epochs=hp.early_stopping_min_epochs,
                   patience=hp.early_stopping_patience, tolerance=hp.early_stopping_tolerance)

    def update(self, epoch: int, miou: float) -> bool:
        """Count epoch ``epoch``'s mIoU; True when training should stop after it."""
        if miou > self.reference * (1.0 + self.tolerance) or self.reference < 0:
            self.reference, self.bad_epochs = max(miou, self.reference), 0
        else:
            self.bad_epochs += 1
        return (self.enabled and epoch >= self.min_epochs
                and self.bad_epochs >= max(1, self.patience))


@dataclass
class TrainState:
    """Where a training run stands after an epoch: what the checkpoint holds besides the
    model, optimizer, scheduler, scaler and random number generator states."""

    early_stopping: EarlyStopping = field(default_factory=EarlyStopping)
    epoch: int = 0
    best_miou: float = -1.0
    best_epoch: int = 0
    history: List[Dict[str, Any]] = field(default_factory=list)
    stopped_early: bool = False

    def end_epoch(self, record: Dict[str, Any], miou: Optional[float]) -> bool:
        """Count a finished epoch (``miou``: its validation mIoU, None without validation);
        True when it is the best so far (without validation every epoch is)."""
        self.epoch = int(record["epoch"])
        score = 0.0 if miou is None else miou
        is_best = miou is None or score > self.best_miou
        if is_best:
            self.best_miou, self.best_epoch = score, self.epoch
        self.stopped_early = self.early_stopping.update(self.epoch, score)
        self.history.append(record)
        return is_best

    def to_checkpoint(self) -> Dict[str, Any]:
        return {"epoch": self.epoch, "best_miou": self.best_miou, "best_epoch": self.best_epoch,
                "history": self.history, "es_reference": self.early_stopping.reference,
                "es_bad_epochs": self.early_stopping.bad_epochs,
                "stopped_early": self.stopped_early}

    @classmethod
    def from_checkpoint(cls, saved: Dict[str, Any], early_stopping: EarlyStopping
                        ) -> "TrainState":
        """The state in ``saved``; ``early_stopping`` brings this run's settings."""
        early_stopping.reference = float(saved["es_reference"])
        early_stopping.bad_epochs = int(saved["es_bad_epochs"])
        return cls(early_stopping=early_stopping, epoch=int(saved["epoch"]),
                   best_miou=float(saved["best_miou"]), best_epoch=int(saved["best_epoch"]),
                   history=list(saved["history"]),
                   stopped_early=bool(saved.get("stopped_early", False)))


def checkpoint_uri(output_uri: str) -> str:
    return storage.join(output_uri, CHECKPOINT_DIR, LAST)


def capture_rng_state() -> Dict[str, Any]:
    """The state of every random number generator training draws from."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                  "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


def _remove_temporary_leftovers(uri: str) -> None:
    """Remove the temporary files of writers killed before their rename (``.last.pt.*.tmp``)."""
    if storage.is_s3(uri):
        return  # an interrupted S3 upload leaves no object behind
    path = Path(uri)
    if path.parent.is_dir():
        for stale in path.parent.glob(f".{path.name}.*.tmp"):
            stale.unlink(missing_ok=True)


def save_checkpoint(uri: str, state: Dict[str, Any]) -> None:
    """Serialise ``state`` and write it atomically (readers see the old file or the new) and,
    on a local disk, durably: flushed before the rename, so a node that loses power mid-epoch
    resumes from the previous checkpoint or this one, never from an empty file."""
    buf = io.BytesIO()
    torch.save(state, buf)
    _remove_temporary_leftovers(uri)
    storage.write_bytes(uri, buf.getvalue(), durable=True)
    logger.info("checkpoint written: %s (epoch %s)", uri, state.get("epoch"))


def load_checkpoint(uri: str) -> Optional[Dict[str, Any]]:
    """The checkpoint at ``uri``, or ``None`` when there is none."""
    if not storage.exists(uri):
        return None
    data = storage.read_bytes(uri)
    if not data:
        raise DataError(f"checkpoint {uri} cannot be read (it is empty: 0 bytes); delete it to "
                        "start the training from scratch")
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # a foreign or damaged file
        detail = (str(exc).strip().splitlines() or ["no details"])[0][:200]
        raise DataError(f"checkpoint {uri} cannot be read ({type(exc).__name__}: {detail}); "
                        "delete it to start the training from scratch") from None
