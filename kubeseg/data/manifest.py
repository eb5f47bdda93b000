"""Augmented manifests (SPEC section 4) and Ground Truth colour maps.

A manifest is JSON Lines (UTF-8, with or without a byte-order mark, LF or CRLF line ends). Each
line holds ``source-ref`` (the image URI) and one label attribute ending in ``-ref`` (the
annotation PNG URI); the attribute names are given in order, image first, or detected when the
manifest holds exactly one label attribute. A line repeated (the same image again) is kept, as
the reference trains on it twice, and counted.

Ground Truth writes the label attribute's metadata with an ``internal-color-map`` (class index
-> class name and hex colour) under ``<attribute>-metadata``; the reference's examples write it
under the job name, ``<job>-metadata`` for an attribute ``<job>-ref``. Both are read. Lines may
carry different colour maps (manifests merged from several labelling jobs, or maps that list
only the colours present in their image): the maps of all lines are merged, keyed by colour.
A colour that means different classes on different lines is a conflict naming both lines. A
class is known by its name; it keeps the index the first line that names it gives it, unless
another class holds that index already (then it gets the lowest free one).

Masks are palette PNGs whose index is the class index in their line's map (an index missing
there is looked up by its palette colour), single-channel PNGs of class ids, or RGB PNGs
coloured with the maps. A mask value found in no map is reported with its line; it becomes
ignore (255) only when the caller asks for that.
"""
from __future__ import annotations

import io
import json
import posixpath
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Set, Tuple

import numpy as np
from PIL import Image

from kubeseg import storage
from kubeseg.config import IGNORE_INDEX
from kubeseg.errors import DataError

MAX_CLASS_INDEX = 254
GROUND_TRUTH_TYPE = "groundtruth/semantic-segmentation"
COLOUR_MAP_KEY = "internal-color-map"
_HEX = re.compile(r"^#?([0-9a-fA-F]{6})$")
_UNKNOWN = -1

RGB = Tuple[int, int, int]


def hex_colour(colour: RGB) -> str:
    return "#%02x%02x%02x" % tuple(colour)


@dataclass(frozen=True)
class ManifestEntry:
    line: int  # 1-based line number in the manifest
    key: str  # unique sample key, from the image file name
    image: str  # URI
    annotation: str  # URI
    colour_map: Optional["ColorMap"] = None  # this line's own Ground Truth colour map
    repeat_of: Optional[int] = None  # the earlier line with the same image


@dataclass(frozen=True)
class LineProblem:
    line: int
    kind: str  # invalid_json, not_an_object, missing_attribute, bad_uri, bad_colour_map,
    #            colour_map_conflict, missing_object
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"

    def to_dict(self) -> dict:
        return {"line": self.line, "kind": self.kind, "message": self.message}


@dataclass(frozen=True)
class ColorMap:
    """One line's Ground Truth ``internal-color-map``: class index -> name and RGB colour."""

    class_names: Tuple[str, ...]  # per index 0..max; "class_<i>" where the map has no entry
    colours: Tuple[Optional[RGB], ...]  # per class index; None when absent
    indices: Tuple[int, ...] = ()  # the indices the map defines

    @classmethod
    def from_metadata(cls, metadata: dict, source: str) -> "ColorMap":
        raw = metadata.get(COLOUR_MAP_KEY)
        if not isinstance(raw, dict) or not raw:
            raise DataError(f"{source}: \"{COLOUR_MAP_KEY}\" must be a non-empty object")
        entries: Dict[int, Tuple[str, Optional[RGB]]] = {}
        for key, value in raw.items():
            try:
                index = int(key)
            except ValueError:
                raise DataError(f"{source}: {COLOUR_MAP_KEY} key {key!r} is not a class "
                                "index") from None
            if not 0 <= index <= MAX_CLASS_INDEX or not isinstance(value, dict):
                raise DataError(f"{source}: {COLOUR_MAP_KEY} entry {key!r} must be a class "
                                f"index 0..{MAX_CLASS_INDEX} with an object "
                                "{\"class-name\", \"hex-color\"}")
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
        seen: Dict[RGB, int] = {}
        for i, c in enumerate(colours):
            if c is not None and c in seen and names[seen[c]] != names[i]:
                raise DataError(f"{source}: classes {seen[c]} ({names[seen[c]]!r}) and {i} "
                                f"({names[i]!r}) share the colour {hex_colour(c)}")
            if c is not None:
                seen[c] = i
        return cls(class_names=names, colours=colours, indices=tuple(sorted(entries)))

    def entries(self) -> List[Tuple[int, str, Optional[RGB]]]:
        return [(i, self.class_names[i], self.colours[i]) for i in self.indices]

    def to_dict(self) -> dict:
        return {"class_names": list(self.class_names),
                "colours": [None if c is None else hex_colour(c) for c in self.colours]}


