"""The four-channel dataset layout (SPEC section 3) and image/annotation pairing.

A channel is a prefix (``s3://bucket/prefix/`` or a local folder). Each image ``x.jpg``
(also ``.jpeg`` and ``.png``) in an image channel pairs with ``x.png`` of the same relative
name in the matching annotation channel.
"""
from __future__ import annotations

import posixpath
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Mapping, Optional, Tuple

from kubeseg import storage
from kubeseg.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
ANNOTATION_EXTENSION = ".png"
SPLITS = ("train", "validation")


@dataclass(frozen=True)
class Channels:
    """Where a dataset lives. Every field is a URI (``s3://...`` or a local path) or None.

    ``shards``: an ingested shard set (a prefix holding ``index.json``); when given, loaders read
    the shards and ignore the four folder channels.
    """

    train: Optional[str] = None
    validation: Optional[str] = None
    train_annotation: Optional[str] = None
    validation_annotation: Optional[str] = None
    label_map: Optional[str] = None
    shards: Optional[str] = None

    @classmethod
    def from_root(cls, root: str) -> "Channels":
        """The standard subfolders of ``root``: train/, validation/, train_annotation/,
        validation_annotation/, and label_map/ when it exists."""
        root = str(root)
        values = {name: storage.join(root, name) for name in
                  ("train", "validation", "train_annotation", "validation_annotation")}
        label_map = storage.join(root, "label_map")
        if storage.is_s3(root):
            has_label_map = bool(_safe_list(label_map))
        else:
            has_label_map = storage.exists(label_map)
        return cls(label_map=label_map if has_label_map else None, **values)

    def images(self, split: str) -> Optional[str]:
        _check_split(split)
        return getattr(self, split)

    def annotations(self, split: str) -> Optional[str]:
        _check_split(split)
        return getattr(self, f"{split}_annotation")

    def has_split(self, split: str) -> bool:
        return bool(self.images(split)) and bool(self.annotations(split))

    def to_dict(self) -> Dict[str, Optional[str]]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_description(cls, description: Mapping[str, Any]) -> "Channels":
        """From a dataset description (``to_dict()`` plus any other keys, which are ignored;
        empty values count as absent), as the pipeline's steps pass it along."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in description.items() if k in names and v})

    @classmethod
    def from_description_file(cls, path: str) -> "Channels":
        """From a file written by :func:`write_description_file` (a pipeline step's Dataset)."""
        import json

        with open(path) as f:
            return cls.from_description(json.load(f))


def write_description_file(path: str, description: Mapping[str, Any]) -> None:
    """Write a dataset description (channel URIs, ``shards``, or ``manifest``) as the pipeline's
    steps pass it along; :meth:`Channels.from_description_file` reads it back."""
    import json

    with open(path, "w") as f:
        json.dump(dict(description), f, indent=2)


def split_class_names(text: Optional[str]) -> Optional[List[str]]:
    """``"road, car,sky"`` -> ``["road", "car", "sky"]``; blanks are dropped; None when empty."""
    names = [name.strip() for name in (text or "").split(",") if name.strip()]
    return names or None


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"split {split!r}: expected one of {', '.join(SPLITS)}")


def _safe_list(prefix: str) -> List[str]:
    try:
        return storage.list_files(prefix)
    except storage.StorageError:
        return []


@dataclass(frozen=True)
class Pair:
    key: str  # relative name without extension, e.g. "0001TP_006690" or "sub/x"
    image: str  # URI
    annotation: str  # URI


@dataclass(frozen=True)
class Pairing:
    """The result of matching an image channel with its annotation channel."""

    pairs: List[Pair]
    images_without_annotation: List[str] = field(default_factory=list)  # keys
    annotations_without_image: List[str] = field(default_factory=list)  # keys
    duplicate_images: List[str] = field(default_factory=list)  # keys with two image files
    ignored_files: List[str] = field(default_factory=list)  # names with other extensions
    num_images: int = 0
    num_annotations: int = 0


def split_name(name: str) -> Tuple[str, str]:
    """``"a/b.JPG"`` -> ``("a/b", ".jpg")``."""
    stem, ext = posixpath.splitext(name)
    return stem, ext.lower()


def list_pairs(images_uri: str, annotations_uri: str) -> Pairing:
    """Pair every image below ``images_uri`` with its annotation below ``annotations_uri``.

    Raises StorageError when a channel cannot be listed (for example a missing folder).
    """
    image_names = storage.list_files(images_uri)
    annotation_names = storage.list_files(annotations_uri)
    images: Dict[str, str] = {}
    duplicates: List[str] = []
    ignored: List[str] = []
    for name in image_names:
        stem, ext = split_name(name)
        if ext not in IMAGE_EXTENSIONS:
            ignored.append(name)
            continue
        if stem in images:
            duplicates.append(stem)
            continue
        images[stem] = name
    annotations: Dict[str, str] = {}
    for name in annotation_names:
        stem, ext = split_name(name)
        if ext != ANNOTATION_EXTENSION:
            ignored.append(name)
            continue
        annotations[stem] = name
    pairs = [Pair(key, storage.join(images_uri, images[key]),
                  storage.join(annotations_uri, annotations[key]))
             for key in sorted(images) if key in annotations]
    return Pairing(
        pairs=pairs,
        images_without_annotation=sorted(k for k in images if k not in annotations),
        annotations_without_image=sorted(k for k in annotations if k not in images),
        duplicate_images=sorted(set(duplicates)),
        ignored_files=sorted(ignored),
        num_images=len(images),
        num_annotations=len(annotations),
    )
