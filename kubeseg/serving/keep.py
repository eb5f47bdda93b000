"""Keeping what production saw: served images and their predicted masks, stored for labelling.

Opt-in (``kubeseg serve --keep-images URI``). An answered image is kept when a random draw
falls below ``rate``, and always when it is a low-confidence image: the share of its pixels
whose largest class probability is below
:data:`~kubeseg.monitoring.drift.LOW_CONFIDENCE_BELOW` exceeds ``low_confidence`` (by default
the validation split's share plus the drift alert's excess threshold; 0.5 for a model without
a training baseline). Below ``URI``, in the four-channel layout plus an augmented manifest::

    train/<id>.jpg|.png            the image as it was sent (v2 pixel inputs: PNG)
    train_annotation/<id>.png      the model's mask: a palette PNG, index = class id
    manifests/<part>.manifest      JSON Lines: source-ref, kubeseg-prediction-ref and its
                                   Ground Truth metadata (class names and colours,
                                   human-annotated "no"), why the image was kept

A labelling job starts from the manifest (the mask as a pre-annotation to correct); the
corrected set joins the next training run as channels or as a manifest (``kubeseg ingest``).

Nothing of this is on the request path: the request hands the image to a bounded queue and
returns; one thread writes. A full queue, a spent size budget (``budget_mib``, counted from
what the prefix already holds when the server starts) or a failed write drops the image, which
is counted (``kubeseg_kept_images_dropped_total`` by reason) and logged, never answered with
an error.
"""
from __future__ import annotations

import io
import json
import logging
import queue
import random
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence

import numpy as np

from kubeseg import storage
from kubeseg.monitoring import alerts, drift

logger = logging.getLogger(__name__)

MANIFEST_LINES = 100  # lines per manifest part; the next part starts after them
LABEL_ATTRIBUTE = "kubeseg-prediction-ref"
DROP_REASONS = ("queue_full", "budget", "error")


@dataclass(frozen=True)
class KeepSettings:
    """``uri``: where kept images go (empty: keep nothing, the default); ``rate``: share of
    images kept at random; ``low_confidence``: keep every image whose low-confidence share is
    above it (None: the validation share plus the drift alert's excess, or 0.5 without a
    baseline; 1: never); ``budget_mib``: stop keeping once the prefix holds this much;
    ``queue``: images waiting to be written, beyond which new ones are dropped."""

    uri: str = ""
    rate: float = 0.0
    low_confidence: Optional[float] = None
    budget_mib: int = 1024
    queue: int = 16

    @property
    def enabled(self) -> bool:
        return bool(self.uri)

    def problems(self) -> List[str]:
        out = []
        if not 0 <= self.rate <= 1:
            out.append(f"--keep-rate={self.rate}: must be in [0, 1]")
        if self.low_confidence is not None and not 0 <= self.low_confidence <= 1:
            out.append(f"--keep-low-confidence={self.low_confidence}: must be in [0, 1]")
        if self.budget_mib < 1:
            out.append(f"--keep-budget-mib={self.budget_mib}: must be >= 1")
        if self.queue < 1:
            out.append(f"--keep-queue={self.queue}: must be >= 1")
        return out


@dataclass
class _Item:
    image: Any  # bytes (as sent) or an [H, W, 3] uint8 array (v2 pixels)
    mask: np.ndarray
    reason: str
    low_confidence: float


