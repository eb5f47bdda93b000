"""Batch prediction: score every image under a prefix (or in a manifest), one output per image.

The answer for each image is the one ``POST /invocations`` gives: the same decoding
(:func:`kubeseg.serving.codecs.decode_image`), the same :class:`SegmentationPredictor`
(pre-processing, forward pass, resizing back) and the same encoders, chosen from an ``Accept``
value as the server chooses them. Output ``<output>/<key without extension>.<ext>`` for input
``<input>/<key>``: ``.png`` masks (class ids, the annotation layout of the dataset channels),
``.recordio`` probabilities, or ``.json``.

How it runs:

- Streaming: keys are listed lazily, and at most ``workers`` images are in flight (read,
  decoded, waiting for the model, or being encoded and written), so memory does not grow with
  the size of the set.
- Overlap: reading, decoding, encoding and writing happen on a thread pool while the forward
  passes run on one thread of their own (:class:`kubeseg.serving.predictor.BatchRunner`), which
  scores same-size images that are waiting together as one batch (up to ``batch_size``), on the
  GPU when there is one.
- Resumable: an image whose output exists is skipped; outputs are written atomically, so a
  killed run leaves whole outputs or none, and a rerun finishes only the rest.
- A bad image (unreadable, not JPEG/PNG, too large) is reported with its key and skipped.
- At the end ``<output>/_batch_summary.json`` holds the counts, images/s and the failures,
  and under ``monitoring`` what the server's /metrics counts of its predictions (pixels per
  class, the confidence histogram, image sizes) over the images scored in this run, with their
  drift statistics against the model's training baseline
  (:meth:`kubeseg.serving.monitor.PredictionMonitor.summary`).
"""
from __future__ import annotations

import concurrent.futures
import json
import logging
import posixpath
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

from kubeseg import storage
from kubeseg.errors import ConfigError, DataError, KubesegError
from kubeseg.serving import codecs
from kubeseg.serving.defaults import DEFAULT_BATCH_SIZE, SUMMARY_FILE
from kubeseg.serving.predictor import (DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_MAX_PIXELS,
                                       DEFAULT_TILE_SIZE)

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
OUTPUT_EXTENSIONS = {codecs.PNG: ".png", codecs.RECORDIO_PROTOBUF: ".recordio",
                     codecs.PROTOBUF: ".recordio", codecs.JSON: ".json"}
SUMMARY_METRICS = ("scored", "skipped_existing", "failed", "images_per_second")


