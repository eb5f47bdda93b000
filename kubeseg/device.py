"""Which device a step runs on: the one rule shared by training, evaluation and serving; and
what this CPU computes natively (its /proc/cpuinfo flags), read once for serving's precision
choice and the benchmarks' roofline."""
from __future__ import annotations

import functools
import platform
from typing import TYPE_CHECKING, FrozenSet, Optional

from kubeseg.errors import ConfigError

if TYPE_CHECKING:  # imported where used: reading the CPU's flags needs no torch
    import torch

AUTO = "auto"
# Flags that change how fast the same model runs: bfloat16 and int8 dot products in hardware.
NATIVE_BFLOAT16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
NATIVE_INT8_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


@functools.lru_cache(maxsize=1)
def cpu_description() -> "tuple[str, FrozenSet[str]]":
    """(the CPU's model name, its feature flags), from /proc/cpuinfo (empty flags elsewhere)."""
    name, flags = platform.processor() or platform.machine(), frozenset()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() == "flags" and not flags:
                    flags = frozenset(value.split())
                elif key.strip() == "model name":
                    name = value.strip()
    except OSError:
        pass
    return name, flags


def native_bfloat16_cpu() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX); without it PyTorch
    emulates bfloat16, slower than float32."""
    return bool(NATIVE_BFLOAT16_FLAGS & cpu_description()[1])


def native_int8_cpu() -> bool:
    """Whether this CPU has int8 dot-product instructions (VNNI or AMX)."""
    return bool(NATIVE_INT8_FLAGS & cpu_description()[1])


def int8_pairs_saturate() -> bool:
    """Whether ONNX Runtime's dense int8 kernels add pairs of uint8 x int8 products in 16 bits
    with saturation here: on x86 CPUs without VNNI or AMX (``vpmaddubsw``). Full-range 8-bit
    weights can overflow there; 7-bit weights cannot."""
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
    return x86 and not native_int8_cpu()


def resolve_device(name: Optional[str] = None, local_rank: int = 0) -> torch.device:
    """``None``, "" or "auto": the GPU when there is one, else the CPU; "cpu", "cuda", "cuda:N".

    "cuda" without an index picks ``local_rank``'s GPU (one process per GPU under torchrun).
    Asking for CUDA where it is not usable fails here, naming what to change, rather than at
    the first tensor moved to it.
    """
    import torch

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