@dataclass(frozen=True)
class DecodedMask:
    classes: np.ndarray  # uint8 [H,W] class ids; values found in no map are 255 here
    unknown: Dict[str, int]  # mask value found in no map ("#rrggbb" or "index 7") -> pixels


@dataclass
class ClassColours:
    """The union of the lines' colour maps: merged class index -> name, colour -> class."""

    class_names: List[str]  # "class_<i>" for an index no map defines
    by_colour: Dict[RGB, int]
    defined: Tuple[int, ...]  # indices some map (or the given class names) defines
    index_of: Dict[str, int] = field(default_factory=dict)  # class name -> merged index

    def to_dict(self) -> dict:
        return {"class_names": list(self.class_names),
                "colours": {hex_colour(c): i for c, i in sorted(self.by_colour.items())}}

    def line_table(self, colour_map: Optional[ColorMap]) -> np.ndarray:
        """int16 [256]: a line's mask value -> merged class (255 ignore, -1 in no map).

        A line without a map of its own reads values as merged class indices."""
        table = np.full(256, _UNKNOWN, dtype=np.int16)
        if colour_map is None:
            for i in self.defined:
                table[i] = i
        else:
            for i, name, _ in colour_map.entries():
                table[i] = self.index_of[name]
        table[IGNORE_INDEX] = IGNORE_INDEX
        return table

    def rgb_to_classes(self, pixels: np.ndarray) -> Tuple[np.ndarray, Dict[str, int]]:
        """uint8 [H,W,3] -> (uint8 [H,W] class ids, {colour in no map: pixels}); colours in
        no map are 255 in the result."""
        codes = _rgb_codes(pixels)
        known = sorted(((c[0] << 16) | (c[1] << 8) | c[2], i) for c, i in self.by_colour.items())
        if not known:
            raise DataError("the colour maps have no hex-color entries; RGB masks cannot be "
                            "converted")
        table = np.array([k for k, _ in known], dtype=np.int32)
        classes = np.array([i for _, i in known], dtype=np.uint8)
        pos = np.minimum(np.searchsorted(table, codes), len(table) - 1)
        hit = table[pos] == codes
        unknown: Dict[str, int] = {}
        if not hit.all():
            values, counts = np.unique(codes[~hit], return_counts=True)
            unknown = {"#%06x" % int(v): int(n) for v, n in zip(values, counts)}
        return np.where(hit, classes[pos], IGNORE_INDEX).astype(np.uint8), unknown


def _rgb_codes(pixels: np.ndarray) -> np.ndarray:
    return (pixels[..., 0].astype(np.int32) << 16) | (pixels[..., 1].astype(np.int32) << 8) \
        | pixels[..., 2].astype(np.int32)


def merge_colour_maps(maps: Sequence[Tuple[int, ColorMap]],
                      known_classes: Optional[Sequence[str]] = None) -> Optional[ClassColours]:
    """Merge (line, map) pairs, in line order, that have no conflicts (see
    :func:`colour_map_conflicts`). ``known_classes``: names that keep their index (the class
    names of an earlier ingested split). None when there are no maps."""
    if not maps:
        return None
    preferred: Dict[str, Tuple[int, int]] = {}  # name -> (index on its first line, order)
    colours: Dict[RGB, str] = {}
    for _, cmap in maps:
        for i, name, colour in cmap.entries():
            preferred.setdefault(name, (i, len(preferred)))
            if colour is not None:
                colours.setdefault(colour, name)
    index_of: Dict[str, int] = {}
    taken: Dict[int, str] = {}
    for i, name in enumerate(known_classes or ()):
        index_of.setdefault(name, i)
        taken.setdefault(i, name)
    waiting = []
    for name, (index, _) in sorted(preferred.items(), key=lambda item: item[1]):
        if name in index_of:
            continue
        if index in taken:
            waiting.append(name)
        else:
            index_of[name], taken[index] = index, name
    for name in waiting:
        index = next(i for i in range(MAX_CLASS_INDEX + 2) if i not in taken)
        index_of[name], taken[index] = index, name
    size = max(taken) + 1
    if size > MAX_CLASS_INDEX + 1:
        raise DataError(f"the colour maps name {len(taken)} classes; at most "
                        f"{MAX_CLASS_INDEX + 1} fit in 8-bit masks (255 is ignore)")
    names = [taken.get(i, f"class_{i}") for i in range(size)]
    return ClassColours(class_names=names,
                        by_colour={c: index_of[n] for c, n in colours.items()},
                        defined=tuple(sorted(taken)), index_of=index_of)


