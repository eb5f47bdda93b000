"""Decoder heads: FCN, PSPNet pyramid pooling (bins 1, 2, 3, 6), DeepLabV3 ASPP (rates from
the backbone's output stride: 12/24/36 at 8, 6/12/18 at 16), and the kubeseg extras DeepLabV3+
(ASPP, then a decoder fusing the stride-4 features) and Lite R-ASPP (torchvision's head of
MobileNetV3's segmentation model, fusing the stride-8 features).

Every head takes the backbone's feature dict (``"low"``, ``"mid"``, ``"aux"``, ``"out"``; see
:mod:`kubeseg.models.spec`) and returns logits at the resolution of the finest features it
reads. FCN, PSP, DeepLab and DeepLabV3+ share :class:`DecodeHead`: a ``context`` module that
mixes features, then dropout and a 1x1 classifier. Branches that pool to a single value per
channel carry no BatchNorm, so training with a batch of one image works.
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.segmentation.lraspp import LRASPPHead

from kubeseg.config import OUTPUT_STRIDE

Features = Dict[str, torch.Tensor]

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


def separable_conv_bn_relu(in_channels: int, out_channels: int, dilation: int = 1
                           ) -> nn.Sequential:
    """DeepLabV3+'s atrous separable convolution: a 3x3 depthwise conv (dilated), then a 1x1
    conv, each followed by BatchNorm and ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, in_channels, 3, padding=dilation, dilation=dilation,
                  groups=in_channels, bias=False),
        nn.BatchNorm2d(in_channels),
        nn.ReLU(inplace=True),
        conv_bn_relu(in_channels, out_channels, 1))


class DecodeHead(nn.Module):
    """``context`` (defined by each head) -> dropout -> 1x1 conv to ``num_classes`` logits,
    reading the features named ``source``."""

    def __init__(self, context: nn.Module, context_channels: int, num_classes: int,
                 dropout: float = 0.1, source: str = "out"):
        super().__init__()
        self.source = source
        self.context = context
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(context_channels, num_classes, kernel_size=1)

    def forward(self, features: Features) -> torch.Tensor:
        return self.classifier(self.dropout(self.context(features[self.source])))


class FCNHead(DecodeHead):
    """Fully convolutional head: one 3x3 conv (channels / 4), as in torchvision's FCN. Also
    the auxiliary head (``source="aux"``)."""

    def __init__(self, in_channels: int, num_classes: int, source: str = "out"):
        mid = in_channels // 4
        super().__init__(conv_bn_relu(in_channels, mid, 3), mid, num_classes, source=source)


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

    ``rates``: the dilations of the 3x3 convs (default: :func:`aspp_rates` at the default
    ``OUTPUT_STRIDE``). ``separable``: depthwise-separable 3x3 convs (DeepLabV3+)."""

    def __init__(self, in_channels: int, rates: Optional[Sequence[int]] = None,
                 out_channels: int = 256, separable: bool = False):
        super().__init__()
        rates = aspp_rates() if rates is None else tuple(rates)
        self.rates = rates
        dilated = separable_conv_bn_relu if separable else (
            lambda cin, cout, dilation: conv_bn_relu(cin, cout, 3, dilation=dilation))
        self.branches = nn.ModuleList(
            [conv_bn_relu(in_channels, out_channels, 1)]
            + [dilated(in_channels, out_channels, dilation=r) for r in rates]
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


class DeepLabV3PlusHead(DecodeHead):
    """DeepLabV3+ (Chen et al. 2018): ASPP with separable convs on the last features, upsampled
    to the stride-4 features and concatenated with them (reduced to 48 channels by a 1x1 conv),
    then two separable 3x3 convs; logits at stride 4."""

    def __init__(self, channels: Mapping[str, int], num_classes: int,
                 output_stride: int = OUTPUT_STRIDE, width: int = 256, low_width: int = 48):
        super().__init__(ASPP(channels["out"], aspp_rates(output_stride), width, separable=True),
                         width, num_classes)
        self.reduce_low = conv_bn_relu(channels["low"], low_width, 1)
        self.fuse = nn.Sequential(separable_conv_bn_relu(width + low_width, width),
                                  separable_conv_bn_relu(width, width))

    def forward(self, features: Features) -> torch.Tensor:
        low = features["low"]
        context = F.interpolate(self.context(features["out"]), size=low.shape[-2:],
                                mode="bilinear", align_corners=False)
        fused = self.fuse(torch.cat([context, self.reduce_low(low)], dim=1))
        return self.classifier(self.dropout(fused))


class LRASPP(LRASPPHead):
    """Lite R-ASPP (Howard et al. 2019, "Searching for MobileNetV3"), torchvision's head: a 1x1
    conv on the last features gated by their pooled sigmoid attention, upsampled to the stride-8
    features and added to a 1x1 classifier of those; logits at stride 8."""

    def __init__(self, channels: Mapping[str, int], num_classes: int,
                 output_stride: int = OUTPUT_STRIDE, inter_channels: int = 128):
        super().__init__(channels["mid"], channels["out"], num_classes, inter_channels)

    def forward(self, features: Features) -> torch.Tensor:
        return super().forward({"low": features["mid"], "high": features["out"]})


def _fcn(channels: Mapping[str, int], num_classes: int, output_stride: int) -> nn.Module:
    return FCNHead(channels["out"], num_classes)


def _psp(channels: Mapping[str, int], num_classes: int, output_stride: int) -> nn.Module:
    return PSPHead(channels["out"], num_classes)


def _deeplab(channels: Mapping[str, int], num_classes: int, output_stride: int) -> nn.Module:
    return DeepLabHead(channels["out"], num_classes, aspp_rates(output_stride))


# algorithm -> builder(feature channels, num_classes, output_stride)
HEADS = {"fcn": _fcn, "psp": _psp, "deeplab": _deeplab, "deeplabv3plus": DeepLabV3PlusHead,
         "lraspp": LRASPP}
