"""Ingestion: an augmented manifest or the four-channel layout -> Parquet shards + index.json.

A manifest is checked before anything is fetched: every bad line is listed at once (malformed
JSON, a missing attribute, an unusable URI, a colour map that conflicts with an earlier line's,
and referenced objects that do not exist: one concurrent existence check per object, nothing
downloaded). Ingestion then fails with the whole list, or, with ``skip_bad_lines``, leaves those
lines out. Either way they are written into the split's ingestion report,
``<output>/<split>-ingest-report.json``, together with the repeated lines (kept) and every
mask value found in no colour map (with its line and pixel count). Such values fail the
ingestion, after the whole manifest has been read so that all of them are listed, unless
``unknown_colours_as_ignore`` turns them into ignore (255).

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
from dataclasses import dataclass, field
from itertools import islice
from typing import (Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple,
                    TypeVar)

import numpy as np
from PIL import Image

from kubeseg import storage
from kubeseg.data import shards as S
from kubeseg.data.channels import Channels, list_pairs
from kubeseg.data.labelmap import LabelMap
from kubeseg.data.manifest import (ClassColours, ColorMap, LineProblem, Manifest,
                                   ManifestEntry, decode_manifest_mask, decode_mask,
                                   describe_problems, read_manifest)
from kubeseg.errors import DataError, KubesegError

logger = logging.getLogger(__name__)

DEFAULT_SHARD_SIZE_MB = 64
LOG_EVERY = 200
REPORT_FORMAT = "kubeseg-ingest-report"
MAX_LOGGED = 20

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class SourceItem:
    key: str
    image: str  # URI
    annotation: str  # URI
    where: str  # for messages: "manifest m.jsonl line 7" or the image URI
    line: Optional[int] = None  # manifest line
    colour_map: Optional[ColorMap] = None  # the manifest line's own colour map


def report_name(split: str) -> str:
    return f"{split}-ingest-report.json"


@dataclass
class IngestReport:
    """What ingesting a manifest found: written to ``<output>/<split>-ingest-report.json``."""

    manifest: str
    split: str
    attribute_names: List[str] = field(default_factory=list)
    lines: int = 0
    samples: int = 0
    bad_lines: List[LineProblem] = field(default_factory=list)
    bad_lines_skipped: bool = False
    repeated_lines: List[dict] = field(default_factory=list)  # {line, first_line, image}
    unknown_colours: List[dict] = field(default_factory=list)  # {line, key, annotation, ...}
    unknown_colours_as_ignore: bool = False
    class_names: Optional[List[str]] = None
    metadata_keys: List[str] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)
    ok: bool = False

    @property
    def unknown_colour_pixels(self) -> int:
        return sum(n["pixels"] for n in self.unknown_colours)

    def to_dict(self) -> dict:
        return {"format": REPORT_FORMAT, "ok": self.ok, "manifest": self.manifest,
                "split": self.split, "attribute_names": self.attribute_names,
                "lines": self.lines, "samples": self.samples,
                "num_bad_lines": len({p.line for p in self.bad_lines}),
                "bad_lines_skipped": self.bad_lines_skipped,
                "bad_lines": [p.to_dict() for p in self.bad_lines],
                "num_repeated_lines": len(self.repeated_lines),
                "repeated_lines": self.repeated_lines,
                "num_lines_with_unknown_colours": len(self.unknown_colours),
                "unknown_colour_pixels": self.unknown_colour_pixels,
                "unknown_colours_as_ignore": self.unknown_colours_as_ignore,
                "unknown_colours": self.unknown_colours,
                "class_names": self.class_names, "metadata_keys_searched": self.metadata_keys,
                "warnings": self.warnings}

    def write(self, output_uri: str) -> str:
        uri = storage.join(output_uri, report_name(self.split))
        storage.write_text(uri, json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n")
        return uri


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


def _read_pair(item: SourceItem):
    """(image bytes, mask bytes, width, height) of an item, the image checked."""
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
    return image_bytes, mask_bytes, width, height


def _check_size(item: SourceItem, mask: np.ndarray, width: int, height: int) -> None:
    if mask.shape != (height, width):
        raise DataError(f"{item.where}: image {item.image} is {width}x{height} but "
                        f"annotation {item.annotation} is {mask.shape[1]}x{mask.shape[0]}")


def make_fetcher(label_map: Optional[LabelMap]):
    """The per-sample work for channels: read both objects, check them, apply the label map."""
    identity = label_map is None or label_map.is_identity

    def fetch(item: SourceItem) -> dict:
        image_bytes, mask_bytes, width, height = _read_pair(item)
        with Image.open(io.BytesIO(mask_bytes)) as m:
            keep_original = m.mode == "L" and identity and m.format == "PNG"
        mask = decode_mask(mask_bytes, source=f"{item.where}: {item.annotation}")
        _check_size(item, mask, width, height)
        if not identity:
            mask = label_map.apply(mask)
        return {"key": item.key, "image": image_bytes,
                "mask": mask_bytes if keep_original else _encode_png(mask),
                "height": height, "width": width}

    return fetch


def make_manifest_fetcher(classes: Optional[ClassColours], *, looked_at: Sequence[str] = (),
                          unknown_colours_as_ignore: bool = False):
    """The per-sample work for manifest lines: read both objects, check them, convert the mask
    to merged class ids. Mask values found in no colour map go into the row's ``_notes``; the
    row is left out (``_leave_out``) unless ``unknown_colours_as_ignore``."""

    def fetch(item: SourceItem) -> dict:
        image_bytes, mask_bytes, width, height = _read_pair(item)
        decoded = decode_manifest_mask(mask_bytes, classes, item.colour_map,
                                       source=f"{item.where}: {item.annotation}",
                                       looked_at=looked_at)
        _check_size(item, decoded.classes, width, height)
        row = {"key": item.key, "image": image_bytes, "mask": _encode_png(decoded.classes),
               "height": height, "width": width}
        if decoded.unknown:
            row["_notes"] = [{"line": item.line, "key": item.key,
                              "annotation": item.annotation, "values": decoded.unknown,
                              "pixels": sum(decoded.unknown.values()),
                              "action": "ignore" if unknown_colours_as_ignore else "fail"}]
            row["_leave_out"] = not unknown_colours_as_ignore
        return row

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
    notes: List[dict] = [note for e in kept for note in e["_notes"]]
    rows: List[dict] = []
    shard_notes: List[dict] = []
    size = 0
    start = time.perf_counter()

    def flush() -> None:
        nonlocal rows, size, shard_notes
        name = S.shard_name(split, len(entries))
        data = S.encode_shard(rows, fingerprint=fingerprint, row_group_rows=row_group_rows,
                              notes=shard_notes)
        storage.write_bytes(storage.join(output_uri, name), data)
        entries.append(S.public_entry(S.describe_shard(name, data)))
        logger.info("wrote %s (%d samples, %.1f MB)", storage.join(output_uri, name), len(rows),
                    len(data) / 2**20)
        rows, size, shard_notes = [], 0, []

    for n, row in enumerate(ordered_map(fetch, items[done:], workers), start=done + 1):
        notes.extend(row.get("_notes", ()))
        if row.get("_leave_out"):
            continue  # a later shard then holds other keys than a clean run: not resumed
        shard_notes.extend(row.get("_notes", ()))
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
    return {"num_samples": sum(e["num_samples"] for e in entries), "shards": entries,
            "_notes": notes}


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


def check_objects(entries: Sequence[ManifestEntry], attribute_names: Sequence[str], *,
                  workers: int = 8) -> List[LineProblem]:
    """One concurrent existence check per referenced object (nothing is downloaded); a
    problem for each line whose image or annotation does not exist or cannot be checked."""
    uris = sorted({u for e in entries for u in (e.image, e.annotation)})

    def check(uri: str):
        try:
            return storage.exists(uri), None
        except KubesegError as exc:
            return False, str(exc)

    found = dict(zip(uris, ordered_map(check, uris, max(1, workers) * 2)))
    problems = []
    for entry in entries:
        for attribute, uri in zip(attribute_names, (entry.image, entry.annotation)):
            exists, error = found[uri]
            if not exists:
                problems.append(LineProblem(entry.line, "missing_object", (
                    f"{attribute} {uri} does not exist" if error is None
                    else f"{attribute} {uri} cannot be checked: {error}")))
    return problems


def _known_classes(output_uri: str, split: str) -> Optional[List[str]]:
    """Class names of the shard set's other splits: the manifest's classes keep their index."""
    try:
        index = S.read_index(output_uri, missing_ok=True)
    except DataError:
        return None
    if not index or not index.get("class_names") or not set(index["splits"]) - {split}:
        return None
    return list(index["class_names"])


def _maps_fingerprint(entries: Sequence[ManifestEntry]) -> str:
    distinct: Dict[int, int] = {}
    maps, lines = [], []
    for e in entries:
        if e.colour_map is None:
            lines.append(None)
            continue
        if id(e.colour_map) not in distinct:
            distinct[id(e.colour_map)] = len(maps)
            maps.append(e.colour_map.to_dict())
        lines.append(distinct[id(e.colour_map)])
    return _fingerprint(maps=maps, lines=lines)


def _describe_unknown(notes: Sequence[dict], limit: int, report_uri: str) -> str:
    ordered = sorted(notes, key=lambda n: n["line"])
    text = "\n".join(
        f"  - line {n['line']} ({n['annotation']}): "
        + ", ".join(f"{value} ({pixels} px)" for value, pixels in sorted(n["values"].items()))
        for n in ordered[:limit])
    more = f"\n  ... and {len(ordered) - limit} more line(s)" if len(ordered) > limit else ""
    return f"{text}{more}\n(every line in {report_uri})"


@dataclass(frozen=True)
class ManifestLeniency:
    """What a manifest ingestion leaves out, or makes ignore, instead of failing."""

    skip_bad_lines: bool = False  # leave bad lines out (the report still lists them)
    unknown_colours_as_ignore: bool = False  # mask values found in no colour map become 255


def _usable_entries(manifest: Manifest, report: IngestReport, output_uri: str, *,
                    skip_bad_lines: bool, workers: int) -> List[ManifestEntry]:
    """The manifest's entries whose objects exist; bad lines raise one DataError listing
    them all, unless ``skip_bad_lines`` (then they are left out and logged)."""
    problems = manifest.problems + check_objects(manifest.entries, manifest.attribute_names,
                                                 workers=workers)
    if not problems:
        return manifest.entries
    report.bad_lines = sorted(problems, key=lambda p: p.line)
    if not skip_bad_lines:
        raise DataError(describe_problems(manifest.source, problems, report.write(output_uri)))
    report.bad_lines_skipped = True
    bad = {p.line for p in problems}
    logger.warning("manifest %s: leaving out %d bad line(s):\n%s", manifest.source, len(bad),
                   "\n".join(f"  - {p}" for p in report.bad_lines[:MAX_LOGGED])
                   + (f"\n  ... all in {report_name(report.split)}"
                      if len(report.bad_lines) > MAX_LOGGED else ""))
    return [e for e in manifest.entries if e.line not in bad]


def _note_warnings(report: IngestReport, manifest: Manifest,
                   entries: Sequence[ManifestEntry]) -> None:
    """Repeated lines and missing class names go into the report's warnings, and the log."""
    report.repeated_lines = [{"line": e.line, "first_line": e.repeat_of, "image": e.image}
                             for e in entries if e.repeat_of is not None]
    if report.repeated_lines:
        report.warnings.append(
            f"{len(report.repeated_lines)} repeated line(s) kept (each is trained on as often "
            "as it appears): " + ", ".join(f"line {r['line']} repeats line {r['first_line']}"
                                           for r in report.repeated_lines[:MAX_LOGGED])
            + (" ..." if len(report.repeated_lines) > MAX_LOGGED else ""))
    if manifest.class_names_warning():
        report.warnings.append(manifest.class_names_warning())
    for warning in report.warnings:
        logger.warning("manifest %s: %s", manifest.source, warning)


