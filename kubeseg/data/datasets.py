"""PyTorch datasets: channel folders/prefixes (map-style) and streamed shards (iterable).

Both yield ``(image FloatTensor [3,H,W], mask LongTensor [H,W])`` (plus the key with
``return_key=True``). Random transforms draw from a generator derived from (seed, epoch,
sample), so an epoch is reproducible whatever the number of DataLoader workers.
"""
from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from kubeseg import storage
from kubeseg.data import shards as S
from kubeseg.data.channels import Channels, list_pairs
from kubeseg.data.labelmap import LabelMap
from kubeseg.data.manifest import decode_mask
from kubeseg.data.transforms import EncodedImage, EvalTransform
from kubeseg.errors import DataError

logger = logging.getLogger(__name__)

Transform = Callable[..., Tuple[torch.Tensor, torch.Tensor]]


def _key_seed(key: str) -> int:
    return zlib.crc32(key.encode("utf-8"))


def _open_image(data: bytes, where: str) -> EncodedImage:
    try:
        return EncodedImage(data)  # the header only: the transforms decode what they need
    except Exception as exc:
        raise DataError(f"{where}: cannot decode the image ({exc})") from None


class SharedEpoch:
    """The epoch number in shared memory: written by ``set_epoch`` in the training process and
    read by DataLoader workers, which then persist from one epoch to the next instead of being
    started again (forked with a copy of the dataset) for every epoch."""

    def __init__(self, epoch: int = 0):
        self._cell = torch.tensor([int(epoch)], dtype=torch.int64).share_memory_()

    @property
    def value(self) -> int:
        return int(self._cell[0])

    @value.setter
    def value(self, epoch: int) -> None:
        self._cell[0] = int(epoch)


def _apply(transform: Transform, image: EncodedImage, mask: np.ndarray, rng, where: str):
    try:
        return transform(image, mask, rng)
    except DataError as exc:
        raise DataError(f"{where}: {exc}") from None
    except OSError as exc:  # truncated or corrupt image data
        raise DataError(f"{where}: cannot decode the image ({exc})") from None


class FolderDataset(Dataset):
    """Image/annotation pairs of one split in channel folders or S3 prefixes (map-style).

    ``label_map``: a LabelMap, a label-map URI, or None (``{"scale": 1}``). ``transform``:
    ``(EncodedImage, uint8 mask, rng) -> (image, mask)`` tensors (default: EvalTransform()).
    Unpaired files are skipped with a warning (``kubeseg validate`` reports them).
    """

    def __init__(self, images_uri: str, annotations_uri: str, *,
                 label_map: Union[LabelMap, str, None] = None,
                 transform: Optional[Transform] = None, seed: int = 0, split: str = "train",
                 return_key: bool = False):
        pairing = list_pairs(images_uri, annotations_uri)
        unpaired = pairing.images_without_annotation + pairing.annotations_without_image
        if unpaired:
            logger.warning("%s: %d file(s) without a partner skipped, e.g. %s", images_uri,
                           len(unpaired), ", ".join(unpaired[:5]))
        self.images_uri, self.annotations_uri = images_uri, annotations_uri
        self.pairs = pairing.pairs
        self.label_map = label_map if isinstance(label_map, LabelMap) else LabelMap.load(
            label_map, split=split)
        self.transform = transform or EvalTransform()
        self.seed = int(seed)
        self._epoch = SharedEpoch()
        self.return_key = return_key

    @property
    def keys(self) -> List[str]:
        return [p.key for p in self.pairs]

    @property
    def epoch(self) -> int:
        return self._epoch.value

    def set_epoch(self, epoch: int) -> None:
        """Reseed the augmentation for ``epoch``, in this process and in persistent workers."""
        self._epoch.value = epoch

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, index: int) -> Tuple[Image.Image, np.ndarray]:
        """The raw sample: PIL image (not yet decoded) and uint8 mask of class ids."""
        image, mask = self._read(index)
        return image.header, mask

    def _read(self, index: int) -> Tuple[EncodedImage, np.ndarray]:
        pair = self.pairs[index]
        image = _open_image(storage.read_bytes(pair.image), pair.image)
        mask = decode_mask(storage.read_bytes(pair.annotation), source=pair.annotation)
        return image, self.label_map.apply(mask)

    def __getitem__(self, index: int):
        pair = self.pairs[index]
        image, mask = self._read(index)
        rng = np.random.default_rng([self.seed, self._epoch.value, _key_seed(pair.key)])
        x, y = _apply(self.transform, image, mask, rng, pair.image)
        return (x, y, pair.key) if self.return_key else (x, y)


@dataclass(frozen=True)
class RankSlice:
    """Which share of a split this process reads: every ``world_size``-th row group, from
    ``rank`` on."""

    rank: int = 0
    world_size: int = 1


