"""Dataset validation before training (SPEC section 3): problems, histogram, size statistics.

Every image/annotation pair is read and checked concurrently. Fatal problems: a missing or
empty channel, an image without annotation (or the reverse), an unreadable or truncated file,
an annotation that is not single-channel, an image/annotation size mismatch, label values
>= num_classes that are not ignore (255) after the label map, an annotation that is not a PNG
(a JPEG renamed .png: lossy, so its class ids are noise), a special file (FIFO, device) where a
file was expected (reported, never opened). Warnings: classes without pixels, files with other
extensions, and pixel values that the label map turns into ignore, of two sorts:

- the label map's gaps: values 0..num_classes it leaves out, such as CamVid's void 11 right
  after its classes 0..10. Expected: one warning per split with their pixel counts and a few of
  the files;
- unexplained values: values above num_classes that no entry maps (a stray 50 or 200 in an
  11-class dataset), most likely broken annotations. One problem per file, with the values
  and their pixel counts; fatal with ``strict_labels`` (``kubeseg validate --strict-labels``).

Every problem names its key, and its message the file or the storage error behind it. The
report, the CLI and report.md show problems grouped: the same problem over many keys is one
line with the count, a few example keys and, for pixel values, their pixel counts in all.
"""
from __future__ import annotations

import io
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from kubeseg import storage
from kubeseg.config import IGNORE_INDEX, value_problem
from kubeseg.data.channels import Channels, Pair, Pairing, list_pairs
from kubeseg.data.labelmap import LabelMap
from kubeseg.errors import DataError, KubesegError

logger = logging.getLogger(__name__)

FATAL = "fatal"
WARNING = "warning"
LOG_EVERY = 100
MAX_LISTED = 20
MAX_MESSAGE = 300  # characters of a problem's message repeated in the failure
MAX_EXAMPLES = 3  # keys named in the line of a group of warnings
GAP = "label_map_gap"  # values 0..num_classes the label map leaves out: become ignore
UNEXPLAINED = "unexplained_label_values"  # values above num_classes no entry maps


@dataclass(frozen=True)
class Problem:
    severity: str  # "fatal" or "warning"
    kind: str  # e.g. missing_annotation, corrupt_image, annotation_not_single_channel
    channel: str  # the channel the key belongs to
    key: str  # sample key (file name without extension) or the channel/class concerned
    message: str
    # pixels per raw value, for problems about pixel values
    pixels: Optional[Dict[int, int]] = field(default=None, compare=False)

    def to_dict(self) -> dict:
        out = {"severity": self.severity, "kind": self.kind, "channel": self.channel,
               "key": self.key, "message": self.message}
        if self.pixels is not None:
            out["pixels"] = {str(v): n for v, n in self.pixels.items()}
        return out


@dataclass(frozen=True)
class ProblemGroup:
    """Problems of one severity, kind and channel, over any number of keys: one line."""

    severity: str
    kind: str
    channel: str
    keys: List[str]
    message: str  # the first problem's
    pixels: Optional[Dict[int, int]] = None  # summed over the group's problems

    def line(self) -> str:
        if len(self.keys) == 1:
            return f"{self.severity}: {self.kind} {self.keys[0]}: {self.message}"
        shown = MAX_LISTED if self.severity == FATAL else MAX_EXAMPLES
        examples = ", ".join(self.keys[:shown]) + (", ..." if len(self.keys) > shown else "")
        pixels = (f"; pixel values {self.pixels} (value: pixels) in all" if self.pixels
                  else "")
        return (f"{self.severity}: {self.kind} in {len(self.keys)} keys of {self.channel} "
                f"(e.g. {examples}){pixels}; the first: {self.message}")

    def to_dict(self) -> dict:
        out = {"severity": self.severity, "kind": self.kind, "channel": self.channel,
               "count": len(self.keys), "examples": self.keys[:MAX_LISTED],
               "message": self.message}
        if self.pixels is not None:
            out["pixels"] = {str(v): n for v, n in self.pixels.items()}
        return out


