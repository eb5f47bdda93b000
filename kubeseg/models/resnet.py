"""ResNets: torchvision's networks and state-dict format, dilated to the output stride.

torchvision's ResNets are adapted, not subclassed: ResNet-50/101 through
``replace_stride_with_dilation``; ResNet-18/34 (BasicBlock, for which torchvision refuses
dilation) by editing the strides, dilations and paddings of their stages in place. At output
stride 8, stage 3 runs at dilation 2 and stage 4 at dilation 4, as in DeepLab and torchvision's
segmentation models; at 16 only stage 4 is dilated (2).
"""
from __future__ import annotations

from torch import nn
from torchvision.models import resnet as tv_resnet

from kubeseg.models.spec import BackboneSpec, check_output_stride

# name -> (torchvision builder, weights enum, channels of stages 1, 2, 3 and 4)
_RESNETS = {
    "resnet-18": (tv_resnet.resnet18, tv_resnet.ResNet18_Weights, (64, 128, 256, 512)),
    "resnet-34": (tv_resnet.resnet34, tv_resnet.ResNet34_Weights, (64, 128, 256, 512)),
    "resnet-50": (tv_resnet.resnet50, tv_resnet.ResNet50_Weights, (256, 512, 1024, 2048)),
    "resnet-101": (tv_resnet.resnet101, tv_resnet.ResNet101_Weights, (256, 512, 1024, 2048)),
}


def _dilate_basic_stage(stage: nn.Sequential, dilation: int, previous_dilation: int) -> None:
    """Turn a stride-2 BasicBlock stage into a stride-1 stage with dilated 3x3 convolutions."""
    for i, block in enumerate(stage):
        for conv_name in ("conv1", "conv2"):
            conv: nn.Conv2d = getattr(block, conv_name)
            # The first conv of the first block keeps the previous stage's dilation (as
            # torchvision does for Bottleneck), every other 3x3 conv uses the new one.
            d = previous_dilation if (i == 0 and conv_name == "conv1") else dilation
            conv.stride = (1, 1)
            conv.dilation = (d, d)
            conv.padding = (d, d)
        if block.downsample is not None:
            block.downsample[0].stride = (1, 1)
        block.stride = 1


def dilated_stages(output_stride: int) -> list:
    """torchvision's ``replace_stride_with_dilation`` for ``output_stride``: stages 2, 3 and 4
    each halve the resolution (from stride 4 after the stem) unless dilated instead."""
    check_output_stride(output_stride)
    return [output_stride < 4 * 2 ** (i + 1) for i in range(3)]


def make_resnet(name: str, output_stride: int = 8) -> tv_resnet.ResNet:
    """A randomly initialised torchvision ResNet dilated to ``output_stride``."""
    builder = _RESNETS[name][0]
    if name in ("resnet-50", "resnet-101"):
        return builder(weights=None, replace_stride_with_dilation=dilated_stages(output_stride))
    net = builder(weights=None)
    dilation = 1
    for stage, dilate in zip((net.layer2, net.layer3, net.layer4),
                             dilated_stages(output_stride)):
        if dilate:
            _dilate_basic_stage(stage, dilation=2 * dilation, previous_dilation=dilation)
            dilation *= 2
    return net


def _spec(name: str) -> BackboneSpec:
    _, weights, channels = _RESNETS[name]
    return BackboneSpec(
        make=lambda output_stride: make_resnet(name, output_stride), body=lambda net: net,
        return_layers={"layer1": "low", "layer2": "mid", "layer3": "aux", "layer4": "out"},
        channels=dict(zip(("low", "mid", "aux", "out"), channels)),
        weights_format=f"a torchvision {name.replace('-', '')} state dict (torchvision's "
                       "ResNet weight files, or torch.save(resnet.state_dict()))",
        default_weights=lambda: weights.IMAGENET1K_V1.get_state_dict(progress=False,
                                                                     check_hash=True))


SPECS = {name: _spec(name) for name in _RESNETS}
