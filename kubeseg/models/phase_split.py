"""Dilated depthwise convolutions trained as undilated ones, on the input split by phase.

On a CPU, PyTorch's backward pass of a *dilated depthwise* convolution is several times slower
than that of the same convolution undilated (2 AVX2 cores, channels-last, a batch of 8 at
20x20: 1152 channels 5x5 at dilation 2 took 212 ms against 52 ms at dilation 1; dense dilated
convolutions show no such gap). EfficientNet-Lite0, MobileNetV3 and ConvNeXt dilate their
depthwise convolutions past output stride 16, so on a CPU those few layers took a large share
of each training step.

A convolution at dilation ``d`` (stride 1, "same" zero padding) computes output pixel
``(d*i + p, d*j + q)`` from input pixels of the same phase ``(p, q)`` only. So it equals an
undilated convolution with the same weights, applied to each of the ``d*d`` phase grids
``x[..., p::d, q::d]`` (padded by ``kernel // 2``), with the outputs interleaved back: the
"space to batch" form of atrous convolution. Here the phase grids are stacked along the batch
axis, so one undilated call computes them all. Values and gradients agree with the dilated
call's to float rounding (some sums run in another order).

:func:`split_dilated_depthwise` switches a model's eligible convolutions to this form for
training; the module stays an ``nn.Conv2d`` with the same parameters and state-dict keys, and
in eval mode (validation, export, serving), and where a phase grid would be smaller than the
kernel (ASPP's large rates on small feature maps), runs the plain dilated convolution.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn


def _split(x: torch.Tensor, d: int) -> torch.Tensor:
    """``[N, C, H, W]`` (``H``, ``W`` multiples of ``d``) -> the ``d*d`` phase grids stacked on
    the batch axis, ``[N*d*d, C, H/d, W/d]`` (image ``n``'s phase ``(p, q)`` at ``n*d*d + p*d +
    q``), in ``x``'s memory format."""
    n, c, height, width = x.shape
    h, w = height // d, width // d
    if x.is_contiguous(memory_format=torch.channels_last):
        pixels = x.permute(0, 2, 3, 1).reshape(n, h, d, w, d, c).permute(0, 2, 4, 1, 3, 5)
        return pixels.reshape(n * d * d, h, w, c).permute(0, 3, 1, 2)
    grids = x.reshape(n, c, h, d, w, d).permute(0, 3, 5, 1, 2, 4)
    return grids.reshape(n * d * d, c, h, w)


def _merge(y: torch.Tensor, n: int, d: int) -> torch.Tensor:
    """The inverse of :func:`_split`: ``[N*d*d, C, h, w]`` -> ``[N, C, h*d, w*d]``."""
    _, c, h, w = y.shape
    if y.is_contiguous(memory_format=torch.channels_last):
        pixels = y.permute(0, 2, 3, 1).reshape(n, d, d, h, w, c).permute(0, 3, 1, 4, 2, 5)
        return pixels.reshape(n, h * d, w * d, c).permute(0, 3, 1, 2)
    grids = y.reshape(n, d, d, c, h, w).permute(0, 3, 4, 1, 5, 2)
    return grids.reshape(n, c, h * d, w * d)


def phase_split_conv2d(x: torch.Tensor, weight: torch.Tensor, bias, dilation: int,
                       groups: int) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=dilation * (k // 2), dilation=dilation,
    groups=groups)`` for odd kernels ``k``, computed undilated on ``x``'s phase grids."""
    n, _, height, width = x.shape
    d = dilation
    pad_h, pad_w = -height % d, -width % d
    if pad_h or pad_w:  # zeros past the edge: what the dilated call's own padding reads there
        x = F.pad(x, (0, pad_w, 0, pad_h))
    kernel_h, kernel_w = weight.shape[-2:]
    out = F.conv2d(_split(x, d), weight, bias, padding=(kernel_h // 2, kernel_w // 2),
                   groups=groups)
    out = _merge(out, n, d)
    if pad_h or pad_w:
        layout = (torch.channels_last if x.is_contiguous(memory_format=torch.channels_last)
                  else torch.contiguous_format)
        out = out[..., :height, :width].contiguous(memory_format=layout)
    return out


def _eligible(conv: nn.Conv2d) -> bool:
    """A depthwise convolution (a group per input channel) at one dilation above 1, stride 1,
    odd kernel and the zero padding that keeps the size."""
    if type(conv) is not nn.Conv2d:
        return False
    (dh, dw), (kh, kw) = conv.dilation, conv.kernel_size
    return (conv.groups == conv.in_channels and dh == dw > 1 and conv.stride == (1, 1)
            and kh % 2 == 1 and kw % 2 == 1 and conv.padding_mode == "zeros"
            and conv.padding == (dh * (kh // 2), dw * (kw // 2)))


class PhaseSplitConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` that trains as :func:`phase_split_conv2d` (see the module's text) and
    evaluates as itself. Made by :func:`split_dilated_depthwise`, never built directly."""

    def splits(self, x: torch.Tensor) -> bool:
        """Whether the forward pass of ``x`` runs phase-split: in training mode, unless a phase
        grid would be smaller than the kernel. Such a grid is mostly padding, and its many tiny
        convolutions are far slower than the dilated one (1280 channels 3x3 at dilation 12 on
        20x20: 1.2 s against 0.32 s)."""
        d = self.dilation[0]
        kernel_h, kernel_w = self.kernel_size
        return (self.training and -(-x.shape[-2] // d) >= kernel_h
                and -(-x.shape[-1] // d) >= kernel_w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.splits(x):
            return super().forward(x)
        return phase_split_conv2d(x, self.weight, self.bias, self.dilation[0], self.groups)


def split_dilated_depthwise(model: nn.Module) -> Tuple[int, int]:
    """Switch ``model``'s dilated depthwise convolutions (:func:`_eligible`) to
    :class:`PhaseSplitConv2d` in place, keeping their parameters; returns (switched, all
    convolutions)."""
    switched = total = 0
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            total += 1
            if _eligible(module):
                module.__class__ = PhaseSplitConv2d
                switched += 1
    return switched, total
