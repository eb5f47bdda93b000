"""Segmentation models: a dilated ResNet backbone, a decoder head, an optional auxiliary head.

``build_model`` is the one constructor; every algorithm and backbone takes the same keywords::

    model = build_model(algorithm="deeplab", backbone="resnet-50", num_classes=21)
    logits = model(images)["out"]            # [N, C, H, W], the size of the input

In training mode the output dict also holds ``"aux"`` (logits of the auxiliary FCN head on
stage 3, upsampled to the input size) when the model has one; in eval mode only ``"out"`` is
computed. The model returns logits: no softmax inside.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from kubeseg.config import value_problem
from kubeseg.errors import ConfigError
from kubeseg.models.backbone import BACKBONES, TORCHVISION_DEFAULT, Backbone
from kubeseg.models.heads import HEADS, FCNHead

ALGORITHMS = tuple(HEADS)

__all__ = ["ALGORITHMS", "BACKBONES", "TORCHVISION_DEFAULT", "SegmentationModel", "build_model"]


class SegmentationModel(nn.Module):
    """Backbone -> head (and auxiliary head) -> bilinear upsampling to the input size."""

    def __init__(self, backbone: Backbone, head: nn.Module, aux_head: Optional[nn.Module] = None):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.aux_head = aux_head

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        size = x.shape[-2:]
        features = self.backbone(x)
        out = {"out": F.interpolate(self.head(features["out"]), size=size, mode="bilinear",
                                    align_corners=False)}
        if self.aux_head is not None and self.training:
            out["aux"] = F.interpolate(self.aux_head(features["aux"]), size=size,
                                       mode="bilinear", align_corners=False)
        return out


def build_model(*, algorithm: str, backbone: str, num_classes: int, aux_loss: bool = True,
                pretrained_backbone: Optional[str] = None) -> SegmentationModel:
    """Build a segmentation model.

    ``algorithm``: fcn | psp | deeplab. ``backbone``: resnet-18 | resnet-34 | resnet-50 |
    resnet-101 (dilated to kubeseg.config.OUTPUT_STRIDE, 8). ``aux_loss``: add the auxiliary
    FCN head on stage 3.
    ``pretrained_backbone``: URI (local path or s3://) of a torchvision ResNet state dict used to
    initialise the backbone only, or :data:`TORCHVISION_DEFAULT` for torchvision's ImageNet
    weights (downloads); ``None`` leaves it randomly initialised. Heads are never pretrained.
    """
    if algorithm not in HEADS:
        raise ConfigError([f"algorithm={algorithm!r} is not supported; choose one of "
                           f"{', '.join(ALGORITHMS)}"])
    problem = value_problem("num_classes", num_classes)
    if problem:
        raise ConfigError([problem])
    body = Backbone(backbone, pretrained_backbone)
    head = HEADS[algorithm](body.out_channels, num_classes)
    aux = FCNHead(body.aux_channels, num_classes) if aux_loss else None
    return SegmentationModel(body, head, aux)