def group_problems(problems: Sequence[Problem]) -> List[ProblemGroup]:
    """One group per (severity, kind, channel): fatal first, then unexplained label values,
    then the other warnings, each in the order of their first problem."""
    groups: Dict[Tuple[str, str, str], List[Problem]] = {}
    for p in problems:
        groups.setdefault((p.severity, p.kind, p.channel), []).append(p)

    def rank(item) -> int:
        (severity, kind, _), _ = item
        return 0 if severity == FATAL else 1 if kind == UNEXPLAINED else 2

    out = []
    for (severity, kind, channel), members in sorted(groups.items(), key=rank):
        counted = [p.pixels for p in members if p.pixels]
        pixels = None
        if counted:
            pixels = {}
            for values in counted:
                for v, n in values.items():
                    pixels[v] = pixels.get(v, 0) + n
            pixels = dict(sorted(pixels.items()))
        out.append(ProblemGroup(severity, kind, channel, [p.key for p in members],
                                members[0].message, pixels))
    return out


@dataclass
class ItemResult:
    problems: List[Problem] = field(default_factory=list)
    histogram: Optional[np.ndarray] = None  # int64 [256]: pixels per class id after the map
    gaps: Optional[np.ndarray] = None  # int64 [256]: pixels of the label map's gaps
    size: Optional[Tuple[int, int]] = None  # (width, height) of the image
    annotation: str = ""  # the annotation's URI


