"""One epoch of training and one pass of validation, torchvision's reference-script shape.

:func:`train_one_epoch` runs :func:`kubeseg.engine.step.train_step` over this process's
loader, with a progress line every ``log_every`` iterations (and a tqdm bar on a terminal),
and returns the epoch's record (mean loss over all ranks, throughput, learning rate).
:func:`validate` returns confusion-matrix metrics summed over ranks.
"""
from __future__ import annotations

import logging
import math
import sys
import time
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from kubeseg.engine import distributed as D
from kubeseg.inference import output_counts, predict_logits
from kubeseg.engine.loaders import Loaders
from kubeseg.engine.step import TrainParts, train_step
from kubeseg.errors import KubesegError
from kubeseg.metrics import ConfusionMatrix

logger = logging.getLogger(__name__)


class Progress:
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


def device_batch(images: torch.Tensor, masks: torch.Tensor, dev: torch.device):
    """A training batch as the loaders give it (uint8 images and masks) -> normalised float32
    images and int64 masks on ``dev`` (copied as uint8: a quarter of the bytes)."""
    from kubeseg.data.transforms import normalise_batch

    return (normalise_batch(images.to(dev, non_blocking=True)),
            masks.to(dev, non_blocking=True).long())


def train_one_epoch(parts: TrainParts, loaders: Loaders, ctx: D.DistContext, epoch: int,
                    epochs: int, steps: int, log_every: int) -> Dict[str, Any]:
    """Train ``steps`` iterations (the same on every rank: DDP needs it); the epoch's record."""
    dev = ctx.device
    loaders.start_epoch(epoch)
    parts.net.train()
    progress = Progress(ctx.is_main, steps, epoch, epochs, log_every)
    loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
    iteration = seen = window_n = 0
    start = window_start = time.perf_counter()
    for images, masks in loaders.train:
        if iteration >= steps:
            break
        iteration += 1
        loss = train_step(parts, *device_batch(images, masks, dev))
        loss_sum += loss
        seen += images.shape[0]
        window_n += 1
        # reading the loss waits for the device: only when a line or the bar shows it
        if iteration % progress.log_every == 0 or iteration == steps or progress.bar is not None:
            _check_finite(parts, float(loss), f"loss is {float(loss)} at epoch {epoch}, "
                          f"iteration {iteration}")
            now = time.perf_counter()
            sps = window_n * images.shape[0] * ctx.world_size / max(now - window_start, 1e-9)
            progress.update(iteration, float(loss), parts.optimizer.param_groups[0]["lr"], sps)
            window_start, window_n = now, 0
    progress.close()
    elapsed = time.perf_counter() - start
    totals = torch.tensor([float(loss_sum), float(iteration), float(seen)],
                          dtype=torch.float64, device=D.comm_device(ctx))
    D.all_reduce_sum(ctx, totals)
    mean_loss = float(totals[0] / max(totals[1], 1))
    _check_finite(parts, mean_loss, f"mean loss is {mean_loss} in epoch {epoch}")
    return {"epoch": epoch, "train:loss": mean_loss,
            "throughput": float(totals[2]) / max(elapsed, 1e-9),
            "lr": parts.optimizer.param_groups[0]["lr"], "iterations": iteration,
            "time_s": round(elapsed, 3)}


def _check_finite(parts: TrainParts, value: float, where: str) -> None:
    """Stop a diverged run, naming the learning rate to lower. With float16's gradient scaler
    an infinite loss is expected now and then: the scaler skips that step."""
    if math.isfinite(value) or parts.scaler.is_enabled():
        return
    advice = " or use precision_dtype=float32" if parts.autocast_dtype is not None else ""
    raise KubesegError(f"training diverged: {where}; lower learning_rate (now "
                       f"{parts.optimizer.defaults['lr']}){advice}")


class OutputTotals:
    """The model's predicted pixels per class and per confidence bin over a validation pass,
    summed over ranks: the reference that drift monitoring compares served images with."""

    def __init__(self, num_classes: int, device: torch.device):
        from kubeseg.monitoring.drift import CONFIDENCE_BINS

        self.class_pixels = torch.zeros(num_classes, dtype=torch.int64, device=device)
        self.confidence_pixels = torch.zeros(CONFIDENCE_BINS, dtype=torch.int64, device=device)
        self.images = torch.zeros((), dtype=torch.int64, device=device)

    def add(self, logits: torch.Tensor) -> None:
        classes, confidences = output_counts(logits)
        self.class_pixels += classes.sum(dim=0)
        self.confidence_pixels += confidences.sum(dim=0)
        self.images += logits.shape[0]

    def all_reduce(self) -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            for tensor in (self.class_pixels, self.confidence_pixels, self.images):
                dist.all_reduce(tensor, op=dist.ReduceOp.SUM)

    def as_lists(self) -> Dict[str, List[int]]:
        return {"predicted_pixels": self.class_pixels.tolist(),
                "confidence_pixels": self.confidence_pixels.tolist(),
                "validation_images": int(self.images)}


@torch.inference_mode()
def validate(model: nn.Module, loader, num_classes: int, device: torch.device, *,
             autocast_dtype=None, channels_last: bool = False,
             long_side: Optional[int] = None,
             outputs: Optional[OutputTotals] = None) -> Dict[str, Any]:
    """Confusion-matrix metrics over ``loader`` (summed across ranks when distributed).

    ``long_side``: score each batch with its long side rescaled to this many pixels
    (``inference_size=base_size``), the logits resized back to the masks' size. ``outputs``,
    when given, also counts the predictions' classes and confidences (:class:`OutputTotals`)."""
    model.eval()
    cm = ConfusionMatrix(num_classes, device=device)
    for images, masks in loader:
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=device.type, dtype=autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None):
            logits = predict_logits(model, images, long_side=long_side)
        cm.update(logits.max(dim=1).indices, masks.to(device, non_blocking=True))
        if outputs is not None:
            outputs.add(logits)
    cm.all_reduce()
    if outputs is not None:
        outputs.all_reduce()
    return cm.compute()


def metric_pairs(record: Dict[str, Any]) -> str:
    """``train:loss=0.412345 validation:mIOU=0.523456 ...``; metrics without a finite value are
    left out, so a metrics collector never reads a placeholder as a number."""
    names = ("train:loss", "validation:mIOU", "validation:pixel_accuracy")
    return " ".join(f"{name}={record[name]:.6f}" for name in names
                    if isinstance(record.get(name), (int, float))
                    and math.isfinite(record[name]))
