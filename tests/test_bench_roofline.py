"""bench/roofline.py: each benchmark side is set against the limit of the precision it computes
in, with one calibration per compute dtype."""
import importlib.util
from pathlib import Path

import torch

_PATH = Path(__file__).resolve().parents[1] / "bench" / "roofline.py"
_SPEC = importlib.util.spec_from_file_location("kubeseg_bench_roofline", _PATH)
roofline = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(roofline)


def test_compute_dtype_follows_what_the_side_runs_in():
    assert roofline.compute_dtype("float32") == torch.float32
    assert roofline.compute_dtype("bfloat16") == torch.bfloat16
    assert roofline.compute_dtype("float16", "cpu") == torch.float32  # a CPU runs it in float32
    assert roofline.compute_dtype("float16", "cuda") == torch.float16
    assert roofline.compute_dtype("int8") == torch.float32


def test_calibrate_limits_one_calibration_per_dtype(monkeypatch):
    calls = []
    real = roofline.calibrate_conv

    def counted(device, dtype=torch.float32, seconds=1.0):
        calls.append(dtype)
        return real(device, dtype, seconds)

    monkeypatch.setattr(roofline, "calibrate_conv", counted)
    limits = roofline.calibrate_limits("cpu", ["int8", "float16", "bfloat16", "float32"],
                                       seconds=0.05)
    assert calls == [torch.float32, torch.bfloat16]
    assert set(limits) == {"float32", "int8", "float16", "bfloat16"}
    assert limits["float32"] > 0 and limits["bfloat16"] > 0
    # int8 and float16-on-CPU share the float32 calibration
    assert limits["int8"] == limits["float16"] == limits["float32"]
    assert roofline.describe_limits(limits) == (
        f"calibrated limit in bfloat16: {limits['bfloat16']:.1f} GFLOP/s")


def test_limit_note_names_the_int8_reference():
    assert roofline.limit_note("int8") == " (the float32 one)"
    assert roofline.limit_note("float32") == roofline.limit_note("bfloat16") == ""
