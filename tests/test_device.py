"""One rule for the device of training, evaluation and serving."""
import pytest
import torch

from kubeseg.device import resolve_device
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
