"""Class statistics of a split, and the class weights derived from them.

``class_weights=auto`` uses the square-root median-frequency form: with ``freq[c]`` = pixels
of class c / pixels of the images that contain c (median frequency balancing, as SegNet
trains on CamVid), the weight of class c is ``sqrt(median(freq) / freq[c])``. The square root
keeps the boost of rare classes gentle; the full ratio makes a model paint common classes as
rare ones. Ignored pixels (255) count towards an image's pixels but towards no class.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

import numpy as np

from kubeseg import storage
from kubeseg.data import shards as S
from kubeseg.data.channels import list_pairs
from kubeseg.data.ingest import ordered_map
from kubeseg.data.labelmap import LabelMap
from kubeseg.data.manifest import decode_mask
from kubeseg.errors import DataError

NEUTRAL_WEIGHT = 1.0  # for a class without pixels (it never appears in the loss anyway)


@dataclass
class ClassStatistics:
    """Per-class pixel counts of a split (or of one rank's part of it)."""

    pixels: np.ndarray  # float64 [num_classes]: pixels of each class
    image_pixels: np.ndarray  # float64 [num_classes]: pixels of the images containing it
    images: int = 0

    @classmethod
    def empty(cls, num_classes: int) -> "ClassStatistics":
        return cls(np.zeros(num_classes), np.zeros(num_classes), 0)

    def add(self, mask: np.ndarray) -> None:
        """Count one uint8 mask of class ids (values >= num_classes, 255 too, count for none)."""
        n = len(self.pixels)
        hist = np.bincount(np.asarray(mask, dtype=np.uint8).ravel(), minlength=256)[:n]
        self.pixels += hist
        self.image_pixels[hist > 0] += mask.size
        self.images += 1

    def merge(self, other: "ClassStatistics") -> "ClassStatistics":
        return ClassStatistics(self.pixels + other.pixels,
                               self.image_pixels + other.image_pixels,
                               self.images + other.images)

    @property
    def frequencies(self) -> np.ndarray:
        return self.pixels / np.maximum(self.image_pixels, 1)


def sqrt_median_frequency_weights(stats: ClassStatistics) -> List[float]:
    """``sqrt(median(freq) / freq[c])`` per class; classes without pixels get 1."""
    freq = stats.frequencies
    present = freq > 0
    if not present.any():
        raise DataError("cannot compute class weights: the training masks hold no labelled "
                        "pixel of any class (all ignore or >= num_classes)")
    median = float(np.median(freq[present]))
    weights = np.full(len(freq), NEUTRAL_WEIGHT)
    weights[present] = np.sqrt(median / freq[present])
    return [float(w) for w in weights]


def split_statistics(channels, split: str, num_classes: int, *, rank: int = 0,
                     world_size: int = 1, workers: int = 8) -> ClassStatistics:
    """Class statistics of this rank's part of ``split`` (sum the parts over ranks).

    ``channels``: a :class:`kubeseg.data.channels.Channels`; shards are read mask column
    only, folders through the split's label map, as training reads them (before any
    augmentation).
    """
    stats = ClassStatistics.empty(num_classes)
    if getattr(channels, "shards", None):
        shards_uri = channels.shards
        entry = S.split_entry(S.read_index(shards_uri), split, shards_uri)
        units = [(s["path"], g) for s in entry["shards"] for g in range(len(s["row_groups"]))]
        reader = S.ShardReader(shards_uri, columns=("key", "mask"))
        try:
            for path, group in units[rank::world_size]:
                columns = reader.read_row_group(path, group)
                for key, data in zip(columns["key"], columns["mask"]):
                    stats.add(decode_mask(data, source=f"{shards_uri} {split} sample {key!r}"))
        finally:
            reader.close()
        return stats
    images, annotations = channels.images(split), channels.annotations(split)
    if not images or not annotations:
        raise DataError(f"no {split} data to count classes in: give the {split} and "
                        f"{split}_annotation channels (or shards)")
    label_map = LabelMap.load(channels.label_map, split=split)
    pairs = list_pairs(images, annotations).pairs[rank::world_size]

    def load(pair) -> np.ndarray:
        return label_map.apply(decode_mask(storage.read_bytes(pair.annotation),
                                           source=pair.annotation))

    for mask in ordered_map(load, pairs, workers):
        stats.add(mask)
    return stats