@dataclass
class _Counts:
    scored: int = 0
    skipped: int = 0
    failed: int = 0
    ignored: int = 0
    failures: List[Dict[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def output_key(key: str, accept: str) -> str:
    """The output's key for an input key: its extension replaced by the encoding's."""
    media = codecs.choose_response_type(accept)
    stem, _ = posixpath.splitext(key)
    return stem + OUTPUT_EXTENSIONS[media.type]


def iter_inputs(input_uri: str, *, manifest: bool = False) -> Iterator[Tuple[str, str]]:
    """``(key, uri)`` of every input, lazily.

    A prefix or folder: every file below it (key = its path relative to the prefix). With
    ``manifest=True``, ``input_uri`` is a manifest file: a SageMaker manifest (a JSON list
    ``[{"prefix": URI}, "key", ...]``) or an augmented manifest (JSON Lines with
    ``source-ref``; key = the object's path inside its bucket or folder).
    """
    if manifest:
        yield from _iter_manifest(input_uri)
        return
    if storage.is_s3(input_uri):
        bucket, key = storage.split_s3(input_uri)
        prefix = key.rstrip("/") + "/" if key else ""
        settings = storage.S3Settings.from_env()
        objects = storage.client(settings).list_objects(bucket, prefix=prefix, recursive=True)
        try:
            for obj in objects:  # the client pages through the listing as it is consumed
                if not obj.is_dir:
                    relative = obj.object_name[len(prefix):]
                    yield relative, f"s3://{bucket}/{obj.object_name}"
        except Exception as exc:  # noqa: BLE001 - minio raises several types
            raise KubesegError(f"cannot list {input_uri}: {exc}") from None
        return
    import os
    from pathlib import Path

    root = Path(input_uri)
    if not root.is_dir():
        raise DataError(f"input folder not found: {input_uri} (give a folder, an s3:// prefix, "
                        "or --manifest with a manifest file)")
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith("."):
                path = Path(dirpath, name)
                yield path.relative_to(root).as_posix(), str(path)


def _iter_manifest(uri: str) -> Iterator[Tuple[str, str]]:
    text = storage.read_text(uri)
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            entries = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"manifest {uri}: not valid JSON ({exc})") from None
        if not entries or not isinstance(entries[0], dict) or "prefix" not in entries[0]:
            raise DataError(f"manifest {uri}: a JSON list must start with "
                            '{"prefix": "s3://bucket/prefix/"}')
        prefix = str(entries[0]["prefix"])
        for index, entry in enumerate(entries[1:], start=1):
            if not isinstance(entry, str) or not entry:
                raise DataError(f"manifest {uri}: entry {index} must be a key (a string), "
                                f"got {entry!r}")
            yield entry, storage.join(prefix, entry)
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            source = json.loads(line)["source-ref"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DataError(f"manifest {uri} line {number}: expected a JSON object with "
                            "'source-ref' (the image URI)") from None
        if storage.is_s3(source):
            key = storage.split_s3(source)[1]
        else:
            key = str(source).lstrip("/")
        yield key, str(source)


@dataclass(frozen=True)
class BatchOptions:
    """How a batch run scores: ``device``, ``max_pixels``, ``tile_size``,
    ``max_image_pixels``, ``precision`` and ``threads`` as ``kubeseg serve`` takes them
    (defaults: the server's; ``tile_size=None`` turns tiling off); ``workers``: images in flight
    (default ``2 * batch_size``); ``progress``: a progress bar on stderr."""

    workers: Optional[int] = None
    device: Optional[str] = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    tile_size: Optional[int] = DEFAULT_TILE_SIZE
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    precision: str = "float32"
    threads: Optional[int] = None
    progress: bool = True

    def load_predictor(self, model_uri: str):
        from kubeseg.serving.predictor import Runtime, SegmentationPredictor

        runtime = Runtime(device=self.device, precision=self.precision, threads=self.threads)
        return SegmentationPredictor(model_uri, max_pixels=self.max_pixels,
                                     tile_size=self.tile_size, runtime=runtime)


def batch_predict(model_uri: str, input_uri: str, output_uri: str, *,
                  accept: str = codecs.PNG, manifest: bool = False,
                  batch_size: int = DEFAULT_BATCH_SIZE,
                  options: BatchOptions = BatchOptions(), predictor=None) -> Dict[str, Any]:
    """Score every image of ``input_uri`` with the model at ``model_uri`` into ``output_uri``.

    ``accept``: an Accept value as ``/invocations`` takes (``image/png``,
    ``application/x-recordio-protobuf``, ``application/json``, ``application/json;
    output=probabilities``). ``options``: workers, device and the server's image limits
    (:class:`BatchOptions`). ``predictor``: a loaded :class:`SegmentationPredictor` to use
    instead of loading ``model_uri``. Returns the summary also written to
    ``<output>/_batch_summary.json``.
    """
    from kubeseg.serving.monitor import MonitoringSettings, monitor_for
    from kubeseg.serving.predictor import BatchRunner

    media, workers = _check_options(input_uri, output_uri, accept, manifest, batch_size,
                                    options.workers)
    if predictor is None:
        predictor = options.load_predictor(model_uri)
    if not predictor.ready:
        predictor.load()
    done = _existing_outputs(output_uri)
    batch = _Batch(predictor=predictor, runner=BatchRunner(predictor, max_batch_size=batch_size),
                   media=media, probabilities=codecs.wants_probabilities(media),
                   class_names=predictor.class_names, output_uri=output_uri,
                   max_image_pixels=options.max_image_pixels,
                   bar=_progress_bar(options.progress),
                   monitor=monitor_for(predictor, MonitoringSettings()))
    started = time.perf_counter()
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers,
                                                 thread_name_prefix="kubeseg-batch")
    try:
        _dispatch(batch, iter_inputs(input_uri, manifest=manifest), done, pool, workers)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        batch.runner.close()
        batch.bar.close()
    seconds = time.perf_counter() - started
    summary = _summary(batch, model_uri, input_uri, seconds, batch_size)
    storage.write_text(storage.join(output_uri, SUMMARY_FILE),
                       json.dumps(summary, indent=2) + "\n")
    return summary


def _check_options(input_uri: str, output_uri: str, accept: str, manifest: bool,
                   batch_size: int, workers: Optional[int]) -> Tuple[codecs.MediaType, int]:
    """The response type and the number of images in flight; ConfigError listing every bad
    option."""
    problems = []
    media = None
    try:
        media = codecs.choose_response_type(accept)
        codecs.wants_probabilities(media)
    except codecs.RequestError as exc:
        problems.append(f"--accept {accept!r}: {exc}")
    if batch_size < 1:
        problems.append(f"batch_size={batch_size}: must be >= 1")
    workers = workers or 2 * max(1, batch_size)
    if workers < 1:
        problems.append(f"workers={workers}: must be >= 1")
    if not manifest and _inside(output_uri, input_uri):
        problems.append(f"output {output_uri} is inside the input {input_uri}: a rerun would "
                        "take the outputs for images; give a prefix or folder beside it")
    if problems:
        raise ConfigError(problems, what="option")
    return media, workers


@dataclass
class _Batch:
    """What the scoring threads share: the model, where outputs go, the counts."""

    predictor: Any  # SegmentationPredictor
    runner: Any  # BatchRunner: the forward passes, on a thread of their own
    media: codecs.MediaType
    probabilities: bool  # what the Accept value asks for
    class_names: List[str]
    output_uri: str
    max_image_pixels: int
    bar: Any
    counts: _Counts = field(default_factory=_Counts)
    monitor: Any = None  # kubeseg.serving.monitor.PredictionMonitor

    def fail(self, key: str, error: str) -> None:
        logger.warning("skipped %s: %s", key, error)
        with self.counts.lock:
            self.counts.failed += 1
            self.counts.failures.append({"key": key, "error": error})

    def score(self, key: str, source: str, target: str) -> None:
        predictor = self.predictor
        try:
            data = storage.read_bytes(source)
            image = codecs.decode_image(data, max_image_pixels=self.max_image_pixels)
            size = (image.height, image.width)
            tensor = predictor.preprocess(image)
            del image, data
            logits = self.runner.submit(tensor).result()
            prediction = predictor.postprocess(logits, size, probabilities=self.probabilities,
                                               counts=True)
            self.monitor.observe(prediction.counts, size)
            payload = codecs.encode_prediction(prediction, self.media, self.class_names)
            storage.write_bytes(storage.join(self.output_uri, target), payload)
        except (KubesegError, OSError, ValueError) as exc:
            # the codecs speak of requests; here the image is a file
            self.fail(key, str(exc).replace("the request body", "the file"))
            return
        with self.counts.lock:
            self.counts.scored += 1
        self.bar.update(1)


def _dispatch(batch: _Batch, inputs: Iterator[Tuple[str, str]], done: set,
              pool: concurrent.futures.Executor, workers: int) -> None:
    """Submit every input image not done yet, keeping at most ``workers`` in flight."""
    counts = batch.counts
    claimed: Dict[str, str] = {}  # output key -> input key (two inputs may share a stem)
    in_flight: set = set()
    for key, source in inputs:
        if not key.lower().endswith(IMAGE_EXTENSIONS):
            counts.ignored += 1
            continue
        target = output_key(key, batch.media.type)
        if target == SUMMARY_FILE:
            batch.fail(key, f"its output would overwrite the run summary {SUMMARY_FILE}")
            continue
        if target in claimed:
            batch.fail(key, f"its output {target} is also the output of {claimed[target]}: "
                            "rename one of the two")
            continue
        claimed[target] = key
        if target in done:
            counts.skipped += 1
            batch.bar.update(1)
            continue
        while len(in_flight) >= workers:
            finished, in_flight = concurrent.futures.wait(
                in_flight, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in finished:
                future.result()
        in_flight.add(pool.submit(batch.score, key, source, target))
    for future in concurrent.futures.as_completed(in_flight):
        future.result()


def _summary(batch: _Batch, model_uri: str, input_uri: str, seconds: float,
             batch_size: int) -> Dict[str, Any]:
    counts, runner, output_uri = batch.counts, batch.runner, batch.output_uri
    return {
        "model": model_uri, "input": input_uri, "output": output_uri,
        "accept": batch.media.type, "summary_uri": storage.join(output_uri, SUMMARY_FILE),
        "images": counts.scored + counts.skipped + counts.failed,
        "scored": counts.scored, "skipped_existing": counts.skipped, "failed": counts.failed,
        "ignored_not_images": counts.ignored,
        "seconds": round(seconds, 3),
        "images_per_second": round(counts.scored / seconds, 3) if seconds > 0 else None,
        "device": str(batch.predictor.device), "batch_size": batch_size,
        "mean_batch": round(runner.items / runner.batches, 2) if runner.batches else None,
        "failures": sorted(counts.failures, key=lambda f: f["key"]),
        "monitoring": batch.monitor.summary(),
    }


def publish_batch_summary(summary: Mapping[str, Any], metrics: Any) -> None:
    """Record a :func:`batch_predict` summary in a pipeline step's Metrics artifact (KFP's, or
    anything shaped like it): the counts and images/s, and where the full summary is."""
    for key in SUMMARY_METRICS:
        if summary.get(key) is not None:
            metrics.log_metric(key, float(summary[key]))
    metrics.metadata["summary_uri"] = summary["summary_uri"]


def _inside(uri: str, parent: str) -> bool:
    """Whether ``uri`` is ``parent`` or below it (both s3:// or both local)."""
    if storage.is_s3(uri) != storage.is_s3(parent):
        return False
    if storage.is_s3(uri):
        return (uri.rstrip("/") + "/").startswith(parent.rstrip("/") + "/")
    from pathlib import Path

    child, root = Path(uri).resolve(), Path(parent).resolve()
    return child == root or root in child.parents


def _existing_outputs(output_uri: str) -> set:
    """Keys already written below ``output_uri`` (a rerun skips them)."""
    if not storage.is_s3(output_uri) and not storage.exists(output_uri):
        return set()
    try:
        return set(storage.list_files(output_uri))
    except KubesegError:
        return set()


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(unit="img", desc="batch prediction", dynamic_ncols=True, file=sys.stderr,
                mininterval=0.5 if sys.stderr.isatty() else 10.0)


__all__ = ["batch_predict", "BatchOptions", "publish_batch_summary", "iter_inputs", "output_key",
           "SUMMARY_FILE", "SUMMARY_METRICS", "DEFAULT_BATCH_SIZE"]
