"""The training loop: one function, :func:`train`, used by ``kubeseg train`` and the pipeline.

What happens, in order:

1. Distributed set-up from torchrun's environment (a single process needs none), seeding of
   Python, NumPy and torch (DataLoader workers are seeded from the loader's generator).
2. Datasets from the channels (folders or Parquet shards); each rank sees its own part
   (:mod:`kubeseg.engine.loaders`). With ``class_weights=auto`` the loss weights come from the
   training split's class histogram (each rank counts its part; the sums are shared), are
   logged, and go into the artifact.
3. The model: backbone from pretrained weights (a URI, or torchvision's default), or the whole
   model from an earlier artifact (incremental training; its algorithm, backbone, crop_size and
   num_classes must match). Then the parts of a step (:mod:`kubeseg.engine.step`):
   channels-last, DistributedDataParallel, ``torch.compile``, optimizer, schedule, loss.
4. If ``<output>/checkpoints/last.pt`` exists, everything is restored from it and training
   continues with the next epoch (a restarted or preempted job resumes).
5. Per epoch (:mod:`kubeseg.engine.loop`): training with a progress line every ``log_every``
   iterations (and a tqdm bar on a terminal), validation mIoU from a confusion matrix summed
   over ranks, the artifact at ``<output>/model`` when the epoch is the best so far, the
   checkpoint, then ``<output>/metrics.jsonl`` (one JSON object per epoch). Only rank 0 writes.
"""
from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from kubeseg import storage
from kubeseg.config import Hyperparameters
from kubeseg.engine import checkpoint as ckpt
from kubeseg.engine import distributed as D
from kubeseg.engine.checkpoint import EarlyStopping, TrainState
from kubeseg.engine.loaders import (Loaders, build_loaders, check_labels,
                                    class_names_from_shards, read_label_map,
                                    resolve_class_weights, training_class_statistics)
from kubeseg.engine.loop import OutputTotals, metric_pairs, train_one_epoch, validate
from kubeseg.engine.optim import iterations_per_epoch
from kubeseg.engine.step import TrainParts, build_parts
from kubeseg.engine.summary import ARTIFACT_DIR, METRICS_FILE, TrainingSummary
from kubeseg.errors import ConfigError, DataError
from kubeseg.strict_json import json_safe

logger = logging.getLogger(__name__)

INCREMENTAL_MUST_MATCH = ("algorithm", "backbone", "crop_size", "num_classes")
# what resuming cannot change: the checkpoint's weights would not fit
RESUME_MUST_MATCH = ("algorithm", "backbone", "num_classes")

__all__ = ["train", "TrainOptions", "TrainResult", "check_labels", "check_incremental",
           "seed_everything"]


@dataclass
class TrainResult:
    """What a training run produced: where its files are, its best epoch, and every epoch's
    metrics (what a pipeline step records without reading the files back)."""

    output_uri: str
    best_miou: float
    best_epoch: int
    history: List[Dict[str, Any]] = field(default_factory=list)
    stopped_early: bool = False
    model: Optional[nn.Module] = None  # the final epoch's weights (unwrapped), on the device

    @property
    def artifact_uri(self) -> str:
        return storage.join(self.output_uri, ARTIFACT_DIR)

    @property
    def metrics_uri(self) -> str:
        return storage.join(self.output_uri, METRICS_FILE)

    @property
    def checkpoint_uri(self) -> str:
        return ckpt.checkpoint_uri(self.output_uri)

    def summary(self) -> TrainingSummary:
        return TrainingSummary(self.output_uri, self.artifact_uri, list(self.history))


@dataclass(frozen=True)
class TrainOptions:
    """How a run uses this process (not hyperparameters: not recorded in the artifact):
    DataLoader ``workers`` per process, a progress line every ``log_every`` iterations."""

    workers: int = 2
    log_every: int = 10


@dataclass(frozen=True)
class _Run:
    """What stays fixed over a run's epochs: settings, where files go, what the artifact
    records about the classes."""

    hp: Hyperparameters
    ctx: D.DistContext
    output_uri: str
    log_every: int
    class_names: Optional[List[str]] = None
    label_map: Optional[dict] = None
    class_weights: Optional[List[float]] = None
    train_class_pixels: Optional[List[float]] = None  # the training split's labels per class
    train_images: int = 0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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


