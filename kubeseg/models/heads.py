"""Decoder heads: FCN, PSPNet pyramid pooling (bins 1, 2, 3, 6) and DeepLabV3 ASPP (rates from
the backbone's output stride: 12/24/36 at 8).

All heads share :class:`DecodeHead`: a ``context`` module that mixes features, then dropout and a
1x1 classifier producing logits at the feature resolution. Branches that pool to a single
value per channel carry no BatchNorm, so training with a batch of one image works.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from kubeseg.config import OUTPUT_STRIDE

# DeepLabV3's ASPP rates for features at output stride 16
_DEEPLAB_RATES_AT_16 = (6, 12, 18)


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 3,
                 dilation: int = 1) -> nn.Sequential:
    padding = dilation * (kernel_size // 2)
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation,
                  bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True))


class DecodeHead(nn.Module):
    """``context`` (defined by each head) -> dropout -> 1x1 conv to ``num_classes`` logits."""

    def __init__(self, context: nn.Module, context_channels: int, num_classes: int,
                 dropout: float = 0.1):
        super().__init__()
        self.context = context
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(context_channels, num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.context(x)))


class FCNHead(DecodeHead):
    """Fully convolutional head: one 3x3 conv (channels / 4), as in torchvision's FCN."""

    def __init__(self, in_channels: int, num_classes: int):
        mid = in_channels // 4
        super().__init__(conv_bn_relu(in_channels, mid, 3), mid, num_classes)


class _PooledBranch(nn.Module):
    """Average-pool to ``bins`` x ``bins``, 1x1 conv, upsample back to the input size."""

    def __init__(self, in_channels: int, out_channels: int, bins: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(bins)
        # No BatchNorm after pooling to 1x1: its batch statistics would need > 1 image.
        self.conv = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=True),
                                  nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(self.pool(x))
        return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)


class PyramidPooling(nn.Module):
    """PSPNet's pyramid pooling module: input concatenated with pooled branches."""

    def __init__(self, in_channels: int, bins: Sequence[int] = (1, 2, 3, 6)):
        super().__init__()
        branch_channels = in_channels // len(bins)
        self.branches = nn.ModuleList(_PooledBranch(in_channels, branch_channels, b)
                                      for b in bins)
        self.out_channels = in_channels + branch_channels * len(bins)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x] + [branch(x) for branch in self.branches], dim=1)


class PSPHead(DecodeHead):
    """PSPNet: pyramid pooling (bins 1, 2, 3, 6) then a 3x3 bottleneck conv."""

    def __init__(self, in_channels: int, num_classes: int, bins: Sequence[int] = (1, 2, 3, 6)):
        ppm = PyramidPooling(in_channels, bins)
        mid = max(64, in_channels // 4)
        super().__init__(nn.Sequential(ppm, conv_bn_relu(ppm.out_channels, mid, 3)), mid,
                         num_classes)


def aspp_rates(output_stride: int = OUTPUT_STRIDE) -> Tuple[int, ...]:
    """DeepLabV3's ASPP dilation rates for features at ``output_stride``: (6, 12, 18) at 16,
    doubled at 8 (twice as many feature pixels per image side), so each dilated conv spans the
    same part of the image whatever the backbone's output stride."""
    if output_stride < 1 or any(r * 16 % output_stride for r in _DEEPLAB_RATES_AT_16):
        raise ValueError(f"output_stride={output_stride}: the ASPP rates "
                         f"{_DEEPLAB_RATES_AT_16} at 16 do not scale to it in whole pixels")
    return tuple(r * 16 // output_stride for r in _DEEPLAB_RATES_AT_16)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1x1, three dilated 3x3 convs, and image pooling.

    ``rates``: the dilations of the 3x3 convs (default: :func:`aspp_rates` at the backbones'
    ``OUTPUT_STRIDE``)."""

    def __init__(self, in_channels: int, rates: Optional[Sequence[int]] = None,
                 out_channels: int = 256):
        super().__init__()
        rates = aspp_rates() if rates is None else tuple(rates)
        self.rates = rates
        self.branches = nn.ModuleList(
            [conv_bn_relu(in_channels, out_channels, 1)]
            + [conv_bn_relu(in_channels, out_channels, 3, dilation=r) for r in rates]
            + [_PooledBranch(in_channels, out_channels, 1)])
        self.project = nn.Sequential(
            conv_bn_relu(out_channels * len(self.branches), out_channels, 1), nn.Dropout(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([branch(x) for branch in self.branches], dim=1))


class DeepLabHead(DecodeHead):
    """DeepLabV3: ASPP (rates :func:`aspp_rates`, 12, 24, 36 at output stride 8) then a 3x3
    conv."""

    def __init__(self, in_channels: int, num_classes: int,
                 rates: Optional[Sequence[int]] = None):
        super().__init__(nn.Sequential(ASPP(in_channels, rates, 256), conv_bn_relu(256, 256, 3)),
                         256, num_classes)


HEADS = {"fcn": FCNHead, "psp": PSPHead, "deeplab": DeepLabHead}
