"""The training loop: one function, :func:`train`, used by ``kubeseg train`` and the pipeline.

What happens, in order:

1. Distributed set-up from torchrun's environment (a single process needs none), seeding of
   Python, NumPy and torch (DataLoader workers are seeded from the loader's generator).
2. Datasets from the channels (folders or Parquet shards); each rank sees its own part. With
   ``class_weights=auto`` the loss weights come from the training split's class histogram
   (each rank counts its part; the sums are shared), are logged, and go into the artifact.
3. The model: backbone from pretrained weights (a URI, or torchvision's default), or the whole
   model from an earlier artifact (incremental training; its algorithm, backbone, crop_size and
   num_classes must match).
4. If ``<output>/checkpoints/last.pt`` exists, everything is restored from it and training
   continues with the next epoch (a restarted or preempted job resumes).
5. Per epoch: training with a progress line every ``log_every`` iterations (and a tqdm bar on a
   terminal), validation mIoU from a confusion matrix summed over ranks, the artifact at
   ``<output>/model`` when the epoch is the best so far, the checkpoint, then
   ``<output>/metrics.jsonl`` (one JSON object per epoch). Only rank 0 writes.

Precision: ``precision_dtype`` bfloat16/float16 use ``torch.autocast`` on CUDA (float16 with a
gradient scaler); on CPU bfloat16 uses CPU autocast and float16 falls back to float32 (with a
warning). The loss is always computed in float32.
"""
from __future__ import annotations

import json
import logging
import math
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from kubeseg import storage
from kubeseg.config import IGNORE_INDEX, Hyperparameters
from kubeseg.engine import checkpoint as ckpt
from kubeseg.engine import distributed as D
from kubeseg.engine.optim import build_optimizer, build_scheduler, iterations_per_epoch
from kubeseg.engine.summary import ARTIFACT_DIR as MODEL_DIR
from kubeseg.engine.summary import METRICS_FILE
from kubeseg.errors import ConfigError, DataError, KubesegError
from kubeseg.metrics import ConfusionMatrix
from kubeseg.strict_json import json_safe

logger = logging.getLogger(__name__)

INCREMENTAL_MUST_MATCH = ("algorithm", "backbone", "crop_size", "num_classes")


@dataclass
class TrainResult:
    artifact_uri: str
    best_miou: float
    best_epoch: int
    history: List[Dict[str, Any]] = field(default_factory=list)
    stopped_early: bool = False
    model: Optional[nn.Module] = None  # the final epoch's weights (unwrapped), on the device


# --------------------------------------------------------------------------------------------
# Helpers
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker from the loader's generator; derive NumPy/Python seeds from it.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def _precision(hp: Hyperparameters, device: torch.device):
    """(autocast dtype or None, use a gradient scaler).

    CUDA: bfloat16 and float16 autocast (float16 with a gradient scaler). CPU: bfloat16 autocast
    (fast on CPUs with AVX512-BF16/AMX); float16 falls back to float32 with a warning.
    """
    if hp.precision_dtype == "float32":
        return None, False
    if hp.precision_dtype == "bfloat16":
        return torch.bfloat16, False
    if device.type != "cuda":
        logger.warning("precision_dtype=float16 needs CUDA; training on %s runs in float32 "
                       "(bfloat16 works on CPU)", device.type)
        return None, False
    return torch.float16, True





def _read_label_map(channels) -> Optional[dict]:
    """The training label map as JSON (stored in the artifact); None when there is none."""
    uri = getattr(channels, "label_map", None)
    if not uri:
        return None
    from kubeseg.data.labelmap import LabelMap

    return LabelMap.load(uri, split="train").to_dict()


def _class_names_from_shards(channels) -> Optional[List[str]]:
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


def check_incremental(hp: Hyperparameters, info, model_uri: str) -> None:
    """Raise ConfigError when an earlier artifact cannot seed this training."""
    ours = {"algorithm": hp.algorithm, "backbone": hp.backbone,
            "crop_size": hp.effective_crop_size, "num_classes": hp.num_classes}
    theirs = {"algorithm": info.algorithm, "backbone": info.backbone,
              "crop_size": info.crop_size, "num_classes": info.num_classes}
    problems = [f"{k}={ours[k]} but the model channel {model_uri} was trained with "
                f"{k}={theirs[k]}; incremental training needs the same {k}"
                for k in INCREMENTAL_MUST_MATCH if ours[k] != theirs[k]]
    if problems:
        raise ConfigError(problems)


