"""Dilated depthwise convolutions trained on phase-split inputs (kubeseg/models/phase_split.py):
the same values and gradients as PyTorch's dilated convolution, only the layers it holds for,
and a model whose parameters, state dict and eval-mode behaviour stay as they were."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kubeseg.models import build_model
from kubeseg.models.phase_split import (PhaseSplitConv2d, phase_split_conv2d,
                                        split_dilated_depthwise)


def _both(conv: nn.Conv2d, x: torch.Tensor, grad: torch.Tensor):
    """(output, input gradient, weight gradient) of ``conv`` on ``x``."""
    x = x.detach().clone().requires_grad_()
    conv.zero_grad(set_to_none=True)
    out = conv(x)
    out.backward(grad)
    return out.detach(), x.grad, conv.weight.grad


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("kernel,dilation,height,width,bias", [
    (3, 2, 20, 20, False),   # stage-sized, sides a multiple of the dilation
    (5, 2, 20, 14, True),
    (3, 4, 21, 19, True),    # sides padded up to a multiple, the output cropped back
    (7, 2, 15, 16, False),   # ConvNeXt's kernel
    (3, 3, 10, 9, True),
])
def test_values_and_gradients_are_the_dilated_convolutions(channels_last, kernel, dilation,
                                                           height, width, bias):
    torch.manual_seed(0)
    plain = nn.Conv2d(6, 6, kernel, padding=dilation * (kernel // 2), dilation=dilation,
                      groups=6, bias=bias)
    split = nn.Conv2d(6, 6, kernel, padding=dilation * (kernel // 2), dilation=dilation,
                      groups=6, bias=bias)
    split.load_state_dict(plain.state_dict())
    assert split_dilated_depthwise(split) == (1, 1)
    x = torch.randn(3, 6, height, width)
    grad = torch.randn(3, 6, height, width)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        plain, split = (m.to(memory_format=torch.channels_last) for m in (plain, split))
    assert split.splits(x)
    expected, got = _both(plain, x, grad), _both(split, x, grad)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(expected[1:], got[1:]):  # the weight gradient sums 3 x 20 x 20 products
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    # the output keeps the input's memory format, as the plain call's does
    assert got[0].is_contiguous(memory_format=torch.channels_last) == channels_last


def test_the_function_takes_a_bias_and_multiplier_groups():
    torch.manual_seed(1)
    x = torch.randn(2, 4, 12, 12)
    weight, bias = torch.randn(8, 1, 3, 3), torch.randn(8)  # two filters per channel
    expected = F.conv2d(x, weight, bias, padding=2, dilation=2, groups=4)
    torch.testing.assert_close(phase_split_conv2d(x, weight, bias, 2, 4), expected)


def test_only_dilated_depthwise_same_size_convolutions_are_switched():
    layers = nn.Sequential(
        nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8),             # switched
        nn.Conv2d(8, 8, 3, padding=2, dilation=2),                       # dense
        nn.Conv2d(8, 8, 3, padding=1, groups=8),                         # not dilated
        nn.Conv2d(8, 8, 3, stride=2, padding=2, dilation=2, groups=8),   # strided
        nn.Conv2d(8, 8, 3, padding=1, dilation=2, groups=8),             # shrinks the map
        nn.Conv2d(8, 8, (3, 3), padding=(2, 4), dilation=(2, 4), groups=8),  # two dilations
        nn.Conv2d(8, 8, 2, padding=1, dilation=2, groups=8),             # even kernel
        nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8, padding_mode="reflect"),
    )
    assert split_dilated_depthwise(layers) == (1, 8)
    assert [type(m) for m in layers] == [PhaseSplitConv2d] + [nn.Conv2d] * 7
    assert split_dilated_depthwise(layers) == (0, 8)  # once switched, left as it is


def test_eval_mode_and_grids_smaller_than_the_kernel_run_the_plain_convolution():
    conv = nn.Conv2d(4, 4, 3, padding=12, dilation=12, groups=4)
    split_dilated_depthwise(conv)
    assert not conv.splits(torch.zeros(1, 4, 20, 20))   # 2x2 phase grids for a 3x3 kernel
    assert conv.splits(torch.zeros(1, 4, 40, 36))       # 4x3
    conv.eval()
    assert not conv.splits(torch.zeros(1, 4, 40, 36))


@pytest.mark.parametrize("backbone,expected", [("efficientnet-lite0", 5),
                                               ("mobilenet-v3-large", 3), ("resnet-18", 0)])
def test_a_built_model_keeps_its_parameters_and_state_dict(backbone, expected):
    torch.manual_seed(0)
    model = build_model(algorithm="lraspp", backbone=backbone, num_classes=3, aux_loss=True,
                        output_stride=16)
    reference = build_model(algorithm="lraspp", backbone=backbone, num_classes=3,
                            aux_loss=True, output_stride=16)
    reference.load_state_dict(model.state_dict())
    parameters = [id(p) for p in model.parameters()]
    switched, total = split_dilated_depthwise(model)
    assert switched == expected and total > 20
    assert [id(p) for p in model.parameters()] == parameters
    assert list(model.state_dict()) == list(reference.state_dict())
    x = torch.randn(2, 3, 64, 64)
    model.eval(), reference.eval()
    with torch.no_grad():
        assert torch.equal(model(x)["out"], reference(x)["out"])  # eval: the same calls
    model.train(), reference.train()
    torch.manual_seed(3)
    ours = model(x)
    torch.manual_seed(3)
    theirs = reference(x)
    torch.testing.assert_close(ours["out"], theirs["out"], rtol=1e-4, atol=1e-4)
    (ours["out"].square().mean() + ours["aux"].mean()).backward()
    (theirs["out"].square().mean() + theirs["aux"].mean()).backward()
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-3, atol=1e-5, msg=name)


def test_training_parts_on_a_cpu_use_it():
    from kubeseg.config import Hyperparameters
    from kubeseg.engine.step import build_parts

    hp = Hyperparameters.from_dict({"algorithm": "lraspp", "backbone": "efficientnet-lite0",
                                    "output_stride": 16, "num_classes": 3,
                                    "num_training_samples": 2, "use_pretrained_model": False})
    model = build_model(algorithm="lraspp", backbone="efficientnet-lite0", num_classes=3,
                        aux_loss=True, output_stride=16)
    parts = build_parts(model, hp, torch.device("cpu"), iters_per_epoch=1)
    assert sum(isinstance(m, PhaseSplitConv2d) for m in parts.model.modules()) == 5