class ShardDataset(IterableDataset):
    """Streams one split of a shard set (s3:// or local) without staging it on disk.

    The split's row groups are dealt to ranks round-robin (fixed across epochs, so ``len`` is
    stable), then each rank's row groups to its DataLoader workers, so every sample is read
    exactly once per epoch across ranks x workers. With ``shuffle``, the shard order changes
    every epoch (``set_epoch``) and samples pass through a shuffle buffer of ``buffer_size``;
    the order is deterministic for a given seed, epoch, world size and worker count.
    """

    def __init__(self, shards_uri: str, split: str, *, transform: Optional[Transform] = None,
                 shuffle: bool = True, seed: int = 0, ranks: RankSlice = RankSlice(),
                 buffer_size: int = 64, return_key: bool = False):
        rank, world_size = ranks.rank, ranks.world_size
        if not 0 <= rank < world_size:
            raise DataError(f"rank={rank} with world_size={world_size}: need 0 <= rank < "
                            "world_size")
        self.shards_uri = shards_uri
        self.split = split
        self.index = S.read_index(shards_uri)
        entry = S.split_entry(self.index, split, shards_uri)
        self.class_names = self.index.get("class_names")
        self.transform = transform or EvalTransform()
        self.shuffle, self.seed = shuffle, int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.buffer_size = max(1, int(buffer_size))
        self.return_key = return_key
        self._epoch = SharedEpoch()
        self.shards = [s["path"] for s in entry["shards"]]
        units = [(i, g, n) for i, s in enumerate(entry["shards"])
                 for g, n in enumerate(s["row_groups"])]
        self.units = units[self.rank::self.world_size]  # (shard, row group, rows) of this rank

    @property
    def epoch(self) -> int:
        return self._epoch.value

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle and reseed for ``epoch``, in this process and in persistent workers."""
        self._epoch.value = epoch

    def __len__(self) -> int:
        return sum(n for _, _, n in self.units)

    def _worker_units(self, epoch: int) -> Tuple[List[Tuple[int, int, int]], int]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        units = list(self.units)
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
            position = {int(s): p for p, s in enumerate(order)}
            units.sort(key=lambda u: (position[u[0]], u[1]))
        return units[worker::workers], worker

    def __iter__(self) -> Iterator:
        epoch = self.epoch  # once: the whole pass belongs to one epoch
        units, worker = self._worker_units(epoch)
        reader = S.ShardReader(self.shards_uri)
        buffer: List[Tuple[str, bytes, bytes]] = []
        rng = np.random.default_rng([self.seed, epoch, self.rank, worker])
        try:
            for shard, group, _ in units:
                columns = reader.read_row_group(self.shards[shard], group)
                for row in zip(columns["key"], columns["image"], columns["mask"]):
                    if not self.shuffle:
                        yield self._sample(row, epoch)
                        continue
                    buffer.append(row)
                    if len(buffer) >= self.buffer_size:
                        j = int(rng.integers(len(buffer)))
                        buffer[j], buffer[-1] = buffer[-1], buffer[j]
                        yield self._sample(buffer.pop(), epoch)
            while buffer:
                j = int(rng.integers(len(buffer)))
                buffer[j], buffer[-1] = buffer[-1], buffer[j]
                yield self._sample(buffer.pop(), epoch)
        finally:
            reader.close()

    def _sample(self, row: Tuple[str, bytes, bytes], epoch: int):
        key, image_bytes, mask_bytes = row
        where = f"{storage.join(self.shards_uri, self.split)} sample {key!r}"
        image = _open_image(image_bytes, where)
        mask = decode_mask(mask_bytes, source=where)
        rng = np.random.default_rng([self.seed, epoch, _key_seed(key)])
        x, y = _apply(self.transform, image, mask, rng, where)
        return (x, y, key) if self.return_key else (x, y)


def build_dataset(channels: Channels, split: str, transform: Optional[Transform], *,
                  rank: int = 0, world_size: int = 1, seed: int = 0,
                  return_key: bool = False) -> Union[FolderDataset, ShardDataset]:
    """The dataset of ``split``: streamed shards when ``channels.shards`` is set (shuffled for
    "train"), otherwise the channel folders with the split's label map. A FolderDataset is
    not split across ranks here (use a DistributedSampler); a ShardDataset is."""
    if channels.shards:
        return ShardDataset(channels.shards, split, transform=transform,
                            shuffle=split == "train", seed=seed,
                            ranks=RankSlice(rank, world_size), return_key=return_key)
    images, annotations = channels.images(split), channels.annotations(split)
    if not images or not annotations:
        raise DataError(f"no {split} data: give the {split} and {split}_annotation channels "
                        "(or shards)")
    return FolderDataset(images, annotations, label_map=channels.label_map, transform=transform,
                         seed=seed, split=split, return_key=return_key)
