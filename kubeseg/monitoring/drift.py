"""Drift of a deployed model, read from its own outputs (numpy only).

A segmentation model says two cheap things about every image it serves: how many pixels it
gives each class, and how sure it is of each pixel (the largest softmax probability). Both have
a reference recorded at training time (:class:`TrainingBaseline`, kept in the model artifact):
the class shares of the training split's labels, and a fixed-bin histogram of the model's
confidence on the validation split. Over a sliding window of served images
(:class:`SlidingWindow`):

- the *class shift* is the Jensen-Shannon distance (base 2, so in [0, 1]) between the window's
  predicted class shares and the training labels' shares (:func:`jensen_shannon_distance`);
- the *low-confidence excess* is the window's share of pixels with a confidence below
  :data:`LOW_CONFIDENCE_BELOW`, minus the same share on the validation split.

Either above its threshold means drift. Measured on CamVid (``bench/drift_camvid.py``;
docs/monitoring.md has the tables), the Jensen-Shannon distance against the training labels
separated shifted from unshifted windows better than the population stability index
(:func:`population_stability_index`, kept for comparison; it weighs rare classes heavily) and
than either against the validation split's predictions (one drive: windows of other drives of
the same city exceeded it). The class shift carries an offset of the model's own (a model
that never predicts a rare class is that far from the labels) and varies with the scenes of a
window, hence a window of 128 images (the defaults live in :mod:`kubeseg.monitoring.defaults`).
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Deque, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from kubeseg.errors import DataError
from kubeseg.monitoring.defaults import (CONFIDENCE_BINS, DEFAULT_CLASS_SHIFT_THRESHOLD,
                                         DEFAULT_LOW_CONFIDENCE_EXCESS_THRESHOLD,
                                         DEFAULT_WINDOW_IMAGES, LOW_CONFIDENCE_BELOW)

CONFIDENCE_EDGES: Tuple[float, ...] = tuple(i / CONFIDENCE_BINS
                                            for i in range(CONFIDENCE_BINS + 1))
SHARE_FLOOR = 1e-4  # shares are lifted to this before a logarithm (PSI of an empty class)


# -- the statistics ------------------------------------------------------------------------------

def shares(counts: Sequence[float]) -> np.ndarray:
    """``counts`` divided by their sum (all zeros stay zeros)."""
    values = np.asarray(counts, dtype=np.float64)
    total = values.sum()
    return values / total if total > 0 else np.zeros_like(values)


def population_stability_index(expected: Sequence[float], observed: Sequence[float],
                               floor: float = SHARE_FLOOR) -> float:
    """``sum((o - e) * ln(o / e))`` over the shares of two count vectors, each share lifted to
    ``floor`` first (an empty class would otherwise make it infinite)."""
    e = np.maximum(shares(expected), floor)
    o = np.maximum(shares(observed), floor)
    return float(np.sum((o - e) * np.log(o / e)))


def jensen_shannon_distance(p: Sequence[float], q: Sequence[float]) -> float:
    """The Jensen-Shannon distance (square root of the divergence, base 2) between the shares of
    two count vectors: 0 for the same shares, 1 for shares on disjoint classes."""
    a, b = shares(p), shares(q)
    m = (a + b) / 2

    def kl(x: np.ndarray) -> float:
        keep = x > 0
        return float(np.sum(x[keep] * np.log2(x[keep] / m[keep])))

    return math.sqrt(max(0.0, (kl(a) + kl(b)) / 2))


def confidence_counts(confidence: np.ndarray) -> np.ndarray:
    """Pixels per confidence bin (:data:`CONFIDENCE_EDGES`) of an array of largest softmax
    probabilities; a value of 1.0 falls in the last bin."""
    index = np.clip((np.asarray(confidence, dtype=np.float64) * CONFIDENCE_BINS).astype(np.int64),
                    0, CONFIDENCE_BINS - 1)
    return np.bincount(index.ravel(), minlength=CONFIDENCE_BINS).astype(np.int64)


def low_confidence_fraction(counts: Sequence[float], below: float = LOW_CONFIDENCE_BELOW) -> float:
    """Share of the pixels of a confidence histogram (:data:`CONFIDENCE_EDGES`) in the bins
    below ``below`` (a bin edge); NaN for an empty histogram."""
    values = np.asarray(counts, dtype=np.float64)
    if len(values) != CONFIDENCE_BINS:
        raise ValueError(f"a confidence histogram has {CONFIDENCE_BINS} bins, not {len(values)}")
    edge = int(round(below * CONFIDENCE_BINS))
    if not math.isclose(edge / CONFIDENCE_BINS, below):
        raise ValueError(f"below={below} is not a bin edge (multiples of 1/{CONFIDENCE_BINS})")
    total = values.sum()
    return float(values[:edge].sum() / total) if total > 0 else math.nan


# -- what training records -----------------------------------------------------------------------

@dataclass(frozen=True)
class TrainingBaseline:
    """What the model artifact records for monitoring: ``class_pixels`` per class in the
    training split's labels; on the validation split (None without one), the model's
    ``confidence_pixels`` per :data:`CONFIDENCE_EDGES` bin and its ``predicted_pixels`` per
    class, with the best epoch's weights."""

    class_pixels: Tuple[float, ...]
    train_images: int = 0
    confidence_pixels: Optional[Tuple[int, ...]] = None
    predicted_pixels: Optional[Tuple[int, ...]] = None
    validation_images: int = 0

    @property
    def num_classes(self) -> int:
        return len(self.class_pixels)

    @property
    def class_shares(self) -> np.ndarray:
        return shares(self.class_pixels)

    @property
    def low_confidence_fraction(self) -> float:
        """On the validation split; NaN when training had no validation data."""
        if self.confidence_pixels is None:
            return math.nan
        return low_confidence_fraction(self.confidence_pixels)

    def to_dict(self) -> dict:
        return {"class_pixels": [float(v) for v in self.class_pixels],
                "train_images": int(self.train_images),
                "confidence_edges": list(CONFIDENCE_EDGES),
                "confidence_pixels": None if self.confidence_pixels is None
                else [int(v) for v in self.confidence_pixels],
                "predicted_pixels": None if self.predicted_pixels is None
                else [int(v) for v in self.predicted_pixels],
                "validation_images": int(self.validation_images)}

    @classmethod
    def from_dict(cls, values: Optional[Mapping[str, Any]],
                  source: str = "training_baseline") -> Optional["TrainingBaseline"]:
        """The baseline an artifact recorded; None for an artifact written without one."""
        if not values:
            return None
        try:
            pixels = tuple(float(v) for v in values["class_pixels"])
            edges = values.get("confidence_edges")
            if edges is not None and [round(float(e), 6) for e in edges] != \
                    [round(e, 6) for e in CONFIDENCE_EDGES]:
                raise DataError(f"{source}.confidence_edges {edges} differ from this kubeseg's "
                                f"{list(CONFIDENCE_EDGES)}")
            confidence = values.get("confidence_pixels")
            predicted = values.get("predicted_pixels")
            baseline = cls(
                class_pixels=pixels, train_images=int(values.get("train_images", 0)),
                confidence_pixels=None if confidence is None
                else tuple(int(v) for v in confidence),
                predicted_pixels=None if predicted is None else tuple(int(v) for v in predicted),
                validation_images=int(values.get("validation_images", 0)))
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, DataError):
                raise
            raise DataError(f"{source} is malformed ({type(exc).__name__}: {exc}); write the "
                            "model again") from None
        baseline.check(source)
        return baseline

    def check(self, source: str = "training_baseline") -> None:
        problems = []
        if self.confidence_pixels is not None and len(self.confidence_pixels) != CONFIDENCE_BINS:
            problems.append(f"confidence_pixels has {len(self.confidence_pixels)} bins, "
                            f"not {CONFIDENCE_BINS}")
        if self.predicted_pixels is not None and len(self.predicted_pixels) != self.num_classes:
            problems.append(f"predicted_pixels has {len(self.predicted_pixels)} classes, "
                            f"class_pixels {self.num_classes}")
        if any(v < 0 for v in self.class_pixels) or not sum(self.class_pixels) > 0:
            problems.append("class_pixels must be non-negative with a positive sum")
        if problems:
            raise DataError(f"{source}: " + "; ".join(problems))


