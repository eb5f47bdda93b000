"""Which device a step runs on: the one rule shared by training, evaluation and serving."""
from __future__ import annotations

from typing import Optional

import torch

from kubeseg.errors import ConfigError

AUTO = "auto"


def resolve_device(name: Optional[str] = None, local_rank: int = 0) -> torch.device:
    """``None``, "" or "auto": the GPU when there is one, else the CPU; "cpu", "cuda", "cuda:N".

    "cuda" without an index picks ``local_rank``'s GPU (one process per GPU under torchrun).
    Asking for CUDA where it is not usable fails here, naming what to change, rather than at
    the first tensor moved to it.
    """
    if name in (None, "", AUTO):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError([f"device={name!r}: not a device; use auto, cpu, cuda or cuda:N"],
                          what="option") from None
    if dev.type != "cuda":
        return dev
    if not torch.cuda.is_available():
        built = torch.version.cuda or "no CUDA"
        raise ConfigError([f"device={name}: CUDA is not usable in this process (torch "
                           f"{torch.__version__}, built for {built}): no GPU was given to "
                           "this pod, or the node's NVIDIA driver is too old for this CUDA "
                           "(CUDA 13 needs the R580 driver branch); request nvidia.com/gpu on "
                           "a GPU node, or use device cpu"], what="option")
    if dev.index is None:
        dev = torch.device("cuda", local_rank % torch.cuda.device_count())
    return dev
