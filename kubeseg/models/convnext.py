"""ConvNeXt-Tiny: torchvision's network and state-dict format (``convnext_tiny``), for GPU
nodes (4.5 GFLOPs at 224x224 against ResNet-50's 4.1, with higher ImageNet accuracy).

ConvNeXt downsamples with 2x2 stride-2 convolutions between stages. Past the output stride such
a convolution runs at stride 1 with the dilation of the stage before it (as torchvision's ResNet
treats the first convolution of a dilated stage); at dilation 1 its 2x2 window needs one pixel
of padding on one side only, which :class:`_PaddedConv2d` adds. The 7x7 depthwise convolutions
of the stages after it are dilated instead.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import convnext

from kubeseg.models.spec import BackboneSpec, check_output_stride

# features: 0 stem (stride 4), 1 stage 1, 2 downsample, 3 stage 2 (stride 8), 4 downsample,
# 5 stage 3 (stride 16), 6 downsample, 7 stage 4 (stride 32)
_DOWNSAMPLES = {4: 16, 6: 32}  # features index -> the stride after it


class _PaddedConv2d(nn.Conv2d):
    """A convolution that zero-pads ``pad`` (left, right, top, bottom) first; its parameters
    keep ``nn.Conv2d``'s names, so state dicts are unchanged."""

    def __init__(self, conv: nn.Conv2d, dilation: int):
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, stride=1,
                         dilation=dilation, bias=conv.bias is not None)
        self.weight, self.bias = conv.weight, conv.bias  # keep torchvision's initialisation
        span = dilation * (conv.kernel_size[0] - 1)  # the padding that keeps the size
        self.pad = (span // 2, span - span // 2, span // 2, span - span // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, self.pad))


def make_convnext_tiny(output_stride: int) -> nn.Module:
    check_output_stride(output_stride)
    net = convnext.convnext_tiny(weights=None)
    dilation = 1
    for index, stride in _DOWNSAMPLES.items():
        if stride <= output_stride:
            continue
        norm, conv = net.features[index]
        net.features[index] = nn.Sequential(norm, _PaddedConv2d(conv, dilation))
        dilation *= 2
        for block in net.features[index + 1]:
            depthwise = block.block[0]
            depthwise.dilation = (dilation, dilation)
            depthwise.padding = (3 * dilation, 3 * dilation)
    return net


def _default_weights():
    return convnext.ConvNeXt_Tiny_Weights.IMAGENET1K_V1.get_state_dict(progress=False,
                                                                        check_hash=True)


SPECS = {
    "convnext-tiny": BackboneSpec(
        make=make_convnext_tiny, body=lambda net: net.features,
        return_layers={"1": "low", "3": "mid", "5": "aux", "7": "out"},
        channels={"low": 96, "mid": 192, "aux": 384, "out": 768},
        weights_format="a torchvision convnext_tiny state dict (torchvision's "
                       "ConvNeXt_Tiny_Weights files, or torch.save(net.state_dict()))",
        default_weights=_default_weights),
}
