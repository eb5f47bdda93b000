"""Optimizers and learning-rate schedules named by the hyperparameters (SPEC section 2).

=========  ===================================================================================
sgd        SGD with ``momentum`` and ``weight_decay``
nag        SGD with Nesterov momentum
adam       Adam with ``weight_decay`` (L2, as the reference)
adagrad    Adagrad with ``weight_decay``
rmsprop    RMSprop: ``gamma1`` = decay of the squared-gradient average (alpha), ``gamma2`` =
           momentum
=========  ===================================================================================

Schedules are stepped once per iteration; the total is ``epochs x iterations_per_epoch`` where
``iterations_per_epoch`` comes from ``num_training_samples`` (as the reference does):

- ``poly``: ``lr x (1 - iteration / total) ** 0.9``
- ``cosine``: ``lr x 0.5 x (1 + cos(pi x iteration / total))``
- ``step``: ``lr x lr_scheduler_factor ** (number of lr_scheduler_step epochs reached)``
"""
from __future__ import annotations

import bisect
import math
from typing import Iterable

import torch

from kubeseg.config import Hyperparameters
from kubeseg.errors import ConfigError

POLY_POWER = 0.9


def build_optimizer(params: Iterable[torch.nn.Parameter],
                    hp: Hyperparameters) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    lr, wd = hp.learning_rate, hp.weight_decay
    fused = _fused(params, ("cpu", "cuda"))
    if hp.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=hp.momentum, weight_decay=wd, **fused)
    if hp.optimizer == "nag":
        return torch.optim.SGD(params, lr=lr, momentum=hp.momentum, weight_decay=wd,
                               nesterov=True, **fused)
    if hp.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd, **fused)
    if hp.optimizer == "adagrad":
        return torch.optim.Adagrad(params, lr=lr, weight_decay=wd, **_fused(params, ("cpu",)))
    if hp.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, alpha=hp.gamma1, momentum=hp.gamma2,
                                   eps=1e-8, weight_decay=wd)
    raise ConfigError([f"optimizer={hp.optimizer!r}: not one of sgd, nag, adam, adagrad, "
                       "rmsprop"])


def _fused(params, device_types) -> dict:
    """``fused=True`` where PyTorch has a fused kernel for these parameters: one pass over all
    of them instead of a Python loop of small operations per tensor (on CPU, PyTorch's default
    is that loop)."""
    ok = params and all(p.device.type in device_types and p.is_floating_point() for p in params)
    return {"fused": True} if ok else {}


def iterations_per_epoch(hp: Hyperparameters, world_size: int = 1) -> int:
    """Optimizer steps per epoch implied by num_training_samples (batches are dropped-last)."""
    per_step = hp.mini_batch_size * max(1, world_size)
    return max(1, hp.num_training_samples // per_step)


def lr_factor(hp: Hyperparameters, iteration: int, iters_per_epoch: int) -> float:
    """Multiplier of the initial learning rate at a (0-based) iteration."""
    total = max(1, hp.epochs * iters_per_epoch)
    progress = min(iteration, total) / total
    if hp.lr_scheduler == "poly":
        return (1.0 - progress) ** POLY_POWER
    if hp.lr_scheduler == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if hp.lr_scheduler == "step":
        epoch = iteration // max(1, iters_per_epoch)  # 0-based epoch of this iteration
        # A step epoch E (1-based, as the user writes it) applies from the start of epoch E+1.
        reached = bisect.bisect_right(sorted(hp.lr_scheduler_step), epoch)
        return hp.lr_scheduler_factor ** reached
    raise ConfigError([f"lr_scheduler={hp.lr_scheduler!r}: not one of poly, cosine, step"])


def build_scheduler(optimizer: torch.optim.Optimizer, hp: Hyperparameters,
                    iters_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-iteration scheduler: call ``.step()`` after every optimizer step."""
    # A plain function (not a callable object), so the scheduler's state dict holds only
    # numbers and checkpoints load with torch.load(weights_only=True).
    def factor(iteration: int) -> float:
        return lr_factor(hp, iteration, iters_per_epoch)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
