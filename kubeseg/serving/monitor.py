"""What serving tells Prometheus about its predictions, and the drift gauges.

Every answered image adds its :class:`~kubeseg.serving.predictor.OutputCounts` (pixels per
predicted class, pixels per confidence bin) and its size to a :class:`PredictionMonitor`. On
``GET /metrics`` (names in :mod:`kubeseg.monitoring.alerts`, every series labelled with the
model's name):

- counters: images predicted, pixels predicted per class;
- histograms: the pixels' confidence (the largest class probability, buckets at
  :data:`~kubeseg.monitoring.drift.CONFIDENCE_EDGES`), the images' sizes (height x width);
- gauges over the last ``window_images`` images (:class:`~kubeseg.monitoring.drift.SlidingWindow`):
  the class shift against the training labels, the low-confidence share and its excess over
  validation's, the images in the window, and whether the model has a baseline at all. The
  drift gauges are NaN until the window is full, and when the artifact has no baseline.

The same counts, summed over a run, are what batch prediction writes into its summary
(:meth:`PredictionMonitor.summary`).
"""
from __future__ import annotations

import math
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from kubeseg.monitoring import alerts, drift
from kubeseg.serving.keep import KeepSettings

IMAGE_PIXEL_BUCKETS = tuple(side * side for side in (64, 128, 256, 512, 1024, 2048, 4096))


@dataclass(frozen=True)
class MonitoringSettings:
    """``enabled``: count what is predicted (off: /metrics has only the request metrics);
    ``window_images``: how many recent images the drift gauges cover; ``keep``: which served
    images to keep for labelling (:class:`~kubeseg.serving.keep.KeepSettings`; off by
    default)."""

    enabled: bool = True
    window_images: int = drift.DEFAULT_WINDOW_IMAGES
    keep: KeepSettings = field(default_factory=KeepSettings)

    def problems(self) -> List[str]:
        out = list(self.keep.problems())
        if int(self.window_images) < 1:
            out.append(f"--drift-window={self.window_images}: must be at least 1 image")
        return out