@dataclass
class ValidationReport:
    num_classes: int
    class_names: List[str]
    channels: Dict[str, Optional[str]]
    counts: Dict[str, int] = field(default_factory=dict)  # files per channel
    pairs: Dict[str, int] = field(default_factory=dict)  # complete pairs per split
    problems: List[Problem] = field(default_factory=list)
    histograms: Dict[str, List[int]] = field(default_factory=dict)  # split -> pixels per class
    ignore_pixels: Dict[str, int] = field(default_factory=dict)
    sizes: Dict[str, dict] = field(default_factory=dict)  # split -> image size statistics
    label_maps: Dict[str, dict] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def fatal(self) -> List[Problem]:
        return [p for p in self.problems if p.severity == FATAL]

    @property
    def warnings(self) -> List[Problem]:
        return [p for p in self.problems if p.severity == WARNING]

    @property
    def ok(self) -> bool:
        return not self.fatal

    @property
    def fatal_keys(self) -> List[str]:
        return sorted({p.key for p in self.fatal})

    @property
    def summary(self) -> List[ProblemGroup]:
        """The problems grouped: one line per severity, kind and channel."""
        return group_problems(self.problems)

    def raise_if_fatal(self, report_uri: Optional[str] = None) -> None:
        fatal = self.fatal
        if not fatal:
            return
        keys = self.fatal_keys

        def describe(key: str) -> str:
            problems = [p for p in fatal if p.key == key]
            kinds = ", ".join(sorted({p.kind for p in problems}))
            cause = problems[0].message
            cause = cause if len(cause) <= MAX_MESSAGE else cause[:MAX_MESSAGE] + "..."
            return f"{key} ({kinds}: {cause})"

        listed = "; ".join(describe(k) for k in keys[:MAX_LISTED])
        more = f" and {len(keys) - MAX_LISTED} more" if len(keys) > MAX_LISTED else ""
        where = f"; see {report_uri}" if report_uri else ""
        raise DataError(storage.redact(
            f"dataset validation failed: {len(fatal)} fatal problem(s) in {len(keys)} key(s): "
            f"{listed}{more}{where}"))

    def to_dict(self) -> dict:
        return {
            "ok": self.ok, "num_classes": self.num_classes, "class_names": self.class_names,
            "channels": self.channels, "counts": self.counts, "pairs": self.pairs,
            "num_fatal": len(self.fatal), "num_warnings": len(self.warnings),
            "fatal_keys": self.fatal_keys,
            "summary": [g.to_dict() for g in self.summary],
            "problems": [p.to_dict() for p in self.problems],
            "class_histogram": {
                split: [{"class": i, "name": self.class_names[i], "pixels": n}
                        for i, n in enumerate(counts)]
                for split, counts in self.histograms.items()},
            "ignore_pixels": self.ignore_pixels, "image_sizes": self.sizes,
            "label_maps": self.label_maps, "seconds": round(self.seconds, 3),
        }

    def to_markdown(self) -> str:
        lines = ["# Dataset validation report", "",
                 f"**Result: {'OK' if self.ok else 'FAILED'}** - {len(self.fatal)} fatal "
                 f"problem(s), {len(self.warnings)} warning(s); num_classes = {self.num_classes}.",
                 "", "## Channels", "", "| channel | URI | files |", "|---|---|---|"]
        for name, uri in self.channels.items():
            lines.append(f"| {name} | {uri or '-'} | {self.counts.get(name, '-')} |")
        lines += ["", "Complete image/annotation pairs: " + (", ".join(
            f"{s} {n}" for s, n in self.pairs.items()) or "none") + ".", ""]
        lines += ["## Problems", ""]
        if not self.problems:
            lines.append("None.")
        else:
            lines += ["| severity | kind | channel | keys | pixels (value: pixels) | "
                      "first message |", "|---|---|---|---|---|---|"]
            for g in self.summary:
                shown = MAX_LISTED if g.severity == FATAL else MAX_EXAMPLES
                keys = ", ".join(f"`{k}`" for k in g.keys[:shown])
                if len(g.keys) > shown:
                    keys += f" and {len(g.keys) - shown} more"
                message = g.message.replace("|", "\\|")
                lines.append(f"| {g.severity} | {g.kind} | {g.channel} | {keys} | "
                             f"{g.pixels or '-'} | {message} |")
            lines.append(f"\nEvery problem, key by key, is in report.json "
                         f"({len(self.problems)} in all).")
        lines += ["", "## Pixels per class", ""]
        splits = list(self.histograms)
        if splits:
            lines.append("| id | class | " + " | ".join(f"{s} pixels | {s} share"
                                                       for s in splits) + " |")
            lines.append("|---|---|" + "---|---|" * len(splits))
            totals = {s: max(1, sum(self.histograms[s])) for s in splits}
            for i, name in enumerate(self.class_names):
                cells = " | ".join(f"{self.histograms[s][i]} | "
                                   f"{100.0 * self.histograms[s][i] / totals[s]:.2f}%"
                                   for s in splits)
                lines.append(f"| {i} | {name} | {cells} |")
            lines.append("")
            lines.append("Ignored pixels (255 after the label map): " + ", ".join(
                f"{s} {self.ignore_pixels.get(s, 0)}" for s in splits) + ".")
        else:
            lines.append("No annotations could be read.")
        lines += ["", "## Image sizes", "", "| split | images | width min/mean/max | "
                  "height min/mean/max | most common (w x h: count) |", "|---|---|---|---|---|"]
        for split, st in self.sizes.items():
            common = ", ".join(f"{s}: {n}" for s, n in st["most_common"])
            lines.append(f"| {split} | {st['count']} | {st['width']['min']}/"
                         f"{st['width']['mean']:.1f}/{st['width']['max']} | {st['height']['min']}/"
                         f"{st['height']['mean']:.1f}/{st['height']['max']} | {common} |")
        lines += ["", f"Checked in {self.seconds:.1f} s.", ""]
        return "\n".join(lines)

    def write(self, output_uri: str) -> None:
        """Write report.json and report.md below ``output_uri`` (credentials in URIs redacted)."""
        storage.write_text(storage.join(output_uri, "report.json"),
                           storage.redact(json.dumps(self.to_dict(), indent=1) + "\n"))
        storage.write_text(storage.join(output_uri, "report.md"),
                           storage.redact(self.to_markdown()))