def _load_initial_model(model: nn.Module, hp: Hyperparameters, uri: str) -> None:
    from kubeseg import artifact

    info = artifact.read_info(uri)
    check_incremental(hp, info, uri)
    state = artifact.read_state_dict(uri)
    own = model.state_dict()
    # The auxiliary head may be present in one and not the other (aux_loss_weight=0).
    state = {k: v for k, v in state.items() if k in own or not k.startswith("aux_head.")}
    missing = [k for k in own if k not in state and not k.startswith("aux_head.")]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise DataError(f"model channel {uri}: weights do not fit this model (missing "
                        f"{missing[:5]}, unexpected {unexpected[:5]})")
    model.load_state_dict(state, strict=False)
    logger.info("initialised from the earlier model %s (incremental training)", uri)


class _Progress:
    """A progress line every ``log_every`` iterations, plus a tqdm bar on a terminal."""

    def __init__(self, enabled: bool, total: int, epoch: int, epochs: int, log_every: int):
        self.enabled, self.total, self.epoch, self.epochs = enabled, total, epoch, epochs
        self.log_every = max(1, int(log_every))
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=f"epoch {epoch}/{epochs}", unit="it",
                            leave=False, dynamic_ncols=True)

    def update(self, iteration: int, loss: float, lr: float, samples_per_s: float) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}",
                                 sps=f"{samples_per_s:.1f}")
        elif iteration % self.log_every == 0 or iteration == self.total:
            logger.info("epoch %d/%d iter %d/%d loss %.4f lr %.3e %.1f samples/s",
                        self.epoch, self.epochs, iteration, self.total, loss, lr,
                        samples_per_s)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------------------------------
# Data
def _loaders(hp: Hyperparameters, channels, ctx: D.DistContext, workers: int):
    from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, Subset

    from kubeseg.data.datasets import build_dataset
    from kubeseg.data.transforms import EvalTransform, TrainTransform

    crop = hp.effective_crop_size
    train_ds = build_dataset(channels, "train", TrainTransform(hp.base_size, crop),
                             rank=ctx.rank, world_size=ctx.world_size, seed=hp.seed)
    pin = ctx.device.type == "cuda"
    common = dict(num_workers=workers, pin_memory=pin, worker_init_fn=_seed_worker,
                  persistent_workers=False)
    generator = torch.Generator()
    if isinstance(train_ds, IterableDataset):
        sampler = None
        n_local = len(train_ds)
    else:
        sampler = DistributedSampler(train_ds, num_replicas=ctx.world_size, rank=ctx.rank,
                                     shuffle=True, seed=hp.seed, drop_last=False)
        n_local = len(sampler)
    if n_local == 0:
        raise DataError("the training data is empty (for this rank): check the train channels")
    # Dropping the last partial batch keeps BatchNorm away from a batch of one image.
    drop_last = n_local >= hp.mini_batch_size
    train_loader = DataLoader(train_ds, batch_size=hp.mini_batch_size, sampler=sampler,
                              drop_last=drop_last, generator=generator, **common)
    val_loader = None
    if _has_split(channels, "validation"):
        eval_crop = None if hp.validation_mini_batch_size == 1 else crop
        val_ds = build_dataset(channels, "validation", EvalTransform(crop_size=eval_crop),
                               rank=ctx.rank, world_size=ctx.world_size, seed=hp.seed)
        if not isinstance(val_ds, IterableDataset) and ctx.distributed:
            # Each rank scores a disjoint part, without the padding DistributedSampler adds.
            val_ds = Subset(val_ds, list(range(ctx.rank, len(val_ds), ctx.world_size)))
        val_loader = DataLoader(val_ds, batch_size=hp.validation_mini_batch_size,
                                shuffle=False, drop_last=False, **common)
    return train_ds, sampler, train_loader, generator, val_loader, n_local


