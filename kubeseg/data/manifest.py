"""Augmented manifests (SPEC section 4) and Ground Truth colour maps.

A manifest is JSON Lines. Each line holds ``source-ref`` (the image URI) and one label attribute
ending in ``-ref`` (the annotation PNG URI); the attribute names are given in order, image
first, or detected when the manifest holds exactly one label attribute. Ground Truth adds
``<label>-ref-metadata`` with an ``internal-color-map``: class index -> class name and hex
colour. Masks are palette PNGs whose index is the class, single-channel PNGs of class ids, or
RGB PNGs coloured with the colour map.
"""
from __future__ import annotations

import json
import posixpath
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from kubeseg import storage
from kubeseg.errors import DataError

IGNORE_INDEX = 255
GROUND_TRUTH_TYPE = "groundtruth/semantic-segmentation"
_HEX = re.compile(r"^#?([0-9a-fA-F]{6})$")


@dataclass(frozen=True)
class ManifestEntry:
    line: int  # 1-based line number in the manifest
    key: str  # unique sample key, from the image file name
    image: str  # URI
    annotation: str  # URI


@dataclass(frozen=True)
class LineProblem:
    line: int
    kind: str  # invalid_json, missing_attribute, bad_uri, duplicate, not_an_object
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


@dataclass(frozen=True)
class ColorMap:
    """Ground Truth ``internal-color-map``: class index -> name and RGB colour."""

    class_names: Tuple[str, ...]
    colours: Tuple[Optional[Tuple[int, int, int]], ...]  # per class index; None when absent

    @classmethod
    def from_metadata(cls, metadata: dict, source: str) -> "ColorMap":
        raw = metadata.get("internal-color-map")
        if not isinstance(raw, dict) or not raw:
            raise DataError(f"{source}: \"internal-color-map\" must be a non-empty object")
        entries: Dict[int, Tuple[str, Optional[Tuple[int, int, int]]]] = {}
        for key, value in raw.items():
            try:
                index = int(key)
            except ValueError:
                raise DataError(f"{source}: internal-color-map key {key!r} is not a class "
                                "index") from None
            if not 0 <= index <= 254 or not isinstance(value, dict):
                raise DataError(f"{source}: internal-color-map entry {key!r} must be a class "
                                "index 0..254 with an object {\"class-name\", \"hex-color\"}")
            name = str(value.get("class-name", f"class_{index}"))
            colour = None
            if "hex-color" in value:
                match = _HEX.match(str(value["hex-color"]).strip())
                if not match:
                    raise DataError(f"{source}: class {index} has hex-color "
                                    f"{value['hex-color']!r}; expected #rrggbb")
                code = int(match.group(1), 16)
                colour = (code >> 16 & 255, code >> 8 & 255, code & 255)
            entries[index] = (name, colour)
        size = max(entries) + 1
        names = tuple(entries.get(i, (f"class_{i}", None))[0] for i in range(size))
        colours = tuple(entries.get(i, ("", None))[1] for i in range(size))
        seen: Dict[Tuple[int, int, int], int] = {}
        for i, c in enumerate(colours):
            if c is not None and c in seen:
                raise DataError(f"{source}: classes {seen[c]} and {i} share the colour "
                                f"#{c[0]:02x}{c[1]:02x}{c[2]:02x}")
            if c is not None:
                seen[c] = i
        return cls(class_names=names, colours=colours)

    def to_dict(self) -> dict:
        return {"class_names": list(self.class_names),
                "colours": [None if c is None else "#%02x%02x%02x" % c for c in self.colours]}

    def rgb_to_classes(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 [H,W,3] -> uint8 [H,W] class ids; colours not in the map become 255."""
        codes = (pixels[..., 0].astype(np.int32) << 16) | (pixels[..., 1].astype(np.int32) << 8) \
            | pixels[..., 2].astype(np.int32)
        known = [(((c[0] << 16) | (c[1] << 8) | c[2]), i) for i, c in enumerate(self.colours)
                 if c is not None]
        if not known:
            raise DataError("the colour map has no hex-color entries; RGB masks cannot be "
                            "converted")
        known.sort()
        table = np.array([k for k, _ in known], dtype=np.int32)
        classes = np.array([i for _, i in known], dtype=np.uint8)
        pos = np.minimum(np.searchsorted(table, codes), len(table) - 1)
        return np.where(table[pos] == codes, classes[pos], IGNORE_INDEX).astype(np.uint8)


def decode_mask(data: bytes, colour_map: Optional[ColorMap] = None, *,
                source: str = "annotation") -> np.ndarray:
    """Annotation PNG bytes -> uint8 [H,W] of class ids (before any label map).

    Palette (P) masks: the index is the class. Single-channel (L) masks: the value is the
    class. RGB/RGBA masks: converted through ``colour_map`` (required for them).
    """
    import io

    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as exc:  # PIL raises several types for corrupt files
        raise DataError(f"{source}: cannot decode the annotation ({exc})") from None
    if image.mode in ("L", "P"):
        return np.asarray(image, dtype=np.uint8) if image.mode == "L" else np.array(image)
    if image.mode in ("RGB", "RGBA"):
        if colour_map is None:
            raise DataError(f"{source}: annotation is {image.mode} but no Ground Truth "
                            "internal-color-map is available to convert colours to classes; "
                            "use single-channel (L or P) PNGs of class ids")
        return colour_map.rgb_to_classes(np.asarray(image.convert("RGB")))
    raise DataError(f"{source}: annotation mode {image.mode}; expected an 8-bit PNG (mode L "
                    "or P, or RGB with a colour map)")


@dataclass
class Manifest:
    source: str
    attribute_names: Tuple[str, str]
    entries: List[ManifestEntry] = field(default_factory=list)
    problems: List[LineProblem] = field(default_factory=list)
    colour_map: Optional[ColorMap] = None
    num_lines: int = 0

    @property
    def class_names(self) -> Optional[List[str]]:
        return list(self.colour_map.class_names) if self.colour_map else None

    def raise_if_problems(self) -> None:
        if self.problems:
            shown = "\n".join(f"  - {p}" for p in self.problems[:20])
            more = f"\n  ... and {len(self.problems) - 20} more" if len(self.problems) > 20 else ""
            raise DataError(f"manifest {self.source}: {len(self.problems)} bad line(s):\n"
                            f"{shown}{more}")


def check_uri(value) -> Optional[str]:
    """None when ``value`` is a usable object URI, otherwise what is wrong with it."""
    if not isinstance(value, str) or not value.strip():
        return f"{value!r} is not a URI string"
    if value.startswith("s3://"):
        bucket, _, key = value[5:].partition("/")
        if len(bucket) < 3 or not re.match(r"^[a-z0-9][a-z0-9.\-_]*$", bucket):
            return f"{value!r}: invalid bucket name"
        if not key or key.endswith("/"):
            return f"{value!r}: names a bucket or folder, not an object"
        return None
    if value.startswith("/"):
        return None if not value.endswith("/") else f"{value!r}: names a folder, not a file"
    return f"{value!r}: expected s3://bucket/key (or an absolute local path)"


def _detect_label_attribute(objects: List[Tuple[int, dict]], source: str) -> str:
    found: Dict[str, int] = {}
    for _, obj in objects:
        for k in obj:
            if k.endswith("-ref") and k != "source-ref":
                found[k] = found.get(k, 0) + 1
    if len(found) == 1:
        return next(iter(found))
    if not found:
        raise DataError(f"manifest {source}: no label attribute ending in '-ref' besides "
                        "'source-ref'; give the attribute names (image first, then label)")
    raise DataError(f"manifest {source}: several label attributes {sorted(found)}; give the "
                    "attribute names in order (image first, then label)")


def parse_manifest(text: str, *, attribute_names: Optional[Sequence[str]] = None,
                   source: str = "manifest") -> Manifest:
    """Parse JSON Lines. Bad lines are collected in ``problems`` with their line numbers."""
    problems: List[LineProblem] = []
    objects: List[Tuple[int, dict]] = []
    lines = text.splitlines()
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as exc:
            problems.append(LineProblem(number, "invalid_json",
                                        f"invalid JSON ({exc.msg} at column {exc.colno})"))
            continue
        if not isinstance(obj, dict):
            problems.append(LineProblem(number, "not_an_object",
                                        "expected a JSON object with the attributes"))
            continue
        objects.append((number, obj))
    if attribute_names:
        names = [str(n).strip() for n in attribute_names if str(n).strip()]
        if len(names) != 2:
            raise DataError(f"attribute names {list(attribute_names)}: expected two, the image "
                            "attribute then the label attribute (e.g. source-ref, label-ref)")
        image_attr, label_attr = names
    else:
        image_attr = "source-ref"
        label_attr = _detect_label_attribute(objects, source)
    manifest = Manifest(source=source, attribute_names=(image_attr, label_attr),
                        num_lines=len(lines))
    seen_images: Dict[str, int] = {}
    seen_keys: Dict[str, int] = {}
    metadata_key = f"{label_attr}-metadata"
    for number, obj in objects:
        missing = [a for a in (image_attr, label_attr) if a not in obj]
        if missing:
            problems.append(LineProblem(number, "missing_attribute",
                                        f"missing attribute {', '.join(map(repr, missing))}"))
            continue
        bad = [(a, check_uri(obj[a])) for a in (image_attr, label_attr)]
        bad = [(a, why) for a, why in bad if why]
        if bad:
            problems.append(LineProblem(number, "bad_uri", "; ".join(
                f"{a}: {why}" for a, why in bad)))
            continue
        image, annotation = obj[image_attr], obj[label_attr]
        if image in seen_images:
            problems.append(LineProblem(number, "duplicate",
                                        f"duplicate of line {seen_images[image]} ({image})"))
            continue
        seen_images[image] = number
        meta = obj.get(metadata_key)
        if manifest.colour_map is None and isinstance(meta, dict) \
                and "internal-color-map" in meta:
            manifest.colour_map = ColorMap.from_metadata(
                meta, source=f"manifest {source} line {number} ({metadata_key})")
        key = posixpath.splitext(posixpath.basename(image))[0]
        if key in seen_keys:
            key = f"{key}_line{number}"
        seen_keys[key] = number
        manifest.entries.append(ManifestEntry(number, key, image, annotation))
    manifest.problems = sorted(problems, key=lambda p: p.line)
    return manifest


def read_manifest(uri: str, *, attribute_names: Optional[Sequence[str]] = None) -> Manifest:
    """Read and parse the manifest at ``uri`` (s3:// or local)."""
    text = storage.read_text(uri)
    return parse_manifest(text, attribute_names=attribute_names, source=uri)
