"""Label maps (SPEC section 3): from annotation pixel values to class ids.

Two forms, as JSON in the ``label_map`` channel (``train_label_map.json`` /
``validation_label_map.json``):

- ``{"scale": k}`` (the default, with k = 1): class = pixel // k; 255 stays ignore.
- ``{"map": {"<class>": <pixel value>, ...}}``: explicit; pixels that match no entry become
  ignore (255).

Numbers may be JSON numbers or strings, as the reference documentation writes them:
``{"scale": "1"}`` and ``{"map": {"0": "10"}}`` are the same as ``{"scale": 1}`` and
``{"map": {"0": 10}}``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Dict, Optional

import numpy as np

from kubeseg import storage
from kubeseg.config import IGNORE_INDEX
from kubeseg.errors import DataError


def _integer(value) -> Optional[int]:
    """A JSON number or numeric string holding a whole number, as int; None otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            try:
                number = float(text)
            except ValueError:
                return None
            return int(number) if number.is_integer() else None
    return None


@dataclass(frozen=True)
class LabelMap:
    """A lookup table from pixel value (0..255) to class id (255 = ignore)."""

    scale: Optional[int] = 1
    mapping: Optional[Dict[int, int]] = None  # class id -> pixel value (the "map" form)
    source: str = "default"

    def __post_init__(self):
        lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
        if self.mapping is not None:
            for cls, pixel in self.mapping.items():
                lut[pixel] = cls
        else:
            lut[:IGNORE_INDEX] = np.minimum(np.arange(IGNORE_INDEX) // self.scale, IGNORE_INDEX)
        lut.setflags(write=False)
        object.__setattr__(self, "_lut", lut)

    @property
    def lut(self) -> np.ndarray:
        """uint8 [256]: class id of each pixel value."""
        return self._lut

    @property
    def is_identity(self) -> bool:
        return bool((self._lut == np.arange(256)).all())

    @property
    def mapped_values(self) -> np.ndarray:
        """Pixel values that map to a class (not to ignore)."""
        return np.nonzero(self._lut != IGNORE_INDEX)[0]

    def apply(self, mask: np.ndarray) -> np.ndarray:
        """uint8 mask of pixel values -> uint8 mask of class ids (unmapped -> 255)."""
        mask = np.asarray(mask)
        if mask.dtype != np.uint8:
            raise DataError(f"annotation has dtype {mask.dtype}; expected an 8-bit "
                            "single-channel PNG (mode L or P)")
        return self._lut.take(mask)  # twice as fast as fancy indexing

    def to_dict(self) -> dict:
        if self.mapping is not None:
            return {"map": {str(c): int(p) for c, p in sorted(self.mapping.items())}}
        return {"scale": int(self.scale)}

    @classmethod
    def from_dict(cls, data, source: str = "label map") -> "LabelMap":
        """Parse the JSON form; a malformed one is a DataError naming ``source``."""
        if not isinstance(data, dict) or not data:
            raise DataError(f"{source}: a label map is a JSON object with \"scale\" or \"map\", "
                            f"got {json.dumps(data)[:80]}")
        unknown = sorted(set(data) - {"scale", "map"})
        if unknown or len(data) != 1:
            raise DataError(f"{source}: expected exactly one of \"scale\" or \"map\", got keys "
                            f"{sorted(data)}")
        if "scale" in data:
            scale = _integer(data["scale"])
            if scale is None or not 1 <= scale <= 255:
                raise DataError(f"{source}: \"scale\" must be an integer in [1, 255] (a JSON "
                                f"number or string), got {data['scale']!r}")
            return cls(scale=scale, mapping=None, source=source)
        raw = data["map"]
        if not isinstance(raw, dict) or not raw:
            raise DataError(f"{source}: \"map\" must be a non-empty object "
                            "{\"<class>\": <pixel value>, ...}")
        mapping: Dict[int, int] = {}
        problems = []
        seen_pixels: Dict[int, int] = {}
        for key, raw_pixel in raw.items():
            cls_id = _integer(key)
            if cls_id is None:
                problems.append(f"class {key!r} is not an integer")
                continue
            if not 0 <= cls_id <= 254:
                problems.append(f"class {cls_id} is outside [0, 254]")
                continue
            if cls_id in mapping:
                problems.append(f"class {cls_id} is given twice")
                continue
            pixel = _integer(raw_pixel)
            if pixel is None or not 0 <= pixel <= 255:
                problems.append(f"class {key}: pixel value {raw_pixel!r} is not an integer in "
                                "[0, 255] (a JSON number or string)")
                continue
            if pixel in seen_pixels:
                problems.append(f"pixel value {pixel} is mapped to both class "
                                f"{seen_pixels[pixel]} and class {cls_id}")
                continue
            seen_pixels[pixel] = cls_id
            mapping[cls_id] = pixel
        if problems:
            raise DataError(f"{source}: invalid \"map\": " + "; ".join(problems))
        return cls(scale=None, mapping=mapping, source=source)

    @classmethod
    def load(cls, uri: Optional[str], split: str = "train") -> "LabelMap":
        """Read the label map of ``split``.

        ``uri``: None (the default ``{"scale": 1}``), a JSON file, or the ``label_map`` channel,
        in which ``<split>_label_map.json`` is used, falling back to ``train_label_map.json``.
        """
        if not uri:
            return cls()
        uri = str(uri)
        if uri.lower().endswith(".json"):
            candidates = [uri]
        else:
            candidates = [storage.join(uri, f"{split}_label_map.json")]
            if split != "train":
                candidates.append(storage.join(uri, "train_label_map.json"))
        for candidate in candidates:
            if storage.exists(candidate):
                text = storage.read_text(candidate)
                try:
                    data = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise DataError(f"label map {candidate}: invalid JSON at line {exc.lineno} "
                                    f"column {exc.colno}: {exc.msg}") from None
                return cls.from_dict(data, source=f"label map {candidate}")
        raise DataError(f"label map channel {uri}: none of {', '.join(candidates)} exists; "
                        "add the file or leave the label_map channel out for {\"scale\": 1}")