def _check_unknown_colours(report: IngestReport, report_uri: str) -> None:
    """Mask values found in no colour map: a DataError listing every such line, or (made
    ignore) a warning."""
    if not report.unknown_colours:
        return
    if not report.unknown_colours_as_ignore:
        raise DataError(
            f"manifest {report.manifest}: {len(report.unknown_colours)} line(s) have mask "
            f"values found in no colour map ({report.unknown_colour_pixels} pixels); add "
            "them to the lines' internal-color-map, or turn them into ignore (255) with "
            "--unknown-colours-as-ignore:\n"
            + _describe_unknown(report.unknown_colours, 200, report_uri))
    logger.warning("manifest %s: %d pixel(s) on %d line(s) had mask values found in no "
                   "colour map and became ignore (255):\n%s", report.manifest,
                   report.unknown_colour_pixels, len(report.unknown_colours),
                   _describe_unknown(report.unknown_colours, MAX_LOGGED, report_uri))


def _manifest_fetch(manifest: Manifest, entries: Sequence[ManifestEntry], *, split: str,
                    shard_size_mb: float, row_group_rows: int,
                    unknown_colours_as_ignore: bool) -> Tuple[Callable[[SourceItem], dict], str]:
    """(fetch, fingerprint) for the manifest's entries: a rerun with other settings, colour
    maps or lines writes new shards."""
    classes = manifest.classes
    fingerprint = _fingerprint(kind="manifest", split=split, shard_bytes=shard_size_mb,
                               rows=row_group_rows,
                               colours=classes.to_dict() if classes else None,
                               maps=_maps_fingerprint(entries),
                               unknown_as_ignore=unknown_colours_as_ignore)
    fetch = make_manifest_fetcher(classes, looked_at=manifest.metadata_keys,
                                  unknown_colours_as_ignore=unknown_colours_as_ignore)
    return fetch, fingerprint