def train(hp: Hyperparameters, channels, output_uri: str, *, pretrained_uri: Optional[str] = None,
          initial_model_uri: Optional[str] = None, device: Optional[str] = None,
          class_names: Optional[Sequence[str]] = None,
          options: TrainOptions = TrainOptions()) -> TrainResult:
    """Train a model on ``channels`` and write checkpoints, metrics and the artifact.

    ``hp``: the hyperparameters. ``channels``: a :class:`kubeseg.data.channels.Channels`.
    ``output_uri``: local folder or s3:// prefix receiving ``metrics.jsonl``,
    ``checkpoints/last.pt`` and the artifact ``model/``. ``pretrained_uri``: the backbone's published
    state dict (used when ``hp.use_pretrained_model``; without it the public ImageNet weights
    are downloaded). ``initial_model_uri``: an earlier kubeseg artifact
    to start from (incremental training). ``device``: "cpu", "cuda", "cuda:1" or None (auto).
    ``options``: loader workers and progress lines (:class:`TrainOptions`). Run under torchrun
    for several processes.
    """
    ctx = D.init_distributed(device)
    loaders = None
    try:
        saved = ckpt.load_checkpoint(ckpt.checkpoint_uri(output_uri))
        if saved is not None:
            _check_resumable(hp, saved, ckpt.checkpoint_uri(output_uri))
        model = _initial_model(hp, ctx, saved is not None, pretrained_uri, initial_model_uri)
        loaders = build_loaders(hp, channels, ctx, options.workers)
        run = _prepare_run(hp, channels, ctx, loaders, output_uri, options.log_every,
                           class_names)
        parts = build_parts(model, hp, ctx.device,
                            iters_per_epoch=iterations_per_epoch(hp, ctx.world_size),
                            class_weights=run.class_weights,
                            wrap=lambda m: D.wrap_model(ctx, m, hp.syncbn))
        state = _restore(parts, saved, run)
        return _train_epochs(run, parts, loaders, state)
    finally:
        if loaders is not None:
            loaders.close()
        D.cleanup(ctx)


def _check_resumable(hp: Hyperparameters, saved: Dict[str, Any], uri: str) -> None:
    before = saved.get("hyperparameters", {})
    changed = sorted(k for k, v in hp.to_dict().items() if before.get(k) != v)
    for key in RESUME_MUST_MATCH:
        if key in changed:
            raise ConfigError([f"{key}={getattr(hp, key)} differs from the checkpoint in "
                               f"{uri} ({key}={before.get(key)}); use a new output location "
                               "or the same hyperparameters"])
    if changed:
        logger.warning("resuming with changed hyperparameters: %s", ", ".join(changed))


def _initial_model(hp: Hyperparameters, ctx: D.DistContext, resuming: bool,
                   pretrained_uri: Optional[str], initial_model_uri: Optional[str]) -> nn.Module:
    """Identical initial weights on every rank (same seed), then per-rank random streams."""
    from kubeseg.models import TORCHVISION_DEFAULT, build_model

    seed_everything(hp.seed)
    pretrained = None
    if not resuming and initial_model_uri is None and hp.use_pretrained_model:
        pretrained = pretrained_uri or TORCHVISION_DEFAULT
    model = build_model(algorithm=hp.algorithm, backbone=hp.backbone,
                        num_classes=hp.num_classes, aux_loss=hp.aux_loss_weight > 0,
                        pretrained_backbone=pretrained, output_stride=hp.output_stride)
    if not resuming and initial_model_uri:
        _load_initial_model(model, hp, initial_model_uri)
    seed_everything(hp.seed + 1000 * ctx.rank)
    return model


def _prepare_run(hp: Hyperparameters, channels, ctx: D.DistContext, loaders: Loaders,
                 output_uri: str, log_every: int, class_names: Optional[Sequence[str]]) -> _Run:
    """Check the data against the hyperparameters; class names, label map and loss weights."""
    label_map = read_label_map(channels)
    names = list(class_names) if class_names else class_names_from_shards(channels)
    if names and len(names) != hp.num_classes:
        logger.warning("%d class names for num_classes=%d; using generic names", len(names),
                       hp.num_classes)
        names = None
    check_labels(loaders.dataset, hp.num_classes)
    if loaders.validation is not None:
        val = loaders.validation.dataset
        check_labels(getattr(val, "dataset", val), hp.num_classes)
    if hp.early_stopping and loaders.validation is None:
        raise ConfigError(["early_stopping=True needs validation data (validation and "
                           "validation_annotation channels)"])
    stats = training_class_statistics(hp, channels, ctx, workers=max(4, 2 * loaders.workers))
    weights = resolve_class_weights(hp, stats, ctx, class_names=names)
    return _Run(hp=hp, ctx=ctx, output_uri=output_uri, log_every=log_every, class_names=names,
                label_map=label_map, class_weights=weights,
                train_class_pixels=[float(v) for v in stats.pixels], train_images=stats.images)