# -- what serving sees ---------------------------------------------------------------------------

@dataclass
class OutputCounts:
    """Predicted pixels per class and per confidence bin over some images."""

    class_pixels: np.ndarray
    confidence_pixels: np.ndarray = field(
        default_factory=lambda: np.zeros(CONFIDENCE_BINS, dtype=np.int64))
    images: int = 0

    @classmethod
    def empty(cls, num_classes: int) -> "OutputCounts":
        return cls(np.zeros(num_classes, dtype=np.int64))

    def add(self, class_pixels: Sequence[int], confidence_pixels: Sequence[int],
            images: int = 1) -> None:
        self.class_pixels += np.asarray(class_pixels, dtype=np.int64)
        self.confidence_pixels += np.asarray(confidence_pixels, dtype=np.int64)
        self.images += images

    @property
    def pixels(self) -> int:
        return int(self.class_pixels.sum())


class SlidingWindow:
    """The counts of the last ``images`` images added (their sum kept up to date)."""

    def __init__(self, images: int, num_classes: int):
        if int(images) < 1:
            raise ValueError(f"a drift window holds at least 1 image, not {images}")
        self.size = int(images)
        self.num_classes = int(num_classes)
        self._items: Deque[Tuple[np.ndarray, np.ndarray]] = deque()
        self.totals = OutputCounts.empty(self.num_classes)

    def add(self, class_pixels: Sequence[int], confidence_pixels: Sequence[int]) -> None:
        item = (np.asarray(class_pixels, dtype=np.int64),
                np.asarray(confidence_pixels, dtype=np.int64))
        if item[0].shape != (self.num_classes,) or item[1].shape != (CONFIDENCE_BINS,):
            raise ValueError(f"expected {self.num_classes} class counts and {CONFIDENCE_BINS} "
                             f"confidence counts, got {item[0].shape} and {item[1].shape}")
        self._items.append(item)
        self.totals.add(*item)
        if len(self._items) > self.size:
            old_classes, old_confidence = self._items.popleft()
            self.totals.add(-old_classes, -old_confidence, images=-1)

    @property
    def full(self) -> bool:
        return len(self._items) >= self.size

    def __len__(self) -> int:
        return len(self._items)


