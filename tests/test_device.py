"""One rule for the device of training, evaluation and serving."""
import platform
import subprocess
import sys

import pytest
import torch

from kubeseg.device import (cpu_description, int8_pairs_saturate, native_bfloat16_cpu,
                            native_int8_cpu, resolve_device)
from kubeseg.errors import ConfigError


def test_auto_is_the_gpu_when_there_is_one_else_the_cpu():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    for name in (None, "", "auto"):
        assert resolve_device(name).type == expected
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a usable GPU")
def test_cuda_without_a_gpu_fails_naming_the_device_and_the_way_out():
    with pytest.raises(ConfigError, match=r"device=cuda:1: CUDA is not usable.*use device cpu"):
        resolve_device("cuda:1")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_without_an_index_is_the_local_ranks_gpu():
    assert resolve_device("cuda", local_rank=torch.cuda.device_count()) == torch.device("cuda", 0)


def test_a_misspelt_device_is_named():
    with pytest.raises(ConfigError, match=r"device='gpu': not a device; use auto, cpu, cuda"):
        resolve_device("gpu")


def _cpuinfo_flags():
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            lines = [line for line in cpuinfo if line.startswith("flags")]
    except OSError:
        return None
    return set(lines[0].split(":", 1)[1].split()) if lines else None


@pytest.mark.skipif(_cpuinfo_flags() is None, reason="needs /proc/cpuinfo with a flags line")
def test_the_cpu_flags_and_native_bfloat16_come_from_proc_cpuinfo():
    name, flags = cpu_description()
    assert flags == _cpuinfo_flags() and name
    assert native_bfloat16_cpu() == bool({"avx512_bf16", "amx_bf16"} & flags)
    assert native_int8_cpu() == bool({"avx512_vnni", "avx_vnni", "amx_int8"} & flags)
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    assert int8_pairs_saturate() == (x86 and not native_int8_cpu())


def test_reading_the_cpu_needs_no_torch():
    code = ("import sys, kubeseg.device as d; d.cpu_description(); d.native_bfloat16_cpu(); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "False"