def _restore(parts: TrainParts, saved: Optional[Dict[str, Any]], run: _Run) -> TrainState:
    """A fresh state, or the checkpoint's (weights, optimizer, schedule, random streams)."""
    early_stopping = EarlyStopping.from_hyperparameters(run.hp)
    if saved is None:
        return TrainState(early_stopping=early_stopping)
    parts.model.load_state_dict(saved["model"])
    parts.optimizer.load_state_dict(saved["optimizer"])
    parts.scheduler.load_state_dict(saved["scheduler"])
    if saved.get("scaler"):
        parts.scaler.load_state_dict(saved["scaler"])
    state = TrainState.from_checkpoint(saved, early_stopping)
    ctx = run.ctx
    rng = saved.get("rng") or []
    if len(rng) == ctx.world_size:
        ckpt.restore_rng_state(rng[ctx.rank])
    else:
        logger.warning("checkpoint has RNG states for %d processes, this run has %d; "
                       "random streams restart", len(rng), ctx.world_size)
    if ctx.is_main:
        logger.info("resuming from %s after epoch %d (best mIoU %.4f at epoch %d)",
                    ckpt.checkpoint_uri(run.output_uri), state.epoch, state.best_miou,
                    state.best_epoch)
    return state


def _train_epochs(run: _Run, parts: TrainParts, loaders: Loaders,
                  state: TrainState) -> TrainResult:
    from kubeseg import artifact

    hp, ctx = run.hp, run.ctx
    steps = D.all_reduce_min_int(ctx, len(loaders.train))
    _check_schedule(hp, ctx, loaders, steps)
    if ctx.is_main:
        logger.info("training %s/%s, %d classes, %d epochs x %d iterations, batch %d x %d "
                    "process(es), crop %d, device %s, precision %s%s%s", hp.algorithm,
                    hp.backbone, hp.num_classes, hp.epochs, steps, hp.mini_batch_size,
                    ctx.world_size, hp.effective_crop_size, ctx.device,
                    parts.autocast_dtype or torch.float32,
                    ", channels-last" if parts.channels_last else "",
                    ", torch.compile" if hp.compile else "")
    while state.epoch < hp.epochs and not state.stopped_early:
        record = train_one_epoch(parts, loaders, ctx, state.epoch + 1, hp.epochs, steps,
                                 run.log_every)
        _end_epoch(run, parts, loaders, state, record)
    artifact_uri = storage.join(run.output_uri, ARTIFACT_DIR)
    if ctx.is_main and not storage.exists(storage.join(artifact_uri, artifact.MARKER_FILE)):
        _save_artifact(run, parts.model, state.epoch, None, None)
    D.barrier(ctx)
    return TrainResult(output_uri=run.output_uri, best_miou=state.best_miou,
                       best_epoch=state.best_epoch, history=state.history,
                       stopped_early=state.stopped_early, model=parts.model)


def _check_schedule(hp: Hyperparameters, ctx: D.DistContext, loaders: Loaders,
                    steps: int) -> None:
    """Warn when num_training_samples ends the learning-rate schedule before training ends."""
    total = loaders.total_samples(ctx)
    if not ctx.is_main or total == hp.num_training_samples:
        return
    scheduled = iterations_per_epoch(hp, ctx.world_size)
    if hp.num_training_samples < total and scheduled < steps \
            and hp.lr_scheduler in ("poly", "cosine"):
        logger.warning("num_training_samples=%d but the training data holds %d samples: the %s "
                       "learning-rate schedule reaches 0 after %d of %d iterations and the rest "
                       "of training runs at learning rate 0; set num_training_samples=%d",
                       hp.num_training_samples, total, hp.lr_scheduler, hp.epochs * scheduled,
                       hp.epochs * steps, total)
    else:
        logger.info("num_training_samples=%d (drives the schedule); the train data holds "
                    "about %d samples", hp.num_training_samples, total)