class PredictionMonitor:
    """The running totals and the sliding window of one served model (thread-safe)."""

    def __init__(self, model_name: str, class_names: Sequence[str],
                 baseline: Optional[drift.TrainingBaseline],
                 window_images: int = drift.DEFAULT_WINDOW_IMAGES):
        self.model_name = model_name
        self.class_names = list(class_names)
        if baseline is not None and baseline.num_classes != len(self.class_names):
            baseline = None  # a baseline of another class count cannot be compared
        self.baseline = baseline
        classes = len(self.class_names)
        self.totals = drift.OutputCounts.empty(classes)
        self.confidence_sum = 0.0
        self.image_pixels = np.zeros(len(IMAGE_PIXEL_BUCKETS) + 1, dtype=np.int64)
        self.image_pixels_sum = 0
        self.window = drift.SlidingWindow(window_images, classes)
        self._lock = threading.Lock()

    def observe(self, counts, size: Tuple[int, int]) -> None:
        """Add one image's counts (an :class:`~kubeseg.serving.predictor.OutputCounts`) and its
        ``(height, width)``."""
        pixels = int(size[0]) * int(size[1])
        bucket = int(np.searchsorted(IMAGE_PIXEL_BUCKETS, pixels))
        with self._lock:
            self.totals.add(counts.class_pixels, counts.confidence_pixels)
            self.confidence_sum += counts.confidence_sum
            self.image_pixels[bucket] += 1
            self.image_pixels_sum += pixels
            self.window.add(counts.class_pixels, counts.confidence_pixels)

    def statistics(self) -> Optional[drift.DriftStatistics]:
        """The window's drift statistics; None while it is not full or without a baseline."""
        with self._lock:
            if self.baseline is None or not self.window.full:
                return None
            window = drift.OutputCounts(self.window.totals.class_pixels.copy(),
                                        self.window.totals.confidence_pixels.copy(),
                                        self.window.totals.images)
        return drift.drift_statistics(self.baseline, window)

    def summary(self) -> Dict[str, Any]:
        """Everything counted so far, as JSON (what batch prediction's summary records); the
        drift statistics are over all the images counted, against the baseline."""
        with self._lock:
            totals = drift.OutputCounts(self.totals.class_pixels.copy(),
                                        self.totals.confidence_pixels.copy(), self.totals.images)
            sizes = self.image_pixels.tolist()
            pixel_sum = self.image_pixels_sum
        stats = drift.drift_statistics(self.baseline, totals) \
            if self.baseline is not None and totals.images else None
        return {
            "images": totals.images, "pixels": totals.pixels,
            "mean_image_pixels": pixel_sum / totals.images if totals.images else None,
            "image_pixels_buckets": dict(zip([*map(str, IMAGE_PIXEL_BUCKETS), "+Inf"], sizes)),
            "predicted_pixels": dict(zip(self.class_names, totals.class_pixels.tolist())),
            "confidence_edges": list(drift.CONFIDENCE_EDGES),
            "confidence_pixels": totals.confidence_pixels.tolist(),
            "low_confidence_below": drift.LOW_CONFIDENCE_BELOW,
            "low_confidence_fraction": _finite(drift.low_confidence_fraction(
                totals.confidence_pixels)) if totals.images else None,
            "baseline": self.baseline is not None,
            "class_shift": _finite(stats.class_shift) if stats else None,
            "low_confidence_excess": _finite(stats.low_confidence_excess) if stats else None,
        }

    def families(self) -> Iterator[Any]:
        """The Prometheus metric families of this model."""
        from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                            HistogramMetricFamily)

        with self._lock:
            images = self.totals.images
            classes = self.totals.class_pixels.tolist()
            confidence = np.cumsum(self.totals.confidence_pixels).tolist()
            confidence_sum = self.confidence_sum
            sizes = np.cumsum(self.image_pixels).tolist()
            size_sum = self.image_pixels_sum
            in_window = len(self.window)
        model = [self.model_name]
        yield _counter(CounterMetricFamily, alerts.IMAGES, "Images predicted", model, images)
        pixels = CounterMetricFamily(alerts.PREDICTED_PIXELS[:-len("_total")],
                                     "Pixels predicted, by class", labels=["model", "class"])
        for name, count in zip(self.class_names, classes):
            pixels.add_metric([self.model_name, name], count)
        yield pixels
        yield _histogram(HistogramMetricFamily, alerts.PIXEL_CONFIDENCE,
                         "Largest class probability of each pixel predicted", model,
                         drift.CONFIDENCE_EDGES[1:], confidence, confidence_sum)
        yield _histogram(HistogramMetricFamily, alerts.IMAGE_PIXELS,
                         "Size of the images predicted (height x width)", model,
                         IMAGE_PIXEL_BUCKETS, sizes, size_sum)
        yield from self._drift_gauges(GaugeMetricFamily, model, in_window)

    def _drift_gauges(self, family, model: List[str], in_window: int) -> Iterator[Any]:
        stats = self.statistics()
        nan = math.nan
        baseline_low = self.baseline.low_confidence_fraction if self.baseline else nan
        for name, help_text, value in (
                (alerts.DRIFT_CLASS_SHIFT, "Jensen-Shannon distance between the window's "
                 "predicted class shares and the training labels' (NaN until the window is "
                 "full)", stats.class_shift if stats else nan),
                (alerts.DRIFT_LOW_CONFIDENCE, "Share of the window's pixels with a confidence "
                 f"below {drift.LOW_CONFIDENCE_BELOW}",
                 stats.low_confidence_fraction if stats else nan),
                (alerts.DRIFT_LOW_CONFIDENCE_BASELINE, "The same share on the validation split "
                 "at training time", baseline_low),
                (alerts.DRIFT_LOW_CONFIDENCE_EXCESS, "The window's low-confidence share minus "
                 "the validation split's", stats.low_confidence_excess if stats else nan),
                (alerts.DRIFT_WINDOW_IMAGES, "Images in the drift window", in_window),
                (alerts.DRIFT_BASELINE, "1 when the model artifact records a training "
                 "baseline, else 0 (no drift gauges)", 1 if self.baseline else 0)):
            gauge = family(name, help_text, labels=["model"])
            gauge.add_metric(model, value)
            yield gauge