def ingest_manifest(manifest_uri: str, output_uri: str, *, split: str = "train",
                    attribute_names: Optional[Sequence[str]] = None,
                    shard_size_mb: float = DEFAULT_SHARD_SIZE_MB, workers: int = 8,
                    leniency: ManifestLeniency = ManifestLeniency(),
                    row_group_rows: int = S.DEFAULT_ROW_GROUP_ROWS) -> dict:
    """Ingest an augmented manifest (SPEC section 4) into shards of ``split`` below
    ``output_uri``; returns the index (also written to ``output_uri/index.json``, last).

    ``attribute_names``: image attribute then label attribute (default: ``source-ref`` and the
    only other ``-ref`` attribute). Before anything is fetched, every bad line is listed (see
    the module's description); they raise one DataError listing them all, unless
    ``leniency.skip_bad_lines`` (then they are left out). Mask values found in no colour map
    raise a DataError listing every such line, unless ``leniency.unknown_colours_as_ignore``
    (then their pixels become ignore). The report ``<output>/<split>-ingest-report.json``
    records all of it.
    """
    as_ignore = leniency.unknown_colours_as_ignore
    manifest = read_manifest(manifest_uri, attribute_names=attribute_names,
                             known_classes=_known_classes(output_uri, split))
    report = IngestReport(manifest=manifest_uri, split=split,
                          attribute_names=list(manifest.attribute_names),
                          lines=manifest.num_lines, class_names=manifest.class_names,
                          metadata_keys=list(manifest.metadata_keys),
                          unknown_colours_as_ignore=as_ignore)
    storage.ensure_bucket(output_uri)
    entries = _usable_entries(manifest, report, output_uri,
                              skip_bad_lines=leniency.skip_bad_lines, workers=workers)
    _note_warnings(report, manifest, entries)
    if not entries:
        report.write(output_uri)
        raise DataError(f"manifest {manifest_uri}: no usable lines")
    _remove_split_from_index(output_uri, split)
    items = [SourceItem(e.key, e.image, e.annotation, f"manifest {manifest_uri} line {e.line}",
                        e.line, e.colour_map) for e in entries]
    fetch, fingerprint = _manifest_fetch(manifest, entries, split=split,
                                         shard_size_mb=shard_size_mb,
                                         row_group_rows=row_group_rows,
                                         unknown_colours_as_ignore=as_ignore)
    entry = ingest_items(items, output_uri, split=split, fetch=fetch, fingerprint=fingerprint,
                         shard_size_mb=shard_size_mb, workers=workers,
                         row_group_rows=row_group_rows)
    report.unknown_colours = sorted(entry.pop("_notes"), key=lambda n: n["line"])
    report.samples = entry["num_samples"]
    report.ok = not report.unknown_colours or as_ignore
    _check_unknown_colours(report, report.write(output_uri))
    entry.update(source=manifest_uri, attribute_names=list(manifest.attribute_names),
                 report=report_name(split),
                 skipped_lines=len({p.line for p in report.bad_lines}),
                 repeated_lines=len(report.repeated_lines),
                 unknown_colour_pixels=report.unknown_colour_pixels)
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
                             fetch=make_fetcher(label_map), fingerprint=fingerprint,
                             shard_size_mb=shard_size_mb, workers=workers,
                             row_group_rows=row_group_rows)
        entry.pop("_notes")
        entry["source"] = channels.images(split)
        entry["label_map"] = label_map.to_dict()
        index = _finish(output_uri, split, entry, list(class_names) if class_names else None)
    return index
