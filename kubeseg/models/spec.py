"""What a backbone family tells the model builder, and the stride-to-dilation rewrite they share.

Every backbone is first built as its full ImageNet classifier, in the layout of its published
state dict (so a published file loads with ``load_state_dict(strict=True)``), then adapted:
strides past the requested output stride become dilations, and the model reads four feature
maps from it::

    "low"  stride 4   DeepLabV3+'s decoder fuses these
    "mid"  stride 8   Lite R-ASPP's decoder fuses these
    "aux"  stride 16 (dilated to 8 at output stride 8)   the auxiliary FCN head reads these
    "out"  the last stage, at the output stride           the decoder head reads these
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Mapping, Optional

import torch
from torch import nn

FEATURES = ("low", "mid", "aux", "out")


@dataclass(frozen=True)
class BackboneSpec:
    """One backbone: how to build it, where its features are, what its weights look like.

    ``make(output_stride)``: the classifier network, randomly initialised, dilated.
    ``body(net)``: the module whose direct children ``return_layers`` names (torchvision's
    IntermediateLayerGetter keeps the children up to the last one named).
    ``channels``: the channels of each of :data:`FEATURES`.
    ``weights_format``: what a pretrained state dict must be (for error messages).
    ``default_weights()``: the public ImageNet state dict (downloads), or None when there is no
    download (the error then says where the weights come from: ``no_default``).
    """

    make: Callable[[int], nn.Module]
    body: Callable[[nn.Module], nn.Module]
    return_layers: Mapping[str, str]
    channels: Mapping[str, int]
    weights_format: str
    default_weights: Optional[Callable[[], Dict[str, torch.Tensor]]] = None
    no_default: str = ""


def check_output_stride(output_stride: int) -> None:
    if output_stride not in (8, 16):
        raise ValueError(f"output_stride={output_stride}: 8 or 16")


def dilate_chain(chain: nn.Module, output_stride: int) -> None:
    """Turn the stride-2 convolutions of ``chain`` that would take it past ``output_stride``
    into stride 1, and dilate every later spatial convolution instead (padding kept "same").

    ``chain``'s convolutions must run in the order they are registered, with no strided
    shortcut beside a strided convolution (true of MobileNetV3's and EfficientNet's inverted
    residual chains). As in torchvision's ``dilated`` MobileNetV3, a convolution whose stride
    is removed takes the new dilation itself.
    """
    check_output_stride(output_stride)
    stride, dilation = 1, 1
    for conv in chain.modules():
        if not isinstance(conv, nn.Conv2d):
            continue
        if conv.stride == (2, 2):
            if stride * 2 > output_stride:
                conv.stride = (1, 1)
                dilation *= 2
            else:
                stride *= 2
        if conv.kernel_size[0] > 1 and dilation > 1:
            conv.dilation = (dilation, dilation)
            conv.padding = tuple(dilation * (k - 1) // 2 for k in conv.kernel_size)