def colour_map_conflicts(maps: Sequence[Tuple[int, ColorMap]]) -> List[LineProblem]:
    """A colour that names one class on a line and another class on a later line: a problem
    of the later line, naming both. The first line to use a colour defines it."""
    first: Dict[RGB, Tuple[str, int]] = {}  # colour -> (class name, line)
    problems = []
    for line, cmap in maps:
        clashes = []
        for i, name, colour in cmap.entries():
            if colour is None:
                continue
            earlier = first.get(colour)
            if earlier is not None and earlier[0] != name:
                clashes.append(f"{hex_colour(colour)} is class {i} {name!r} on line {line} but "
                               f"{earlier[0]!r} on line {earlier[1]}")
        if clashes:
            problems.append(LineProblem(line, "colour_map_conflict",
                                        "colour-map conflict: " + "; ".join(clashes)))
            continue
        for _, name, colour in cmap.entries():
            if colour is not None:
                first.setdefault(colour, (name, line))
    return problems


def decode_mask(data: bytes, colour_map=None, *, source: str = "annotation") -> np.ndarray:
    """Annotation PNG bytes -> uint8 [H,W] of class ids (before any label map).

    Palette (P) masks: the index is the class. Single-channel (L) masks: the value is the
    class. RGB/RGBA masks need ``colour_map`` (a :class:`ClassColours`); colours in no map
    become 255 here (ingestion uses :func:`decode_manifest_mask`, which reports them).
    """
    from kubeseg.data.codecs import decode_png_ids

    ids = decode_png_ids(data)
    if ids is not None:
        return ids
    image = _open_mask(data, source)
    if image.mode in ("L", "P"):
        return np.asarray(image, dtype=np.uint8) if image.mode == "L" else np.array(image)
    if image.mode in ("RGB", "RGBA"):
        if colour_map is None:
            raise DataError(f"{source}: annotation is {image.mode} but no Ground Truth "
                            f"{COLOUR_MAP_KEY} is available to convert colours to classes; "
                            "use single-channel (L or P) PNGs of class ids")
        return colour_map.rgb_to_classes(np.asarray(image.convert("RGB")))[0]
    raise DataError(f"{source}: annotation mode {image.mode}; expected an 8-bit PNG (mode L "
                    "or P, or RGB with a colour map)")


def _open_mask(data: bytes, source: str) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as exc:  # PIL raises several types for corrupt files
        raise DataError(f"{source}: cannot decode the annotation ({exc})") from None
    return image


def decode_manifest_mask(data: bytes, classes: Optional[ClassColours],
                         colour_map: Optional[ColorMap], *, source: str,
                         looked_at: Sequence[str] = ()) -> DecodedMask:
    """A manifest line's annotation -> merged class ids, and the mask values found in no map.

    ``classes``: the merged colour maps (None: the manifest has none, masks are class ids).
    ``colour_map``: the line's own map. ``looked_at``: the metadata keys searched, for the
    message when an RGB mask has no map to go through.
    """
    image = _open_mask(data, source)
    if image.mode in ("RGB", "RGBA"):
        if classes is None or not classes.by_colour:
            where = " or ".join(repr(k) for k in looked_at) or "the label attribute's metadata"
            raise DataError(f"{source}: annotation is {image.mode} but the manifest has no "
                            f"Ground Truth {COLOUR_MAP_KEY} with hex colours (looked under "
                            f"{where} on every line) to convert colours to classes; add the "
                            "metadata or use single-channel (L or P) PNGs of class ids")
        mask, unknown = classes.rgb_to_classes(np.asarray(image.convert("RGB")))
        return DecodedMask(mask, unknown)
    if image.mode not in ("L", "P"):
        raise DataError(f"{source}: annotation mode {image.mode}; expected an 8-bit PNG (mode "
                        "L or P, or RGB with a colour map)")
    values = np.asarray(image, dtype=np.uint8) if image.mode == "L" else np.array(image)
    if classes is None:
        return DecodedMask(values, {})
    table = classes.line_table(colour_map)
    counts = np.bincount(values.ravel(), minlength=256)
    unknown: Dict[str, int] = {}
    missing = [int(v) for v in np.flatnonzero(counts) if table[v] == _UNKNOWN]
    if missing:
        palette = image.getpalette() if image.mode == "P" else None
        for v in missing:
            colour = tuple(palette[3 * v:3 * v + 3]) if palette and len(palette) >= 3 * v + 3 \
                else None
            if colour is not None and colour in classes.by_colour:
                table[v] = classes.by_colour[colour]  # the palette colour names the class
                continue
            label = f"index {v}" + (f" ({hex_colour(colour)} in the PNG palette)"
                                    if colour is not None else "")
            unknown[label] = int(counts[v])
            table[v] = IGNORE_INDEX
    return DecodedMask(table[values].astype(np.uint8), unknown)