class ImageKeeper:
    """Decides which answered images to keep and writes them on its own thread."""

    def __init__(self, settings: KeepSettings, *, model_name: str, class_names: Sequence[str],
                 baseline: Optional[drift.TrainingBaseline] = None, seed: Optional[int] = None):
        self.settings = settings
        self.model_name = model_name
        self.class_names = list(class_names)
        self.threshold = settings.low_confidence
        if self.threshold is None:
            base = baseline.low_confidence_fraction if baseline is not None else float("nan")
            self.threshold = 0.5 if base != base else min(
                1.0, base + drift.DEFAULT_LOW_CONFIDENCE_EXCESS_THRESHOLD)
        self.kept = {"sampled": 0, "low_confidence": 0}
        self.dropped = dict.fromkeys(DROP_REASONS, 0)
        self.stored_bytes = 0
        self._random = random.Random(seed)
        self._queue: "queue.Queue[Optional[_Item]]" = queue.Queue(maxsize=settings.queue)
        self._lock = threading.Lock()
        self._part: List[str] = []
        self._part_name = ""
        self._thread = threading.Thread(target=self._run, name="kubeseg-keep", daemon=True)
        self._thread.start()

    def offer(self, image: Any, mask: np.ndarray, confidence_pixels: Sequence[int]) -> None:
        """Called for every answered image; returns at once."""
        low = drift.low_confidence_fraction(confidence_pixels)
        if low > self.threshold:
            reason = "low_confidence"
        elif self.settings.rate and self._random.random() < self.settings.rate:
            reason = "sampled"
        else:
            return
        try:
            self._queue.put_nowait(_Item(image, mask, reason, low))
        except queue.Full:
            self._drop("queue_full", "the queue of images to keep is full")

    def _drop(self, reason: str, why: str) -> None:
        with self._lock:
            self.dropped[reason] += 1
            count = self.dropped[reason]
        if count == 1 or count % 100 == 0:
            logger.warning("image not kept (%s; %d so far): %s", reason, count, why)

    def close(self, timeout_s: float = 30.0) -> None:
        """Write what is queued, then stop the thread."""
        try:
            self._queue.put(None, timeout=timeout_s)
        except queue.Full:
            return
        self._thread.join(timeout=timeout_s)

    def _run(self) -> None:
        try:
            self.stored_bytes = stored_bytes(self.settings.uri)
        except Exception as exc:  # noqa: BLE001 - counted as 0; the budget still bounds growth
            logger.warning("could not size %s (%s): the budget counts from 0",
                           self.settings.uri, exc)
        budget = self.settings.budget_mib * 2 ** 20
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self.stored_bytes >= budget:
                self._drop("budget", f"{self.settings.uri} holds {self.stored_bytes} bytes, "
                                     f"the budget is {budget} (--keep-budget-mib)")
                continue
            try:
                written = self._write(item)
            except Exception as exc:  # noqa: BLE001 - a failure to store never fails a request
                self._drop("error", f"writing to {self.settings.uri} failed: {exc}")
                continue
            with self._lock:
                self.stored_bytes += written
                self.kept[item.reason] += 1

    def _write(self, item: _Item) -> int:
        """Store one image, its mask and its manifest line; the bytes added."""
        uri = self.settings.uri
        name = f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:8]}"
        data, ext = _image_bytes(item.image)
        image_uri = storage.join(uri, "train", name + ext)
        mask_uri = storage.join(uri, "train_annotation", name + ".png")
        mask = _palette_png(item.mask, len(self.class_names))
        storage.write_bytes(image_uri, data)
        storage.write_bytes(mask_uri, mask, content_type="image/png")
        line = json.dumps(self._manifest_line(image_uri, mask_uri, item))
        return len(data) + len(mask) + self._append(line)

    def _manifest_line(self, image_uri: str, mask_uri: str, item: _Item) -> Dict[str, Any]:
        from kubeseg.report.pictures import palette

        colours = palette(max(1, len(self.class_names)))
        now = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
        return {"source-ref": image_uri, LABEL_ATTRIBUTE: mask_uri,
                f"{LABEL_ATTRIBUTE}-metadata": {
                    "internal-color-map": {str(i): {"class-name": n, "hex-color": "#%02x%02x%02x"
                                                    % tuple(int(v) for v in colours[i])}
                                           for i, n in enumerate(self.class_names)},
                    "type": "groundtruth/semantic-segmentation", "human-annotated": "no",
                    "creation-date": now, "job-name": f"kubeseg-serve-{self.model_name}"},
                "kubeseg-kept": {"model": self.model_name, "reason": item.reason,
                                 "low_confidence_fraction": round(item.low_confidence, 4)}}

    def _append(self, line: str) -> int:
        """Add a line to this process's current manifest part (the part is written whole)."""
        if not self._part_name or len(self._part) >= MANIFEST_LINES:
            self._part_name = (f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-"
                               f"{uuid.uuid4().hex[:8]}.manifest")
            self._part = []
        self._part.append(line)
        storage.write_text(storage.join(self.settings.uri, "manifests", self._part_name),
                           "\n".join(self._part) + "\n")
        return len(line) + 1

    def families(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        with self._lock:
            kept, dropped, stored = dict(self.kept), dict(self.dropped), self.stored_bytes
        counter = CounterMetricFamily(alerts.KEPT_IMAGES[:-len("_total")],
                                      "Served images kept for labelling, by reason",
                                      labels=["model", "reason"])
        for reason, value in kept.items():
            counter.add_metric([self.model_name, reason], value)
        yield counter
        counter = CounterMetricFamily(alerts.KEPT_DROPPED[:-len("_total")],
                                      "Images chosen for keeping but not kept, by reason",
                                      labels=["model", "reason"])
        for reason, value in dropped.items():
            counter.add_metric([self.model_name, reason], value)
        yield counter
        gauge = GaugeMetricFamily(alerts.KEPT_BYTES, "Bytes under the keep prefix (what this "
                                  "server found there and wrote since)", labels=["model"])
        gauge.add_metric([self.model_name], stored)
        yield gauge


def _image_bytes(image: Any):
    """The bytes to store and their extension: encoded images as sent, pixels as PNG."""
    if isinstance(image, (bytes, bytearray)):
        return bytes(image), ".png" if bytes(image[:8]) == b"\x89PNG\r\n\x1a\n" else ".jpg"
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8), "RGB").save(buf, format="PNG")
    return buf.getvalue(), ".png"


def _palette_png(mask: np.ndarray, classes: int) -> bytes:
    from PIL import Image

    from kubeseg.report.pictures import palette

    mask = np.ascontiguousarray(mask, dtype=np.uint8)
    picture = Image.frombytes("P", (mask.shape[1], mask.shape[0]), mask.tobytes())
    colours = palette(max(1, classes))
    picture.putpalette(colours.reshape(-1).tolist() + [0] * (768 - colours.size))
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    return buf.getvalue()


def stored_bytes(uri: str) -> int:
    """The bytes of the objects (files) below ``uri`` (0 where nothing is there yet)."""
    if not storage.is_s3(uri) and not storage.exists(uri):
        return 0
    try:
        return sum(storage.list_sizes(uri).values())
    except storage.StorageError:
        if storage.is_s3(uri):
            raise
        return 0


__all__ = ["KeepSettings", "ImageKeeper", "stored_bytes", "LABEL_ATTRIBUTE", "MANIFEST_LINES"]
