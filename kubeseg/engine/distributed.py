"""Distributed set-up under torchrun / PyTorchJob: RANK, WORLD_SIZE, LOCAL_RANK from the env.

NCCL on CUDA, gloo on CPU. The state lives in a :class:`DistContext` value passed explicitly,
not in a global namespace. A single process (no WORLD_SIZE, or WORLD_SIZE=1) needs no process
group at all.
"""
from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from kubeseg.device import resolve_device
from kubeseg.errors import ConfigError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: Optional[str] = None  # None: no process group
    owns_group: bool = False  # True when init_distributed created the process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw in (None, ""):
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError([f"environment variable {name}={raw!r} must be an integer"]) from None


def init_distributed(device: Optional[str] = None, timeout_s: float = 1800) -> DistContext:
    """Read torchrun's environment, pick the device and start the process group if needed."""
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size <= 1:
        return DistContext(device=dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    owns = False
    if not dist.is_initialized():
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
        owns = True
    logger.info("distributed: rank %d of %d (local rank %d), backend %s, device %s",
                rank, world_size, local_rank, backend, dev)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=dev,
                       backend=backend, owns_group=owns)


def cleanup(ctx: DistContext) -> None:
    """Destroy the process group if ``init_distributed`` created it."""
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def all_reduce_sum(ctx: DistContext, tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum across ranks (a no-op in a single process); returns the tensor."""
    if ctx.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_min_int(ctx: DistContext, value: int) -> int:
    """The smallest ``value`` over all ranks (e.g. batches per epoch, so every rank steps alike)."""
    if not ctx.distributed:
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.int64, device=comm_device(ctx))
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def wrap_model(ctx: DistContext, model: torch.nn.Module, syncbn: bool) -> torch.nn.Module:
    """``model`` as this process trains it: itself alone, or inside DistributedDataParallel
    (with SyncBatchNorm when asked for and on CUDA). ``model`` keeps its own state dict keys."""
    if not ctx.distributed:
        return model
    if syncbn and ctx.device.type == "cuda":
        # converts the BatchNorm children in place; the root module is not a BatchNorm
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif syncbn and ctx.is_main:
        logger.warning("syncbn=True needs CUDA devices; BatchNorm stays per process on CPU")
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def average_buffers(ctx: DistContext, module: torch.nn.Module) -> None:
    """Average floating-point buffers (BatchNorm running statistics) over ranks.

    DDP keeps parameters identical but each rank updates its running statistics from its own
    last batch; averaging them makes every rank hold the same model (and uses all ranks' data).
    """
    if not ctx.distributed:
        return
    buffers = [b for b in module.buffers() if b.is_floating_point()]
    if not buffers:
        return
    flat = torch.cat([b.detach().reshape(-1).to(torch.float64) for b in buffers])
    flat = flat.to(comm_device(ctx))
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= ctx.world_size
    offset = 0
    with torch.no_grad():
        for b in buffers:
            n = b.numel()
            b.copy_(flat[offset:offset + n].view_as(b).to(b.device, b.dtype))
            offset += n


def broadcast_object(ctx: DistContext, obj):
    """Rank 0's ``obj`` on every rank."""
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def comm_device(ctx: DistContext) -> torch.device:
    """Where tensors sent between ranks live: the GPU with NCCL, else the CPU (gloo)."""
    return ctx.device if ctx.backend == "nccl" else torch.device("cpu")