@dataclass
class Manifest:
    source: str
    attribute_names: Tuple[str, str]
    entries: List[ManifestEntry] = field(default_factory=list)
    problems: List[LineProblem] = field(default_factory=list)
    classes: Optional[ClassColours] = None  # the lines' colour maps, merged
    metadata_keys: Tuple[str, ...] = ()  # where the colour maps were looked for
    num_lines: int = 0

    @property
    def class_names(self) -> Optional[List[str]]:
        return list(self.classes.class_names) if self.classes else None

    @property
    def repeated(self) -> List[ManifestEntry]:
        return [e for e in self.entries if e.repeat_of is not None]

    def class_names_warning(self) -> Optional[str]:
        """Why no class names were found, naming where they were looked for; None if found."""
        if self.classes is not None:
            return None
        keys = " or ".join(repr(k) for k in self.metadata_keys)
        return (f"manifest {self.source}: no line has a Ground Truth {COLOUR_MAP_KEY} (looked "
                f"under {keys}); masks are taken as class ids and no class names are recorded")

    def raise_if_problems(self, report_uri: Optional[str] = None) -> None:
        if self.problems:
            raise DataError(describe_problems(self.source, self.problems, report_uri))


def describe_problems(source: str, problems: Sequence[LineProblem],
                      report_uri: Optional[str] = None) -> str:
    """Every bad line, one per row (the whole list: each is something to fix)."""
    lines = "\n".join(f"  - {p}" for p in sorted(problems, key=lambda p: p.line))
    where = f"\n(also in {report_uri})" if report_uri else ""
    count = len({p.line for p in problems})
    return (f"manifest {source}: {count} bad line(s); fix them, or leave them out with "
            f"--skip-bad-lines:\n{lines}{where}")


def metadata_keys(label_attribute: str) -> Tuple[str, ...]:
    """Where a label attribute's metadata may be: ``<attribute>-metadata`` and, for
    ``<job>-ref``, ``<job>-metadata``."""
    keys = [f"{label_attribute}-metadata"]
    if label_attribute.endswith("-ref") and len(label_attribute) > 4:
        keys.append(f"{label_attribute[:-4]}-metadata")
    return tuple(keys)


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


def _json_objects(lines: Sequence[str]) -> Tuple[List[Tuple[int, dict]], List[LineProblem]]:
    """(line number, object) of every non-blank line that is a JSON object; the others'
    problems."""
    problems: List[LineProblem] = []
    objects: List[Tuple[int, dict]] = []
    for number, raw in enumerate(lines, start=1):
        raw = raw.lstrip("\ufeff")  # a byte-order mark (also where files were concatenated)
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
    return objects, problems


def _attribute_pair(attribute_names: Optional[Sequence[str]], objects: List[Tuple[int, dict]],
                    source: str) -> Tuple[str, str]:
    """(image attribute, label attribute): as given, or detected."""
    if not attribute_names:
        return "source-ref", _detect_label_attribute(objects, source)
    names = [str(n).strip() for n in attribute_names if str(n).strip()]
    if len(names) != 2:
        raise DataError(f"attribute names {list(attribute_names)}: expected two, the image "
                        "attribute then the label attribute (e.g. source-ref, label-ref)")
    return names[0], names[1]