# --------------------------------------------------------------------------------------------
# Validation
@torch.inference_mode()
def validate(model: nn.Module, loader, num_classes: int, device: torch.device, *,
             autocast_dtype=None, channels_last: bool = False) -> Dict[str, Any]:
    """Confusion-matrix metrics over ``loader`` (summed across ranks when distributed)."""

    model.eval()
    cm = ConfusionMatrix(num_classes, device=device)
    for images, masks in loader:
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=device.type, dtype=autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None):
            logits = model(images)["out"]
        cm.update(logits.argmax(dim=1), masks.to(device, non_blocking=True))
    cm.all_reduce()
    return cm.compute()


# --------------------------------------------------------------------------------------------
# Training
def resolve_class_weights(hp: Hyperparameters, channels, ctx: D.DistContext, *,
                          workers: int = 8,
                          class_names: Optional[Sequence[str]] = None) -> Optional[List[float]]:
    """The loss weights per class: the given ones, none, or (``class_weights=auto``) the
    square-root median-frequency weights of the training split's class histogram, counted
    by every rank on its part and summed."""
    if not hp.auto_class_weights:
        return [float(w) for w in hp.class_weights] or None
    from kubeseg.data.statistics import (ClassStatistics, split_statistics,
                                         sqrt_median_frequency_weights)

    start = time.perf_counter()
    stats = split_statistics(channels, "train", hp.num_classes, rank=ctx.rank,
                             world_size=ctx.world_size, workers=workers)
    if ctx.distributed:
        totals = torch.tensor(np.concatenate([stats.pixels, stats.image_pixels,
                                              [stats.images]]),
                              dtype=torch.float64, device=D._comm_device(ctx))
        D.all_reduce_sum(ctx, totals)
        values = totals.cpu().numpy()
        n = hp.num_classes
        stats = ClassStatistics(values[:n], values[n:2 * n], int(values[-1]))
    weights = sqrt_median_frequency_weights(stats)
    if ctx.is_main:
        names = list(class_names) if class_names else [f"class_{i}"
                                                       for i in range(hp.num_classes)]
        absent = [names[i] for i in range(hp.num_classes) if stats.pixels[i] == 0]
        logger.info("class_weights=auto: square-root median-frequency weights from the "
                    "training split's class histogram (%d images, %.1f s): %s%s", stats.images,
                    time.perf_counter() - start,
                    ", ".join(f"{n} {w:.4f}" for n, w in zip(names, weights)),
                    f"; no pixels of {', '.join(absent)} (weight 1)" if absent else "")
    return weights


