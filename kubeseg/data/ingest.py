"""Ingestion: an augmented manifest or the four-channel layout -> Parquet shards + index.json.

Referenced objects are fetched concurrently (order preserved), masks are converted to
single-channel PNGs of class ids (palette index, Ground Truth colour map, or label map), and
samples are written in their input order into shards of a bounded size. Each shard is written
atomically; ``index.json`` is written last, so an interrupted ingestion leaves no index for
the split. Rerunning it keeps the shards that are already complete (same samples, same
settings) and writes the rest: the result is identical to an uninterrupted run.
"""
from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import io
import json
import logging
import time
from dataclasses import dataclass
from itertools import islice
from typing import Callable, Iterable, Iterator, List, Optional, Sequence, TypeVar

import numpy as np
from PIL import Image

from kubeseg import storage
from kubeseg.data import shards as S
from kubeseg.data.channels import Channels, list_pairs
from kubeseg.data.labelmap import LabelMap
from kubeseg.data.manifest import ColorMap, decode_mask, read_manifest
from kubeseg.errors import DataError, KubesegError

logger = logging.getLogger(__name__)

DEFAULT_SHARD_SIZE_MB = 64
LOG_EVERY = 200

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class SourceItem:
    key: str
    image: str  # URI
    annotation: str  # URI
    where: str  # for messages: "manifest m.jsonl line 7" or the image URI


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int,
                window: Optional[int] = None) -> Iterator[R]:
    """``map(fn, items)`` on a thread pool, in input order, with at most ``window`` in flight."""
    workers = max(1, int(workers))
    window = max(workers, window or workers * 4)
    it = iter(items)
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers)
    try:
        pending = collections.deque(pool.submit(fn, x) for x in islice(it, window))
        while pending:
            result = pending.popleft().result()
            for x in islice(it, 1):
                pending.append(pool.submit(fn, x))
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _encode_png(mask: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(mask, "L").save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def make_fetcher(colour_map: Optional[ColorMap], label_map: Optional[LabelMap]):
    """The per-sample work: read both objects, check them, convert the mask to class ids."""
    identity = label_map is None or label_map.is_identity

    def fetch(item: SourceItem) -> dict:
        try:
            image_bytes = storage.read_bytes(item.image)
            mask_bytes = storage.read_bytes(item.annotation)
        except KubesegError as exc:
            raise DataError(f"{item.where}: {exc}") from None
        try:
            with Image.open(io.BytesIO(image_bytes)) as im:
                width, height = im.size
                if im.format not in ("JPEG", "PNG"):
                    raise DataError(f"{item.where}: image {item.image} is {im.format}; expected "
                                    "JPEG or PNG")
        except DataError:
            raise
        except Exception as exc:
            raise DataError(f"{item.where}: cannot decode image {item.image} ({exc})") from None
        with Image.open(io.BytesIO(mask_bytes)) as m:
            keep_original = m.mode == "L" and identity and m.format == "PNG"
        mask = decode_mask(mask_bytes, colour_map, source=f"{item.where}: {item.annotation}")
        if mask.shape != (height, width):
            raise DataError(f"{item.where}: image {item.image} is {width}x{height} but "
                            f"annotation {item.annotation} is {mask.shape[1]}x{mask.shape[0]}")
        if not identity:
            mask = label_map.apply(mask)
        return {"key": item.key, "image": image_bytes,
                "mask": mask_bytes if keep_original else _encode_png(mask),
                "height": height, "width": width}

    return fetch


def _existing_prefix(output_uri: str, split: str, items: Sequence[SourceItem],
                     fingerprint: str) -> List[dict]:
    """Index entries of the complete shards from an earlier run that match this run's start."""
    try:
        names = set(storage.list_files(output_uri))
    except KubesegError:
        return []
    kept: List[dict] = []
    position = 0
    while True:
        name = S.shard_name(split, len(kept))
        if name not in names:
            break
        entry = S.describe_shard(name, storage.read_bytes(storage.join(output_uri, name)))
        keys = entry["_keys"]
        expected = [it.key for it in items[position:position + len(keys)]]
        if entry["_fingerprint"] != fingerprint or keys != expected or not keys:
            break
        kept.append(entry)
        position += len(keys)
    return kept


def _remove_split_from_index(output_uri: str, split: str) -> dict:
    try:
        index = S.read_index(output_uri, missing_ok=True) or S.empty_index()
    except DataError:
        index = S.empty_index()
    if split in index["splits"]:
        index["splits"].pop(split)
        if index["splits"]:
            S.write_index(output_uri, index)
        else:
            storage.delete(S.index_uri(output_uri))
    return index


def ingest_items(items: Sequence[SourceItem], output_uri: str, *, split: str,
                 fetch: Callable[[SourceItem], dict], fingerprint: str,
                 shard_size_mb: float = DEFAULT_SHARD_SIZE_MB, workers: int = 8,
                 row_group_rows: int = S.DEFAULT_ROW_GROUP_ROWS) -> dict:
    """Write ``items`` as shards of ``split``; returns the split's index entry (not yet in the
    index: the caller writes the index)."""
    if not items:
        raise DataError(f"nothing to ingest for split {split!r}")
    if not shard_size_mb or shard_size_mb <= 0:
        raise DataError(f"shard_size_mb={shard_size_mb}: must be > 0")
    shard_bytes = int(shard_size_mb * 1024 * 1024)
    storage.ensure_bucket(output_uri)
    kept = _existing_prefix(output_uri, split, items, fingerprint)
    done = sum(e["num_samples"] for e in kept)
    if kept:
        logger.info("resuming %s: %d complete shard(s) with %d of %d samples kept", split,
                    len(kept), done, len(items))
    entries = [S.public_entry(e) for e in kept]
    rows: List[dict] = []
    size = 0
    start = time.perf_counter()

    def flush() -> None:
        nonlocal rows, size
        name = S.shard_name(split, len(entries))
        data = S.encode_shard(rows, fingerprint=fingerprint, row_group_rows=row_group_rows)
        storage.write_bytes(storage.join(output_uri, name), data)
        entries.append(S.public_entry(S.describe_shard(name, data)))
        logger.info("wrote %s (%d samples, %.1f MB)", storage.join(output_uri, name), len(rows),
                    len(data) / 2**20)
        rows, size = [], 0

    for n, row in enumerate(ordered_map(fetch, items[done:], workers), start=done + 1):
        rows.append(row)
        size += len(row["image"]) + len(row["mask"]) + len(row["key"])
        if size >= shard_bytes:
            flush()
        if n % LOG_EVERY == 0:
            rate = (n - done) / max(time.perf_counter() - start, 1e-9)
            logger.info("%s: %d/%d samples (%.1f/s)", split, n, len(items), rate)
    if rows:
        flush()
    # Shards left by an earlier, larger run of this split are not part of this one.
    pattern = S.shard_pattern(split)
    for name in storage.list_files(output_uri):
        match = pattern.match(name)
        if match and int(match.group(1)) >= len(entries):
            storage.delete(storage.join(output_uri, name))
    return {"num_samples": len(items), "shards": entries}


def _fingerprint(**settings) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _finish(output_uri: str, split: str, entry: dict, class_names: Optional[List[str]]) -> dict:
    index = S.read_index(output_uri, missing_ok=True) or S.empty_index()
    index["splits"][split] = entry
    if class_names:
        if index.get("class_names") and index["class_names"] != list(class_names):
            logger.warning("class names of split %s differ from those already in %s; using the "
                           "new ones", split, S.index_uri(output_uri))
        index["class_names"] = list(class_names)
        index["num_classes"] = len(class_names)
    S.write_index(output_uri, index)  # last: the split is complete
    logger.info("index %s: split %s with %d samples in %d shard(s)", S.index_uri(output_uri),
                split, entry["num_samples"], len(entry["shards"]))
    return index


def ingest_manifest(manifest_uri: str, output_uri: str, *, split: str = "train",
                    attribute_names: Optional[Sequence[str]] = None,
                    shard_size_mb: float = DEFAULT_SHARD_SIZE_MB, workers: int = 8,
                    skip_bad_lines: bool = False,
                    row_group_rows: int = S.DEFAULT_ROW_GROUP_ROWS) -> dict:
    """Ingest an augmented manifest (SPEC section 4) into shards of ``split`` below
    ``output_uri``; returns the index (also written to ``output_uri/index.json``, last).

    ``attribute_names``: image attribute then label attribute (default: ``source-ref`` and the
    only other ``-ref`` attribute). Bad lines raise a DataError listing them with line numbers,
    unless ``skip_bad_lines`` (then they are logged and left out).
    """
    manifest = read_manifest(manifest_uri, attribute_names=attribute_names)
    if manifest.problems:
        if not skip_bad_lines:
            manifest.raise_if_problems()
        for problem in manifest.problems:
            logger.warning("manifest %s: skipping %s", manifest_uri, problem)
    if not manifest.entries:
        raise DataError(f"manifest {manifest_uri}: no usable lines")
    _remove_split_from_index(output_uri, split)
    items = [SourceItem(e.key, e.image, e.annotation, f"manifest {manifest_uri} line {e.line}")
             for e in manifest.entries]
    colour_map = manifest.colour_map
    fingerprint = _fingerprint(kind="manifest", split=split, shard_bytes=shard_size_mb,
                               rows=row_group_rows,
                               colours=colour_map.to_dict() if colour_map else None)
    entry = ingest_items(items, output_uri, split=split, fetch=make_fetcher(colour_map, None),
                         fingerprint=fingerprint, shard_size_mb=shard_size_mb, workers=workers,
                         row_group_rows=row_group_rows)
    entry["source"] = manifest_uri
    entry["attribute_names"] = list(manifest.attribute_names)
    return _finish(output_uri, split, entry, manifest.class_names)


def ingest_channels(channels: Channels, output_uri: str, *,
                    splits: Optional[Sequence[str]] = None,
                    shard_size_mb: float = DEFAULT_SHARD_SIZE_MB, workers: int = 8,
                    class_names: Optional[Sequence[str]] = None,
                    row_group_rows: int = S.DEFAULT_ROW_GROUP_ROWS) -> dict:
    """Ingest the four-channel layout into shards (masks through the split's label map, so the
    shards hold class ids); returns the index written to ``output_uri/index.json``.

    ``splits``: default every split whose two channels are given. Images without annotation
    (and the reverse) are a DataError: run ``kubeseg validate`` first.
    """
    splits = list(splits) if splits else [s for s in ("train", "validation")
                                          if channels.has_split(s)]
    if not splits:
        raise DataError("no split to ingest: give the train/train_annotation (and optionally "
                        "validation/validation_annotation) channels")
    index = None
    for split in splits:
        if not channels.has_split(split):
            raise DataError(f"split {split!r}: the {split} and {split}_annotation channels are "
                            "both needed")
        pairing = list_pairs(channels.images(split), channels.annotations(split))
        unpaired = pairing.images_without_annotation + pairing.annotations_without_image
        if unpaired:
            raise DataError(f"split {split!r}: {len(unpaired)} image(s)/annotation(s) without a "
                            f"partner, e.g. {', '.join(unpaired[:10])}; run 'kubeseg validate'")
        label_map = LabelMap.load(channels.label_map, split=split)
        _remove_split_from_index(output_uri, split)
        items = [SourceItem(p.key, p.image, p.annotation, p.image) for p in pairing.pairs]
        fingerprint = _fingerprint(kind="channels", split=split, shard_bytes=shard_size_mb,
                                   rows=row_group_rows, label_map=label_map.to_dict())
        entry = ingest_items(items, output_uri, split=split,
                             fetch=make_fetcher(None, label_map), fingerprint=fingerprint,
                             shard_size_mb=shard_size_mb, workers=workers,
                             row_group_rows=row_group_rows)
        entry["source"] = channels.images(split)
        entry["label_map"] = label_map.to_dict()
        index = _finish(output_uri, split, entry, list(class_names) if class_names else None)
    return index