def _line_colour_map(obj: dict, keys: Sequence[str],
                     parsed_maps: Dict[str, ColorMap]) -> Optional[ColorMap]:
    """The line's colour map from the first metadata key holding one (None: no map); the
    same map on many lines is parsed once, through ``parsed_maps``."""
    key, meta = next(((k, obj[k]) for k in keys if isinstance(obj.get(k), dict)
                      and COLOUR_MAP_KEY in obj[k]), (None, None))
    if meta is None:
        return None
    text_key = json.dumps(meta[COLOUR_MAP_KEY], sort_keys=True)
    if text_key not in parsed_maps:
        parsed_maps[text_key] = ColorMap.from_metadata(meta, source=key)
    return parsed_maps[text_key]


def _usable_lines(objects: List[Tuple[int, dict]], attributes: Tuple[str, str],
                  keys: Sequence[str], problems: List[LineProblem]
                  ) -> List[Tuple[int, dict, Optional[ColorMap]]]:
    """(line, object, colour map) of the lines with both attributes, usable URIs and a valid
    colour map (if any); the others' problems are added to ``problems``."""
    usable: List[Tuple[int, dict, Optional[ColorMap]]] = []
    parsed_maps: Dict[str, ColorMap] = {}
    for number, obj in objects:
        missing = [a for a in attributes if a not in obj]
        if missing:
            problems.append(LineProblem(number, "missing_attribute",
                                        f"missing attribute {', '.join(map(repr, missing))}"))
            continue
        bad = [(a, check_uri(obj[a])) for a in attributes]
        bad = [(a, why) for a, why in bad if why]
        if bad:
            problems.append(LineProblem(number, "bad_uri", "; ".join(
                f"{a}: {why}" for a, why in bad)))
            continue
        try:
            colour_map = _line_colour_map(obj, keys, parsed_maps)
        except DataError as exc:
            problems.append(LineProblem(number, "bad_colour_map", str(exc)))
            continue
        usable.append((number, obj, colour_map))
    return usable


def _entries(usable: List[Tuple[int, dict, Optional[ColorMap]]], attributes: Tuple[str, str],
             left_out: Set[int]) -> List[ManifestEntry]:
    """One entry per usable line not in ``left_out``, with a unique key and its repeat."""
    image_attr, label_attr = attributes
    entries = []
    seen_images: Dict[str, int] = {}
    seen_keys: Dict[str, int] = {}
    for number, obj, colour_map in usable:
        if number in left_out:
            continue
        image, annotation = obj[image_attr], obj[label_attr]
        repeat_of = seen_images.get(image)
        seen_images.setdefault(image, number)
        key = posixpath.splitext(posixpath.basename(image))[0]
        if key in seen_keys:
            key = f"{key}_line{number}"
        seen_keys[key] = number
        entries.append(ManifestEntry(number, key, image, annotation, colour_map, repeat_of))
    return entries


def parse_manifest(text: str, *, attribute_names: Optional[Sequence[str]] = None,
                   source: str = "manifest",
                   known_classes: Optional[Sequence[str]] = None) -> Manifest:
    """Parse JSON Lines. Bad lines (including colour maps that conflict with an earlier
    line's) are collected in ``problems`` with their line numbers and left out of ``entries``.
    ``known_classes``: class names that keep their index (see :func:`merge_colour_maps`)."""
    lines = text.splitlines()  # LF, CRLF and CR line ends
    objects, problems = _json_objects(lines)
    attributes = _attribute_pair(attribute_names, objects, source)
    keys = metadata_keys(attributes[1])
    manifest = Manifest(source=source, attribute_names=attributes, num_lines=len(lines),
                        metadata_keys=keys)
    usable = _usable_lines(objects, attributes, keys, problems)
    maps = [(number, cmap) for number, _, cmap in usable if cmap is not None]
    conflicts = colour_map_conflicts(maps)
    problems.extend(conflicts)
    conflicting = {p.line for p in conflicts}
    manifest.classes = merge_colour_maps([m for m in maps if m[0] not in conflicting],
                                         known_classes)
    manifest.entries = _entries(usable, attributes, conflicting)
    manifest.problems = sorted(problems, key=lambda p: p.line)
    return manifest


def read_manifest(uri: str, *, attribute_names: Optional[Sequence[str]] = None,
                  known_classes: Optional[Sequence[str]] = None) -> Manifest:
    """Read and parse the manifest at ``uri`` (s3:// or local)."""
    text = storage.read_bytes(uri).decode("utf-8-sig", errors="replace")
    return parse_manifest(text, attribute_names=attribute_names, source=uri,
                          known_classes=known_classes)