def _check_image(pair: Pair, channel: str, fatal: Callable[[str, str, str], None]
                 ) -> Tuple[Optional[Tuple[int, int]], bool]:
    """Decode the image fully (problems through ``fatal``): its (width, height) once opened,
    and whether it decoded."""
    image_size = None
    try:
        data = storage.read_bytes(pair.image)
        with Image.open(io.BytesIO(data)) as image:
            image_size = image.size
            if image.format not in ("JPEG", "PNG"):
                fatal("unsupported_image", channel,
                      f"{pair.image} is {image.format}; expected JPEG or PNG")
            if image.format == "JPEG":
                # Every entropy-coded byte is still parsed at 1/8 scale: truncation is caught.
                image.draft("RGB", (max(1, image.size[0] // 8), max(1, image.size[1] // 8)))
            image.load()
    except KubesegError as exc:
        fatal("unreadable_image", channel, str(exc))
        return image_size, False
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError... for bad files
        fatal("corrupt_image", channel, f"{pair.image}: cannot decode ({exc})")
        return image_size, False
    return image_size, True


def _read_annotation(pair: Pair, channel: str, fatal: Callable[[str, str, str], None]
                     ) -> Optional[Tuple[np.ndarray, Tuple[int, int]]]:
    """(mask values, size) of a single-channel PNG annotation; None after a fatal problem."""
    try:
        data = storage.read_bytes(pair.annotation)
        with Image.open(io.BytesIO(data)) as annotation:
            mode, size, fmt = annotation.mode, annotation.size, annotation.format
            annotation.load()
            if fmt != "PNG":
                fatal("annotation_not_png", channel,
                      f"{pair.annotation} is a {fmt} file, not a PNG: lossy compression turns "
                      "class ids into noise; save annotations as PNG (lossless)")
                return None
            if mode not in ("L", "P"):
                fatal("annotation_not_single_channel", channel,
                      f"{pair.annotation} has mode {mode}; annotations must be single-channel "
                      "8-bit PNGs (mode L or P) of class ids")
                return None
            mask = np.array(annotation) if mode == "P" else np.asarray(annotation, np.uint8)
    except KubesegError as exc:
        fatal("unreadable_annotation", channel, str(exc))
        return None
    except Exception as exc:
        fatal("corrupt_annotation", channel, f"{pair.annotation}: cannot decode ({exc})")
        return None
    return mask, size


def _unexplained_problem(pair: Pair, channel: str, values: Dict[int, int], num_classes: int,
                         strict_labels: bool) -> Problem:
    message = (f"{pair.annotation}: pixel values {values} (value: pixels) are neither in the "
               f"label map nor up to num_classes={num_classes}, so they become ignore (255); "
               "fix the annotation or the label map")
    if not strict_labels:
        message += " (--strict-labels makes this fatal)"
    return Problem(FATAL if strict_labels else WARNING, UNEXPLAINED, channel, pair.key,
                   message, pixels=values)


def check_pair(pair: Pair, split: str, label_map: LabelMap, num_classes: int, *,
               strict_labels: bool = False) -> ItemResult:
    """Read and check one image/annotation pair (safe to call from threads)."""
    result = ItemResult(annotation=pair.annotation)
    annotation_channel = f"{split}_annotation"

    def fatal(kind: str, channel: str, message: str) -> None:
        result.problems.append(Problem(FATAL, kind, channel, pair.key, message))

    image_size, decoded = _check_image(pair, split, fatal)
    if decoded:
        result.size = image_size
    annotation = _read_annotation(pair, annotation_channel, fatal)
    if annotation is None:
        return result
    mask, size = annotation
    if image_size is not None and size != image_size:
        fatal("size_mismatch", annotation_channel,
              f"image is {image_size[0]}x{image_size[1]} but annotation {pair.annotation} is "
              f"{size[0]}x{size[1]}")
    raw = np.bincount(mask.ravel(), minlength=256).astype(np.int64)
    mapped = np.bincount(label_map.lut, weights=raw, minlength=256).astype(np.int64)
    bad = [v for v in range(num_classes, IGNORE_INDEX) if mapped[v]]
    if bad:
        fatal("label_out_of_range", annotation_channel,
              f"{pair.annotation}: class ids {bad[:10]} >= num_classes={num_classes} "
              f"({int(sum(mapped[v] for v in bad))} pixels); fix the annotation, num_classes "
              "or the label map")
    unmapped = raw.copy()
    unmapped[label_map.lut != IGNORE_INDEX] = 0
    unmapped[IGNORE_INDEX] = 0
    gaps = unmapped.copy()
    gaps[num_classes + 1:] = 0  # values 0..num_classes: the label map's gaps (e.g. void)
    unexplained = {int(v): int(unmapped[v]) for v in np.nonzero(unmapped - gaps)[0]}
    if unexplained:
        result.problems.append(_unexplained_problem(pair, annotation_channel, unexplained,
                                                    num_classes, strict_labels))
    result.histogram, result.gaps = mapped, gaps
    return result


def _size_stats(sizes: List[Tuple[int, int]]) -> dict:
    if not sizes:
        return {"count": 0, "width": {"min": 0, "mean": 0.0, "max": 0},
                "height": {"min": 0, "mean": 0.0, "max": 0}, "most_common": []}
    arr = np.array(sizes)
    uniq, counts = np.unique(arr, axis=0, return_counts=True)
    order = np.argsort(-counts, kind="stable")[:5]
    return {"count": len(sizes),
            "width": {"min": int(arr[:, 0].min()), "mean": float(arr[:, 0].mean()),
                      "max": int(arr[:, 0].max())},
            "height": {"min": int(arr[:, 1].min()), "mean": float(arr[:, 1].mean()),
                       "max": int(arr[:, 1].max())},
            "most_common": [[f"{uniq[i][0]}x{uniq[i][1]}", int(counts[i])] for i in order]}


def _missing_channels(split: str, images_uri: Optional[str],
                      annotations_uri: Optional[str]) -> Optional[List[Problem]]:
    """The problems of a split that lacks a channel (none for an absent validation split);
    None when both channels are given."""
    if images_uri and annotations_uri:
        return None
    if not images_uri and not annotations_uri:
        return [Problem(FATAL, "missing_channel", "train", "train",
                        "the train and train_annotation channels are required")
                ] if split == "train" else []
    channel_names = (split, f"{split}_annotation")
    return [Problem(FATAL, "missing_channel", name, name,
                    f"channel {name} is not given but its partner is")
            for name, uri in zip(channel_names, (images_uri, annotations_uri)) if not uri]


def _pairing_problems(split: str, pairing: Pairing, channels: Channels) -> List[Problem]:
    """Empty channels, unpaired and duplicate files, and files that are ignored."""
    images_uri, annotations_uri = channels.images(split), channels.annotations(split)
    problems = []
    for name, count in ((split, pairing.num_images),
                        (f"{split}_annotation", pairing.num_annotations)):
        if count == 0:
            problems.append(Problem(FATAL, "empty_channel", name, name,
                                    f"channel {name} ({channels.to_dict()[name]}) holds no "
                                    "usable files"))
    for key in pairing.images_without_annotation:
        problems.append(Problem(FATAL, "missing_annotation", split, key,
                                f"image {key} has no annotation {key}.png in "
                                f"{annotations_uri}"))
    for key in pairing.annotations_without_image:
        problems.append(Problem(FATAL, "missing_image", f"{split}_annotation", key,
                                f"annotation {key}.png has no image {key}.jpg/.jpeg/.png "
                                f"in {images_uri}"))
    for key in pairing.duplicate_images:
        problems.append(Problem(FATAL, "duplicate_image", split, key,
                                f"several images named {key}.* in {images_uri}; keep one"))
    for name in pairing.ignored_files:
        problems.append(Problem(WARNING, "ignored_file", split, name,
                                f"{name}: not a .jpg/.jpeg/.png image or .png annotation; "
                                "ignored"))
    return problems


def _check_pairs(pairs: Sequence[Pair], split: str, label_map: LabelMap, num_classes: int,
                 workers: int, strict_labels: bool) -> List[Tuple[str, ItemResult]]:
    """Every pair checked concurrently; (key, result) in key order."""
    results: List[Tuple[str, ItemResult]] = []
    for pair, result in storage.iter_parallel(
            lambda p: check_pair(p, split, label_map, num_classes, strict_labels=strict_labels),
            pairs, workers):
        results.append((pair.key, result))
        if len(results) % LOG_EVERY == 0 or len(results) == len(pairs):
            logger.info("validated %d/%d %s pairs", len(results), len(pairs), split)
    return sorted(results, key=lambda kr: kr[0])


def _gap_problem(split: str, gaps: np.ndarray, files: List[str]) -> List[Problem]:
    """One warning for the pixel values of the label map's gaps in a split."""
    if not gaps.any():
        return []
    values = {int(v): int(gaps[v]) for v in np.nonzero(gaps)[0]}
    examples = ", ".join(files[:MAX_EXAMPLES]) + (", ..." if len(files) > MAX_EXAMPLES else "")
    return [Problem(
        WARNING, GAP, f"{split}_annotation", split,
        f"pixel values {values} (value: pixels) are left out of the label map, as values up to "
        f"num_classes may be (void, unused ids): they become ignore (255); in {len(files)} "
        f"file(s), e.g. {examples}", pixels=values)]


def _summarise(report: ValidationReport, split: str,
               results: List[Tuple[str, ItemResult]]) -> None:
    """Add the pairs' problems, the split's histogram, ignored pixels and image sizes."""
    histogram = np.zeros(256, dtype=np.int64)
    gaps = np.zeros(256, dtype=np.int64)
    sizes: List[Tuple[int, int]] = []
    gap_files: List[str] = []
    for key, result in results:
        report.problems.extend(result.problems)
        if result.histogram is not None:
            histogram += result.histogram
            gaps += result.gaps
            if result.gaps.any():
                gap_files.append(key)
        if result.size is not None:
            sizes.append(result.size)
    report.histograms[split] = [int(v) for v in histogram[:report.num_classes]]
    report.ignore_pixels[split] = int(histogram[IGNORE_INDEX])
    report.sizes[split] = _size_stats(sizes)
    report.problems.extend(_gap_problem(split, gaps, gap_files))
    if split == "train" and results:
        names = report.class_names
        for i in range(report.num_classes):
            if histogram[i] == 0:
                report.problems.append(Problem(
                    WARNING, "class_without_pixels", "train_annotation", names[i],
                    f"class {i} ({names[i]}) has no pixels in the training annotations"))


def _validate_split(report: ValidationReport, channels: Channels, split: str,
                    workers: int, strict_labels: bool) -> None:
    """Check one split's channels and pairs into ``report``."""
    problems = report.problems
    missing = _missing_channels(split, channels.images(split), channels.annotations(split))
    if missing is not None:
        problems.extend(missing)
        return
    try:
        label_map = LabelMap.load(channels.label_map, split=split)
    except DataError as exc:
        problems.append(Problem(FATAL, "bad_label_map", "label_map", "label_map", str(exc)))
        return
    report.label_maps[split] = label_map.to_dict()
    try:
        pairing = list_pairs(channels.images(split), channels.annotations(split))
    except KubesegError as exc:
        problems.append(Problem(FATAL, "unreadable_channel", split, split, str(exc)))
        return
    report.counts[split] = pairing.num_images
    report.counts[f"{split}_annotation"] = pairing.num_annotations
    report.pairs[split] = len(pairing.pairs)
    problems.extend(_pairing_problems(split, pairing, channels))
    _summarise(report, split, _check_pairs(pairing.pairs, split, label_map,
                                           report.num_classes, workers, strict_labels))


def validate_dataset(channels: Channels, num_classes: int, output_uri: Optional[str] = None, *,
                     workers: int = 8, class_names: Optional[Sequence[str]] = None,
                     strict_labels: bool = False) -> ValidationReport:
    """Check every pair of the train (required) and validation (optional) splits.

    ``strict_labels``: pixel values that neither the label map nor num_classes explains are
    fatal (by default a warning, as the label map's gaps are).

    Writes ``report.json`` and ``report.md`` below ``output_uri`` when given. Does not raise on
    problems: call ``report.raise_if_fatal()``.
    """
    problem = value_problem("num_classes", num_classes)
    if problem:
        raise DataError(problem)
    num_classes = int(num_classes)
    if class_names is not None and len(class_names) != num_classes:
        raise DataError(f"{len(class_names)} class names for num_classes={num_classes}")
    names = list(class_names) if class_names else [f"class_{i}" for i in range(num_classes)]
    start = time.perf_counter()
    report = ValidationReport(num_classes=num_classes, class_names=names,
                              channels=channels.to_dict())
    for split in ("train", "validation"):
        _validate_split(report, channels, split, workers, strict_labels)
    report.seconds = time.perf_counter() - start
    if output_uri:
        report.write(output_uri)
        logger.info("wrote %s and report.md", storage.join(output_uri, "report.json"))
    logger.info("validation: %d fatal problem(s), %d warning(s) in %.1f s", len(report.fatal),
                len(report.warnings), report.seconds)
    return report
