"""What the hardware can do, measured in the same run as a benchmark, so a ratio has a ceiling.

A benchmark that only prints "ours / plain" cannot say whether "ours" is near the machine's limit
or far from it. Every benchmark under ``bench/`` therefore also prints:

- the CPU's capabilities (``torch.backends.cpu.get_cpu_capability()`` and the AVX512/AMX/BF16
  flags of ``/proc/cpuinfo``): the same code is 2x apart on machines with and without bf16;
- the model's FLOPs per image (``torch.utils.flop_counter``, multiply and add counted as 2);
- the calibrated convolution throughput: a fixed dilated 3x3 convolution in channels-last (the
  shape of the layers that dominate a dilated segmentation network), timed here and now on the
  same threads the benchmark uses;
- each side's achieved GFLOP/s as a fraction of that limit.

    python bench/roofline.py              # capabilities and the calibrated limit
"""
from __future__ import annotations

import time
from typing import Dict, Optional, Sequence

import torch

# The calibration kernel: 256 -> 256 channels, 3x3, dilation 2, on a 64x64 map (one image).
# Large enough that oneDNN reaches its steady state, small enough to time in about a second.
_CAL_CHANNELS = 256
_CAL_SIZE = 64
_CAL_DILATION = 2
_CAL_GPU_BATCH = 32
_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni",
          "amx_bf16", "amx_int8", "amx_tile")


def cpu_capabilities() -> Dict[str, object]:
    """The CPU's name, PyTorch's dispatch level and the vector/matrix flags that change speed
    (read by kubeseg.device, the same reading serving uses to pick bfloat16)."""
    from kubeseg.device import NATIVE_BFLOAT16_FLAGS, NATIVE_INT8_FLAGS, cpu_description

    name, flags = cpu_description()
    return {
        "cpu": name,
        "torch_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "flags": [f for f in _FLAGS if f in flags],
        "native_bf16": bool(NATIVE_BFLOAT16_FLAGS & flags),
        "native_int8": bool(NATIVE_INT8_FLAGS & flags),
    }


def model_flops(model: torch.nn.Module, shape: Sequence[int]) -> float:
    """FLOPs of one forward pass on an input of ``shape`` (N, C, H, W), divided by N."""
    from torch.utils.flop_counter import FlopCounterMode

    param = next(model.parameters())
    x = torch.zeros(*shape, device=param.device, dtype=param.dtype)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() / shape[0]