def _end_epoch(run: _Run, parts: TrainParts, loaders: Loaders, state: TrainState,
               record: Dict[str, Any]) -> None:
    """Validate, count the epoch, and (rank 0) write artifact, checkpoint and metrics."""
    hp, ctx = run.hp, run.ctx
    D.average_buffers(ctx, parts.model)
    metrics, miou, outputs = {}, None, None
    if loaders.validation is not None:
        outputs = OutputTotals(hp.num_classes, ctx.device)
        if ctx.is_main:
            logger.info("epoch %d/%d: validating (%d batches on this process)", record["epoch"],
                        hp.epochs, len(loaders.validation))
        # whole images at the size evaluation and serving score them; batched validation's
        # centre crops are already at the crop's scale
        metrics = validate(parts.model, loaders.validation, hp.num_classes, ctx.device,
                           autocast_dtype=parts.autocast_dtype,
                           channels_last=parts.channels_last,
                           long_side=hp.inference_long_side if hp.validates_whole_images
                           else None, outputs=outputs)
        for key in ("mIOU", "pixel_accuracy", "mean_class_accuracy"):
            record[f"validation:{key}"] = metrics[key]
        miou = metrics["mIOU"] if math.isfinite(metrics["mIOU"]) else 0.0
    is_best = state.end_epoch(json_safe(record), miou)
    rng_states = [ckpt.capture_rng_state()]
    if ctx.distributed:
        rng_states = [None] * ctx.world_size
        torch.distributed.all_gather_object(rng_states, ckpt.capture_rng_state())
    if ctx.is_main:
        if is_best:
            _save_artifact(run, parts.model, state.epoch, metrics, outputs)
        _save_checkpoint(run, parts, state, rng_states)
        storage.write_text(storage.join(run.output_uri, METRICS_FILE),
                           "".join(json.dumps(r, sort_keys=True) + "\n" for r in state.history))
        _log_epoch(run, state, record, is_best)
    D.barrier(ctx)


def _save_artifact(run: _Run, model: nn.Module, epoch: int,
                   metrics: Optional[Dict[str, Any]], outputs: Optional[OutputTotals]) -> None:
    """The artifact of ``epoch``, with the reference drift monitoring needs: the training
    split's class histogram and, from this epoch's validation pass (``outputs``), the model's
    predicted classes and confidences."""
    from kubeseg import artifact
    from kubeseg.monitoring.drift import TrainingBaseline

    classes = artifact.ClassInfo(names=run.class_names, label_map=run.label_map,
                                 weights=run.class_weights)
    validation = outputs.as_lists() if outputs is not None else {}
    baseline = TrainingBaseline(
        class_pixels=tuple(run.train_class_pixels), train_images=run.train_images,
        confidence_pixels=validation.get("confidence_pixels"),
        predicted_pixels=validation.get("predicted_pixels"),
        validation_images=validation.get("validation_images", 0))
    artifact.save_artifact(storage.join(run.output_uri, ARTIFACT_DIR), model=model,
                           hyperparameters=run.hp, classes=classes, epoch=epoch,
                           metrics=metrics, baseline=baseline.to_dict())


def _save_checkpoint(run: _Run, parts: TrainParts, state: TrainState,
                     rng_states: List[Any]) -> None:
    ckpt.save_checkpoint(ckpt.checkpoint_uri(run.output_uri), {
        "format_version": ckpt.FORMAT_VERSION, "model": parts.model.state_dict(),
        "optimizer": parts.optimizer.state_dict(), "scheduler": parts.scheduler.state_dict(),
        "scaler": parts.scaler.state_dict() if parts.scaler.is_enabled() else None,
        "rng": rng_states, "hyperparameters": run.hp.to_dict(), **state.to_checkpoint()})


def _log_epoch(run: _Run, state: TrainState, record: Dict[str, Any], is_best: bool) -> None:
    hp = run.hp
    # name=value pairs: the form Katib's StdOut metrics collector parses
    logger.info("epoch %d/%d: %s throughput=%.1f samples/s%s", state.epoch, hp.epochs,
                metric_pairs(record), record["throughput"], " (best)" if is_best else "")
    if state.stopped_early:
        logger.info("early stopping after epoch %d: validation mIoU did not improve by more "
                    "than %.3g (relative) for %d epoch(s); best %.4f at epoch %d", state.epoch,
                    hp.early_stopping_tolerance, state.early_stopping.bad_epochs,
                    state.best_miou, state.best_epoch)