def _loss_fn(hp: Hyperparameters, device: torch.device,
             class_weights: Optional[Sequence[float]] = None):
    """Cross entropy (plus the auxiliary head's); ``class_weights`` default to the
    hyperparameter's explicit ones (``class_weights=auto`` is resolved by
    :func:`resolve_class_weights`)."""
    if class_weights is None and not hp.auto_class_weights:
        class_weights = hp.class_weights
    weight = None
    if class_weights:
        weight = torch.tensor(list(class_weights), dtype=torch.float32, device=device)
    ce = nn.CrossEntropyLoss(weight=weight, ignore_index=IGNORE_INDEX)

    def loss(outputs: Dict[str, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        value = ce(outputs["out"].float(), target)
        if "aux" in outputs and hp.aux_loss_weight > 0:
            value = value + hp.aux_loss_weight * ce(outputs["aux"].float(), target)
        return value

    return loss


def train(hp: Hyperparameters, channels, output_uri: str, *, pretrained_uri: Optional[str] = None,
          initial_model_uri: Optional[str] = None, device: Optional[str] = None,
          workers: int = 2, log_every: int = 10,
          class_names: Optional[Sequence[str]] = None) -> TrainResult:
    """Train a model on ``channels`` and write checkpoints, metrics and the artifact.

    ``hp``: the hyperparameters. ``channels``: a :class:`kubeseg.data.channels.Channels`.
    ``output_uri``: local folder or s3:// prefix receiving ``metrics.jsonl``,
    ``checkpoints/last.pt`` and the artifact ``model/``. ``pretrained_uri``: torchvision ResNet
    state dict for the backbone (used when ``hp.use_pretrained_model``; without it torchvision's
    default ImageNet weights are downloaded). ``initial_model_uri``: an earlier kubeseg artifact
    to start from (incremental training). ``device``: "cpu", "cuda", "cuda:1" or None (auto).
    Run under torchrun for several processes.
    """
    ctx = D.init_distributed(device)
    try:
        return _train(hp, channels, output_uri, ctx, pretrained_uri, initial_model_uri,
                      workers, log_every, class_names)
    finally:
        D.cleanup(ctx)


def _train(hp, channels, output_uri, ctx, pretrained_uri, initial_model_uri, workers,
           log_every, class_names) -> TrainResult:
    from kubeseg import artifact
    from kubeseg.models import TORCHVISION_DEFAULT, build_model

    dev = ctx.device
    checkpoint_uri = ckpt.checkpoint_uri(output_uri)
    metrics_uri = storage.join(output_uri, METRICS_FILE)
    artifact_uri = storage.join(output_uri, MODEL_DIR)
    state = ckpt.load_checkpoint(checkpoint_uri)
    if state is not None:
        saved = state.get("hyperparameters", {})
        changed = sorted(k for k, v in hp.to_dict().items() if saved.get(k) != v)
        for key in ("algorithm", "backbone", "num_classes"):
            if key in changed:
                raise ConfigError([f"{key}={getattr(hp, key)} differs from the checkpoint in "
                                   f"{checkpoint_uri} ({key}={saved.get(key)}); use a new "
                                   "output location or the same hyperparameters"])
        if changed:
            logger.warning("resuming with changed hyperparameters: %s", ", ".join(changed))

    # Model: identical initial weights on every rank (same seed), then per-rank RNG streams.
    seed_everything(hp.seed)
    pretrained = None
    if state is None and initial_model_uri is None and hp.use_pretrained_model:
        pretrained = pretrained_uri or TORCHVISION_DEFAULT
    model = build_model(algorithm=hp.algorithm, backbone=hp.backbone,
                        num_classes=hp.num_classes, aux_loss=hp.aux_loss_weight > 0,
                        pretrained_backbone=pretrained)
    if state is None and initial_model_uri:
        _load_initial_model(model, hp, initial_model_uri)
    seed_everything(hp.seed + 1000 * ctx.rank)

    label_map = _read_label_map(channels)
    names = list(class_names) if class_names else _class_names_from_shards(channels)
    if names and len(names) != hp.num_classes:
        logger.warning("%d class names for num_classes=%d; using generic names", len(names),
                       hp.num_classes)
        names = None

    train_ds, sampler, train_loader, generator, val_loader, n_local = _loaders(
        hp, channels, ctx, workers)
    check_labels(train_ds, hp.num_classes)
    if val_loader is not None:
        check_labels(getattr(val_loader.dataset, "dataset", val_loader.dataset), hp.num_classes)
    class_weights = resolve_class_weights(hp, channels, ctx, workers=max(4, 2 * workers),
                                          class_names=names)
    steps = D.all_reduce_min_int(ctx, len(train_loader))
    n_total = n_local * ctx.world_size
    if ctx.is_main and n_total != hp.num_training_samples:
        logger.info("num_training_samples=%d (drives the schedule); the train data holds about "
                    "%d samples", hp.num_training_samples, n_total)
    if hp.early_stopping and val_loader is None:
        raise ConfigError(["early_stopping=True needs validation data (validation and "
                           "validation_annotation channels)"])

    autocast_dtype, use_scaler = _precision(hp, dev)
    channels_last = dev.type == "cuda" and hp.channels_last
    model.to(dev)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if ctx.distributed and hp.syncbn:
        if dev.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:
            logger.warning("syncbn=True needs CUDA devices; BatchNorm stays per process on CPU")
    net = model
    if ctx.distributed:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None)
    optimizer = build_optimizer(model.parameters(), hp)
    scheduler = build_scheduler(optimizer, hp, iterations_per_epoch(hp, ctx.world_size))
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    loss_fn = _loss_fn(hp, dev, class_weights)

    start_epoch, best_miou, best_epoch, history = 0, -1.0, 0, []
    es_reference, es_bad_epochs, stopped_early = -1.0, 0, False
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_epoch, history = int(state["epoch"]), list(state["history"])
        best_miou, best_epoch = float(state["best_miou"]), int(state["best_epoch"])
        es_reference, es_bad_epochs = float(state["es_reference"]), int(state["es_bad_epochs"])
        stopped_early = bool(state.get("stopped_early", False))
        rng = state.get("rng") or []
        if len(rng) == ctx.world_size:
            ckpt.restore_rng_state(rng[ctx.rank])
        else:
            logger.warning("checkpoint has RNG states for %d processes, this run has %d; "
                           "random streams restart", len(rng), ctx.world_size)
        if ctx.is_main:
            logger.info("resuming from %s after epoch %d (best mIoU %.4f at epoch %d)",
                        checkpoint_uri, start_epoch, best_miou, best_epoch)

    if ctx.is_main:
        logger.info("training %s/%s, %d classes, %d epochs x %d iterations, batch %d x %d "
                    "process(es), crop %d, device %s, precision %s", hp.algorithm, hp.backbone,
                    hp.num_classes, hp.epochs, steps, hp.mini_batch_size, ctx.world_size,
                    hp.effective_crop_size, dev,
                    autocast_dtype or torch.float32)

    epoch = start_epoch
    while epoch < hp.epochs and not stopped_early:
        epoch += 1
        record = _train_epoch(net, train_loader, sampler, train_ds, generator, optimizer,
                              scheduler, scaler, loss_fn, hp, ctx, epoch, steps, log_every,
                              autocast_dtype, channels_last)
        D.average_buffers(ctx, model)
        if val_loader is not None:
            if ctx.is_main:
                logger.info("epoch %d/%d: validating (%d batches on this process)", epoch,
                            hp.epochs, len(val_loader))
            metrics = validate(model, val_loader, hp.num_classes, dev,
                               autocast_dtype=autocast_dtype, channels_last=channels_last)
            record["validation:mIOU"] = metrics["mIOU"]
            record["validation:pixel_accuracy"] = metrics["pixel_accuracy"]
            record["validation:mean_class_accuracy"] = metrics["mean_class_accuracy"]
            miou = metrics["mIOU"] if math.isfinite(metrics["mIOU"]) else 0.0
        else:
            metrics, miou = {}, 0.0
        is_best = val_loader is None or miou > best_miou
        if is_best:
            best_miou, best_epoch = miou, epoch
        # Early stopping: an epoch improves when it beats the reference by the relative tolerance.
        if miou > es_reference * (1.0 + hp.early_stopping_tolerance) or es_reference < 0:
            es_reference, es_bad_epochs = max(miou, es_reference), 0
        else:
            es_bad_epochs += 1
        if (hp.early_stopping and epoch >= hp.early_stopping_min_epochs
                and es_bad_epochs >= max(1, hp.early_stopping_patience)):
            stopped_early = True
        history.append(json_safe(record))
        rng_states = [ckpt.capture_rng_state()]
        if ctx.distributed:
            rng_states = [None] * ctx.world_size
            torch.distributed.all_gather_object(rng_states, ckpt.capture_rng_state())
        if ctx.is_main:
            if is_best:
                artifact.save_artifact(
                    artifact_uri, model=model, hyperparameters=hp, class_names=names,
                    label_map=label_map, epoch=epoch, metrics=metrics,
                    class_weights=class_weights)
            ckpt.save_checkpoint(checkpoint_uri, {
                "format_version": 1, "epoch": epoch, "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if use_scaler else None, "rng": rng_states,
                "best_miou": best_miou, "best_epoch": best_epoch, "history": history,
                "es_reference": es_reference, "es_bad_epochs": es_bad_epochs,
                "stopped_early": stopped_early, "hyperparameters": hp.to_dict()})
            storage.write_text(metrics_uri, "".join(json.dumps(r, sort_keys=True) + "\n"
                                                    for r in history))
            # name=value pairs: the form Katib's StdOut metrics collector parses
            logger.info("epoch %d/%d: %s throughput=%.1f samples/s%s", epoch, hp.epochs,
                        _metric_pairs(record), record["throughput"],
                        " (best)" if is_best else "")
            if stopped_early:
                logger.info("early stopping after epoch %d: validation mIoU did not improve by "
                            "more than %.3g (relative) for %d epoch(s); best %.4f at epoch %d",
                            epoch, hp.early_stopping_tolerance, es_bad_epochs, best_miou,
                            best_epoch)
        D.barrier(ctx)
    if ctx.is_main and not storage.exists(storage.join(artifact_uri, artifact.MARKER_FILE)):
        artifact.save_artifact(artifact_uri, model=model, hyperparameters=hp,
                               class_names=names, label_map=label_map, epoch=epoch,
                               class_weights=class_weights)
    D.barrier(ctx)
    return TrainResult(artifact_uri=artifact_uri, best_miou=best_miou, best_epoch=best_epoch,
                       history=history, stopped_early=stopped_early, model=model)


def _metric_pairs(record: Dict[str, Any]) -> str:
    """``train:loss=0.412345 validation:mIOU=0.523456 ...``; metrics without a finite value are
    left out, so a metrics collector never reads a placeholder as a number."""
    names = ("train:loss", "validation:mIOU", "validation:pixel_accuracy")
    return " ".join(f"{name}={record[name]:.6f}" for name in names
                    if isinstance(record.get(name), (int, float))
                    and math.isfinite(record[name]))


def _train_epoch(net, loader, sampler, dataset, generator, optimizer, scheduler, scaler,
                 loss_fn, hp, ctx, epoch, steps, log_every, autocast_dtype,
                 channels_last) -> Dict[str, Any]:
    dev = ctx.device
    if sampler is not None:
        sampler.set_epoch(epoch)
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)
    generator.manual_seed(hp.seed * 100003 + epoch * 1009 + ctx.rank)
    net.train()
    progress = _Progress(ctx.is_main, steps, epoch, hp.epochs, log_every)
    loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
    window_n = 0
    seen = 0
    start = window_start = time.perf_counter()
    iteration = 0
    for images, masks in loader:
        if iteration >= steps:
            break  # every rank runs the same number of steps (DDP needs it)
        iteration += 1
        images = images.to(dev, non_blocking=True)
        masks = masks.to(dev, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=dev.type, dtype=autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None):
            outputs = net(images)
        loss = loss_fn(outputs, masks)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        loss_sum += loss.detach()
        seen += images.shape[0]
        window_n += 1
        if iteration % max(1, log_every) == 0 or iteration == steps or progress.bar is not None:
            value = float(loss.detach())
            if not math.isfinite(value) and not scaler.is_enabled():
                raise KubesegError(f"training diverged: loss is {value} at epoch {epoch}, "
                                   f"iteration {iteration}; lower learning_rate "
                                   f"(now {hp.learning_rate}) or use precision_dtype=float32")
            now = time.perf_counter()
            sps = window_n * images.shape[0] * ctx.world_size / max(now - window_start, 1e-9)
            progress.update(iteration, value, optimizer.param_groups[0]["lr"], sps)
            window_start, window_n = now, 0
    progress.close()
    elapsed = time.perf_counter() - start
    totals = torch.tensor([float(loss_sum), float(iteration), float(seen)],
                          dtype=torch.float64, device=D._comm_device(ctx))
    D.all_reduce_sum(ctx, totals)
    mean_loss = float(totals[0] / max(totals[1], 1))
    if not math.isfinite(mean_loss) and not scaler.is_enabled():
        raise KubesegError(f"training diverged: mean loss is {mean_loss} in epoch {epoch}; "
                           f"lower learning_rate (now {hp.learning_rate})")
    return {"epoch": epoch, "train:loss": mean_loss,
            "throughput": float(totals[2]) / max(elapsed, 1e-9),
            "lr": optimizer.param_groups[0]["lr"], "iterations": iteration,
            "time_s": round(elapsed, 3)}