def _finite(value: float) -> Optional[float]:
    return float(value) if math.isfinite(value) else None


def _counter(family, name: str, help_text: str, model: List[str], value: float):
    counter = family(name[:-len("_total")], help_text, labels=["model"])
    counter.add_metric(model, value)
    return counter


def _histogram(family, name: str, help_text: str, model: List[str], bounds: Sequence[float],
               cumulative: Sequence[int], total: float):
    """``cumulative``: counts up to each bound, the last entry being the count of all."""
    histogram = family(name, help_text, labels=["model"])
    buckets = [(_bound(b), c) for b, c in zip(bounds, cumulative)] + [("+Inf", cumulative[-1])]
    histogram.add_metric(model, buckets, total)
    return histogram


def _bound(value: float) -> str:
    return repr(float(value)) if not float(value).is_integer() else f"{float(value):.1f}"


class _Collector:
    """One per process, in prometheus_client's default registry: the families of every live
    source (a monitor, an image keeper; an app registers its own while it serves)."""

    def __init__(self):
        self.sources: "weakref.WeakSet[Any]" = weakref.WeakSet()

    def collect(self):
        for source in list(self.sources):
            yield from source.families()

    def describe(self):
        return []  # families appear with the monitors; nothing to check at registration


_COLLECTOR: Optional[_Collector] = None
_COLLECTOR_LOCK = threading.Lock()


def export(source: Any) -> None:
    """Show the metrics of ``source`` (anything with ``families()``: a
    :class:`PredictionMonitor`, an image keeper) on /metrics (prometheus_client's default
    registry)."""
    global _COLLECTOR
    with _COLLECTOR_LOCK:
        if _COLLECTOR is None:
            from prometheus_client import REGISTRY

            _COLLECTOR = _Collector()
            REGISTRY.register(_COLLECTOR)
        _COLLECTOR.sources.add(source)


def unexport(source: Any) -> None:
    with _COLLECTOR_LOCK:
        if _COLLECTOR is not None:
            _COLLECTOR.sources.discard(source)


def training_baseline(predictor) -> Optional[drift.TrainingBaseline]:
    """The baseline a loaded predictor's artifact records (None, with a warning, when it is
    malformed)."""
    import logging

    from kubeseg.errors import DataError

    info = predictor.info
    try:
        return drift.TrainingBaseline.from_dict(info.training_baseline,
                                                source=f"{info.uri} training_baseline")
    except DataError as exc:
        logging.getLogger(__name__).warning("%s: the drift gauges stay empty", exc)
        return None


def monitor_for(predictor, settings: MonitoringSettings) -> Optional[PredictionMonitor]:
    """The monitor of a loaded predictor (None when monitoring is off); logs when its artifact
    has no usable baseline."""
    import logging

    if not settings.enabled:
        return None
    log = logging.getLogger(__name__)
    info = predictor.info
    baseline = training_baseline(predictor)
    if baseline is None:
        log.warning("model %s (%s) records no training baseline (trained before kubeseg kept "
                    "one): predictions are counted, drift is not measured; train it again to "
                    "watch its drift", predictor.name, info.uri)
    return PredictionMonitor(predictor.name, predictor.class_names, baseline,
                             settings.window_images)


__all__ = ["MonitoringSettings", "PredictionMonitor", "export", "unexport", "monitor_for",
           "training_baseline",
           "IMAGE_PIXEL_BUCKETS"]
