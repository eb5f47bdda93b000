"""The data side of training: loaders per process, label checks, class names and weights.

Each rank sees its own part of the training data (a DistributedSampler, or the shard
reader's own split); validation is split into disjoint parts without padding, and the
confusion matrices are summed over ranks afterwards.
"""
from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence

import numpy as np
import torch

from kubeseg import storage
from kubeseg.config import IGNORE_INDEX, Hyperparameters
from kubeseg.engine import distributed as D
from kubeseg.errors import DataError, KubesegError

logger = logging.getLogger(__name__)


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker from the loader's generator; derive NumPy/Python seeds from it.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


@dataclass
class Loaders:
    """This process's training and validation loaders and what reseeds them every epoch."""

    train: Any  # torch.utils.data.DataLoader
    dataset: Any
    sampler: Any  # DistributedSampler, or None for a dataset that splits itself
    generator: torch.Generator
    validation: Optional[Any]  # DataLoader, or None without validation data
    local_samples: int  # training samples this process sees per epoch
    seed: int
    rank: int
    workers: int

    def total_samples(self, ctx: D.DistContext) -> int:
        """Training samples over all ranks (every rank must call this)."""
        if self.sampler is not None:  # the sampler splits the whole dataset
            return len(self.dataset)
        count = torch.tensor([len(self.dataset)], dtype=torch.int64, device=D.comm_device(ctx))
        return int(D.all_reduce_sum(ctx, count).item())

    def start_epoch(self, epoch: int) -> None:
        """Reshuffle and reseed for ``epoch``: the same stream on a rerun, a resume, any rank
        count."""
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        self.generator.manual_seed(self.seed * 100003 + epoch * 1009 + self.rank)

    def close(self) -> None:
        """Stop the training loader's persistent workers now rather than whenever the loader is
        garbage-collected (a failed run's traceback can keep it alive)."""
        # DataLoader has no public close: dropping its iterator shuts the workers down.
        self.train._iterator = None


def build_loaders(hp: Hyperparameters, channels, ctx: D.DistContext, workers: int) -> Loaders:
    """The loaders of this process (rank ``ctx.rank`` of ``ctx.world_size``)."""
    from torch.utils.data import DataLoader, DistributedSampler, IterableDataset

    from kubeseg.data.datasets import build_dataset
    from kubeseg.data.transforms import TrainTransform

    # uint8 samples: a quarter of the bytes through the workers' shared memory; the batch is
    # normalised where it is used (train_batch).
    transform = TrainTransform(hp.base_size, hp.effective_crop_size, normalise=False)
    train_ds = build_dataset(channels, "train", transform, rank=ctx.rank,
                             world_size=ctx.world_size, seed=hp.seed)
    common = dict(num_workers=workers, pin_memory=ctx.device.type == "cuda",
                  worker_init_fn=_seed_worker)
    generator = torch.Generator()
    sampler = None
    if isinstance(train_ds, IterableDataset):
        n_local = len(train_ds)
    else:
        sampler = DistributedSampler(train_ds, num_replicas=ctx.world_size, rank=ctx.rank,
                                     shuffle=True, seed=hp.seed, drop_last=False)
        n_local = len(sampler)
    if n_local == 0:
        raise DataError("the training data is empty (for this rank): check the train channels")
    # Dropping the last partial batch keeps BatchNorm away from a batch of one image.
    # The training workers persist across epochs: set_epoch reaches them through shared
    # memory (SharedEpoch), and starting them again every epoch costs a fork per worker.
    train_loader = DataLoader(train_ds, batch_size=hp.mini_batch_size, sampler=sampler,
                              drop_last=n_local >= hp.mini_batch_size, generator=generator,
                              persistent_workers=workers > 0, **common)
    val_loader = None
    if _has_split(channels, "validation"):
        val_loader = _validation_loader(hp, channels, ctx, common)
    return Loaders(train=train_loader, dataset=train_ds, sampler=sampler, generator=generator,
                   validation=val_loader, local_samples=n_local, seed=hp.seed, rank=ctx.rank,
                   workers=workers)


def _validation_loader(hp: Hyperparameters, channels, ctx: D.DistContext, common: dict):
    from torch.utils.data import DataLoader, IterableDataset, Subset

    from kubeseg.data.datasets import build_dataset
    from kubeseg.data.transforms import EvalTransform

    eval_crop = None if hp.validates_whole_images else hp.effective_crop_size
    val_ds = build_dataset(channels, "validation", EvalTransform(crop_size=eval_crop),
                           rank=ctx.rank, world_size=ctx.world_size, seed=hp.seed)
    if not isinstance(val_ds, IterableDataset) and ctx.distributed:
        # Each rank scores a disjoint part, without the padding DistributedSampler adds.
        val_ds = Subset(val_ds, list(range(ctx.rank, len(val_ds), ctx.world_size)))
    return DataLoader(val_ds, batch_size=hp.validation_mini_batch_size, shuffle=False,
                      drop_last=False, **common)