def calibrate_conv(device: str = "cpu", dtype: torch.dtype = torch.float32,
                   seconds: float = 1.0) -> float:
    """GFLOP/s of the fixed dilated 3x3 convolution, channels-last, best of a few timed bursts."""
    conv = torch.nn.Conv2d(_CAL_CHANNELS, _CAL_CHANNELS, 3, padding=_CAL_DILATION,
                           dilation=_CAL_DILATION, bias=False)
    conv = conv.to(device=device, dtype=dtype, memory_format=torch.channels_last).eval()
    # one image keeps a CPU busy; a GPU needs a batch before launches stop dominating
    batch = _CAL_GPU_BATCH if device.startswith("cuda") else 1
    x = torch.randn(batch, _CAL_CHANNELS, _CAL_SIZE, _CAL_SIZE, device=device, dtype=dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    flops = 2.0 * batch * _CAL_CHANNELS * _CAL_CHANNELS * 9 * _CAL_SIZE * _CAL_SIZE

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    with torch.inference_mode():
        for _ in range(3):
            conv(x)
        sync()
        best = 0.0
        deadline = time.perf_counter() + seconds
        while True:
            start = time.perf_counter()
            reps = 0
            while reps < 5:
                conv(x)
                reps += 1
            sync()
            best = max(best, reps * flops / (time.perf_counter() - start))
            if time.perf_counter() > deadline:
                break
    return best / 1e9


def compute_dtype(precision: str, device: str = "cpu") -> torch.dtype:
    """The dtype a side running at ``precision`` does its convolutions in: bfloat16 as asked,
    float16 on a GPU (a CPU runs float16 in float32), float32 otherwise. int8 has no calibration
    kernel here, so an int8 side is set against the float32 limit (see :func:`limit_note`)."""
    if precision == "bfloat16" or (precision == "float16" and device.startswith("cuda")):
        return getattr(torch, precision)
    return torch.float32


def calibrate_limits(device: str, precisions: Sequence[str],
                     seconds: float = 1.0) -> Dict[str, float]:
    """The calibrated limit (GFLOP/s) for each of ``precisions``, one calibration per compute
    dtype; float32 is always among them."""
    by_dtype = {dtype: calibrate_conv(device, dtype, seconds) for dtype in
                dict.fromkeys([torch.float32] + [compute_dtype(p, device) for p in precisions])}
    return {p: by_dtype[compute_dtype(p, device)] for p in ["float32", *precisions]}


def limit_note(precision: str) -> str:
    """What a side's fraction is of, when that is not its own precision's limit."""
    return " (the float32 one)" if precision == "int8" else ""


def describe_limits(limits: Dict[str, float], device: str = "cpu") -> str:
    """One line per calibrated limit other than float32's (which :func:`describe` prints)."""
    return "\n".join(f"calibrated limit in {str(compute_dtype(p, device)).replace('torch.', '')}:"
                     f" {value:.1f} GFLOP/s" for p, value in limits.items()
                     if compute_dtype(p, device) != torch.float32)


def fraction(flops_per_item: float, items_per_s: float, limit_gflops: float) -> float:
    """Achieved GFLOP/s over the calibrated limit."""
    if limit_gflops <= 0:
        return 0.0
    return flops_per_item * items_per_s / 1e9 / limit_gflops


def describe(caps: Dict[str, object], limit_gflops: Optional[float] = None,
             flops_per_item: Optional[float] = None, device: str = "cpu") -> str:
    """The lines every benchmark prints before its results (the GPU's too on ``cuda``)."""
    lines = [f"cpu: {caps['cpu']} ({caps['threads']} threads), torch capability "
             f"{caps['torch_capability']}, flags: {' '.join(caps['flags']) or 'none'}; "
             f"native bf16: {'yes' if caps['native_bf16'] else 'no'}, "
             f"native int8 dot products: {'yes' if caps['native_int8'] else 'no'}"]
    gpu = device.startswith("cuda")
    if gpu:
        index = torch.device(device).index or 0
        lines.append(f"gpu: {torch.cuda.get_device_name(index)}, torch {torch.__version__}, "
                     f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}; "
                     f"float32 convolutions may use TF32: "
                     f"{'yes' if torch.backends.cudnn.allow_tf32 else 'no'}")
    if limit_gflops is not None:
        batch = f"batch {_CAL_GPU_BATCH}" if gpu else "one image"
        lines.append(f"calibrated limit: {limit_gflops:.1f} GFLOP/s (dilated 3x3 conv "
                     f"{_CAL_CHANNELS}->{_CAL_CHANNELS} ch on {_CAL_SIZE}x{_CAL_SIZE}, {batch}, "
                     "channels-last)")
    if flops_per_item is not None:
        lines.append(f"model: {flops_per_item / 1e9:.2f} GFLOPs per image")
    return "\n".join(lines)


def report_line(label: str, flops_per_item: float, items_per_s: float,
                limit_gflops: float) -> str:
    achieved = flops_per_item * items_per_s / 1e9
    return (f"{label}: {achieved:.1f} GFLOP/s achieved, "
            f"{100 * fraction(flops_per_item, items_per_s, limit_gflops):.0f}% of the calibrated limit")


def main() -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    caps = cpu_capabilities()
    print(describe(caps, calibrate_conv(args.device), device=args.device))
    if caps["native_bf16"] or args.device.startswith("cuda"):
        print(f"bfloat16: {calibrate_conv(args.device, torch.bfloat16):.1f} GFLOP/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