@dataclass(frozen=True)
class DriftThresholds:
    """When a window counts as drifted (defaults chosen on CamVid, see the module's doc)."""

    class_shift: float = DEFAULT_CLASS_SHIFT_THRESHOLD
    low_confidence_excess: float = DEFAULT_LOW_CONFIDENCE_EXCESS_THRESHOLD

    def problems(self) -> List[str]:
        out = []
        if not 0 < self.class_shift <= 1:
            out.append(f"class shift threshold {self.class_shift}: must be in (0, 1] (a "
                       "Jensen-Shannon distance)")
        if not 0 < self.low_confidence_excess <= 1:
            out.append(f"low-confidence excess threshold {self.low_confidence_excess}: must "
                       "be in (0, 1] (a share of pixels)")
        return out


@dataclass(frozen=True)
class DriftStatistics:
    """A window's statistics against a :class:`TrainingBaseline` (NaN where undefined)."""

    class_shift: float
    low_confidence_fraction: float
    baseline_low_confidence_fraction: float
    images: int
    pixels: int

    @property
    def low_confidence_excess(self) -> float:
        return self.low_confidence_fraction - self.baseline_low_confidence_fraction

    def reasons(self, thresholds: DriftThresholds = DriftThresholds()) -> List[str]:
        """Why this window counts as drifted (empty: it does not)."""
        out = []
        if self.class_shift > thresholds.class_shift:
            out.append(f"class shift {self.class_shift:.3f} > {thresholds.class_shift}")
        if self.low_confidence_excess > thresholds.low_confidence_excess:
            out.append(f"low-confidence pixels {self.low_confidence_fraction:.3f} against "
                       f"{self.baseline_low_confidence_fraction:.3f} on validation (excess > "
                       f"{thresholds.low_confidence_excess})")
        return out


def drift_statistics(baseline: TrainingBaseline, counts: OutputCounts) -> DriftStatistics:
    """The statistics of ``counts`` (a window's) against ``baseline``."""
    if len(counts.class_pixels) != baseline.num_classes:
        raise ValueError(f"{len(counts.class_pixels)} classes counted, the baseline has "
                         f"{baseline.num_classes}")
    empty = counts.pixels == 0
    return DriftStatistics(
        class_shift=math.nan if empty else jensen_shannon_distance(baseline.class_pixels,
                                                                   counts.class_pixels),
        low_confidence_fraction=low_confidence_fraction(counts.confidence_pixels),
        baseline_low_confidence_fraction=baseline.low_confidence_fraction,
        images=counts.images, pixels=counts.pixels)


__all__ = ["CONFIDENCE_BINS", "CONFIDENCE_EDGES", "LOW_CONFIDENCE_BELOW",
           "DEFAULT_WINDOW_IMAGES", "DEFAULT_CLASS_SHIFT_THRESHOLD",
           "DEFAULT_LOW_CONFIDENCE_EXCESS_THRESHOLD", "shares", "population_stability_index",
           "jensen_shannon_distance", "confidence_counts", "low_confidence_fraction",
           "TrainingBaseline", "OutputCounts", "SlidingWindow", "DriftThresholds",
           "DriftStatistics", "drift_statistics"]
