"""One training step, and the parts it works with, built from the hyperparameters.

:func:`train_step` is the step ``kubeseg train`` runs and the step ``bench/train_step.py``
times: forward under autocast, the loss (with the auxiliary head's), backward, the optimizer
step (through the gradient scaler with float16), the scheduler step. On CUDA the step runs
with cuDNN's benchmark mode on, so the fastest convolution algorithms for the crop's shape are
found once and kept.

Precision: ``precision_dtype`` bfloat16/float16 use ``torch.autocast`` on CUDA (float16 with a
gradient scaler); on CPU bfloat16 uses CPU autocast and float16 falls back to float32 (with a
warning). The loss is always computed in float32.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from kubeseg.config import IGNORE_INDEX, Hyperparameters
from kubeseg.engine.optim import build_optimizer, build_scheduler
from kubeseg.models.phase_split import split_dilated_depthwise

logger = logging.getLogger(__name__)

LossFn = Callable[[Dict[str, torch.Tensor], torch.Tensor], torch.Tensor]


def precision(dtype_name: str, device: torch.device) -> Tuple[Optional[torch.dtype], bool]:
    """(autocast dtype or None, use a gradient scaler) for ``precision_dtype`` on ``device``.

    CUDA: bfloat16 and float16 autocast (float16 with a gradient scaler). CPU: bfloat16 autocast
    (fast on CPUs with AVX512-BF16/AMX); float16 falls back to float32 with a warning.
    """
    if dtype_name == "float32":
        return None, False
    if dtype_name == "bfloat16":
        return torch.bfloat16, False
    if device.type != "cuda":
        logger.warning("precision_dtype=float16 needs CUDA; training on %s runs in float32 "
                       "(bfloat16 works on CPU)", device.type)
        return None, False
    return torch.float16, True


def build_loss(hp: Hyperparameters, device: torch.device,
               class_weights: Optional[Sequence[float]] = None) -> LossFn:
    """Cross entropy (plus the auxiliary head's); ``class_weights`` default to the
    hyperparameter's explicit ones (``class_weights=auto`` is resolved by
    :func:`kubeseg.engine.loaders.resolve_class_weights`)."""
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


@dataclass
class TrainParts:
    """What a training step works with. ``model`` is the plain module (its state dict is what
    checkpoints and artifacts hold); ``net`` is what runs the forward pass: the model itself, or
    it inside DistributedDataParallel and/or ``torch.compile``."""

    model: nn.Module
    net: nn.Module
    loss_fn: LossFn
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    autocast_dtype: Optional[torch.dtype] = None
    channels_last: bool = False
    # cuDNN times its algorithms for each new input shape and keeps the fastest: training
    # crops all have one shape, so this is paid once (validation's whole images may vary, so
    # it is on only inside the step).
    autotune_convolutions: bool = False


def build_parts(model: nn.Module, hp: Hyperparameters, device: torch.device, *,
                iters_per_epoch: int, class_weights: Optional[Sequence[float]] = None,
                wrap: Optional[Callable[[nn.Module], nn.Module]] = None) -> TrainParts:
    """Move ``model`` to ``device`` (channels-last when ``hp.channels_last``), wrap it
    (``wrap``: e.g. DistributedDataParallel; then ``torch.compile`` when ``hp.compile``) and
    build the optimizer, the per-iteration scheduler, the scaler and the loss."""
    model.to(device)
    if hp.channels_last:
        model.to(memory_format=torch.channels_last)
    if device.type == "cpu":
        switched, total = split_dilated_depthwise(model)
        if switched:
            logger.info("%d of %d convolutions (dilated depthwise) train on phase-split inputs",
                        switched, total)
    net = wrap(model) if wrap is not None else model
    if hp.compile:
        net = torch.compile(net)
    optimizer = build_optimizer(model.parameters(), hp)
    scheduler = build_scheduler(optimizer, hp, iters_per_epoch)
    autocast_dtype, use_scaler = precision(hp.precision_dtype, device)
    return TrainParts(model=model, net=net, loss_fn=build_loss(hp, device, class_weights),
                      optimizer=optimizer, scheduler=scheduler,
                      scaler=torch.amp.GradScaler("cuda", enabled=use_scaler),
                      autocast_dtype=autocast_dtype, channels_last=hp.channels_last,
                      autotune_convolutions=device.type == "cuda")


def train_step(parts: TrainParts, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """One optimisation step on a batch already on the device; returns the loss (detached)."""
    if parts.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    dtype = parts.autocast_dtype
    with _cudnn_autotune(parts.autotune_convolutions):
        with torch.autocast(device_type=images.device.type, dtype=dtype or torch.float32,
                            enabled=dtype is not None):
            outputs = parts.net(images)
        loss = parts.loss_fn(outputs, masks)
        # None instead of zeros: no memset, and backward writes the first gradient in place.
        parts.optimizer.zero_grad(set_to_none=True)
        if parts.scaler.is_enabled():
            parts.scaler.scale(loss).backward()
            parts.scaler.step(parts.optimizer)
            parts.scaler.update()
        else:
            loss.backward()
            parts.optimizer.step()
    parts.scheduler.step()
    return loss.detach()


@contextlib.contextmanager
def _cudnn_autotune(enabled: bool):
    """cuDNN's benchmark mode inside the block when ``enabled``; the setting as it was after."""
    if not enabled:
        yield
        return
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before