def read_label_map(channels) -> Optional[dict]:
    """The training label map as JSON (stored in the artifact); None when there is none."""
    uri = getattr(channels, "label_map", None)
    if not uri:
        return None
    from kubeseg.data.labelmap import LabelMap

    return LabelMap.load(uri, split="train").to_dict()


def class_names_from_shards(channels) -> Optional[List[str]]:
    shards = getattr(channels, "shards", None)
    if not shards:
        return None
    try:
        index = json.loads(storage.read_text(storage.join(shards, "index.json")))
    except (KubesegError, json.JSONDecodeError):
        return None
    names = index.get("class_names")
    return list(names) if names else None


MAX_LABEL_FILES = 10  # files named when labels are out of range


def check_labels(dataset, num_classes: int, workers: int = 8) -> None:
    """Before training: every annotation's class ids (after the label map) are below
    ``num_classes`` or ignore (255); else a DataError naming the files and their values.

    Folder datasets are checked here; shard sets were checked when they were ingested.
    """
    from kubeseg.data.datasets import FolderDataset
    from kubeseg.data.manifest import decode_mask

    if not isinstance(dataset, FolderDataset):
        return
    lut = dataset.label_map.lut

    def out_of_range(pair) -> List[int]:
        mask = decode_mask(storage.read_bytes(pair.annotation), source=pair.annotation)
        present = np.nonzero(np.bincount(lut[mask.ravel()], minlength=256))[0]
        return [int(v) for v in present if num_classes <= v < IGNORE_INDEX]

    bad = sorted((pair.annotation, values) for pair, values in
                 storage.iter_parallel(out_of_range, dataset.pairs, workers) if values)
    if bad:
        listed = "; ".join(f"{uri}: {values[:10]}" for uri, values in bad[:MAX_LABEL_FILES])
        more = f" and {len(bad) - MAX_LABEL_FILES} more file(s)" if len(bad) > MAX_LABEL_FILES \
            else ""
        raise DataError(f"{len(bad)} annotation file(s) hold class ids >= num_classes="
                        f"{num_classes} (other than ignore {IGNORE_INDEX}): {listed}{more}; fix "
                        "the annotations, num_classes or the label map (kubeseg validate "
                        "lists them all)")


def _has_split(channels, split: str) -> bool:
    if getattr(channels, "shards", None):
        return True  # the shard index decides; build_dataset reports a missing split
    return bool(getattr(channels, split, None)) and bool(getattr(channels, f"{split}_annotation",
                                                                 None))


def training_class_statistics(hp: Hyperparameters, channels, ctx: D.DistContext, *,
                              workers: int = 8):
    """The training split's class histogram (:class:`kubeseg.data.statistics.ClassStatistics`),
    counted by every rank on its part and summed. Counted once per run: it gives
    ``class_weights=auto`` its weights, and the artifact records it as the reference of drift
    monitoring."""
    from kubeseg.data.statistics import ClassStatistics, split_statistics

    start = time.perf_counter()
    stats = split_statistics(channels, "train", hp.num_classes, rank=ctx.rank,
                             world_size=ctx.world_size, workers=workers)
    if ctx.distributed:
        totals = torch.tensor(np.concatenate([stats.pixels, stats.image_pixels,
                                              [stats.images]]),
                              dtype=torch.float64, device=D.comm_device(ctx))
        D.all_reduce_sum(ctx, totals)
        values = totals.cpu().numpy()
        n = hp.num_classes
        stats = ClassStatistics(values[:n], values[n:2 * n], int(values[-1]))
    if ctx.is_main:
        logger.info("training split's class histogram: %d images, %d labelled pixels (%.1f s)",
                    stats.images, int(stats.pixels.sum()), time.perf_counter() - start)
    return stats


def resolve_class_weights(hp: Hyperparameters, stats, ctx: D.DistContext, *,
                          class_names: Optional[Sequence[str]] = None) -> Optional[List[float]]:
    """The loss weights per class: the given ones, none, or (``class_weights=auto``) the
    square-root median-frequency weights of the training split's class histogram ``stats``
    (:func:`training_class_statistics`)."""
    if not hp.auto_class_weights:
        return [float(w) for w in hp.class_weights] or None
    from kubeseg.data.statistics import sqrt_median_frequency_weights

    weights = sqrt_median_frequency_weights(stats)
    if ctx.is_main:
        names = list(class_names) if class_names else [f"class_{i}"
                                                       for i in range(hp.num_classes)]
        absent = [names[i] for i in range(hp.num_classes) if stats.pixels[i] == 0]
        logger.info("class_weights=auto: square-root median-frequency weights from the "
                    "training split's class histogram (%d images): %s%s", stats.images,
                    ", ".join(f"{n} {w:.4f}" for n, w in zip(names, weights)),
                    f"; no pixels of {', '.join(absent)} (weight 1)" if absent else "")
    return weights
