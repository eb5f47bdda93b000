"""The segmentation model: backbone -> head (and auxiliary head) -> logits at the input size."""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from kubeseg.config import ALGORITHMS, OUTPUT_STRIDE, OUTPUT_STRIDES, value_problem
from kubeseg.errors import ConfigError
from kubeseg.models.backbone import Backbone
from kubeseg.models.heads import HEADS, FCNHead


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
        out = {"out": F.interpolate(self.head(features), size=size, mode="bilinear",
                                    align_corners=False)}
        if self.aux_head is not None and self.training:
            out["aux"] = F.interpolate(self.aux_head(features), size=size, mode="bilinear",
                                       align_corners=False)
        return out


def build_model(*, algorithm: str, backbone: str, num_classes: int, aux_loss: bool = True,
                pretrained_backbone: Optional[str] = None,
                output_stride: int = OUTPUT_STRIDE) -> SegmentationModel:
    """Build a segmentation model.

    ``algorithm``: one of :data:`kubeseg.config.ALGORITHMS` (fcn, psp, deeplab, deeplabv3plus,
    lraspp). ``backbone``: one of :data:`kubeseg.config.BACKBONES`, dilated to
    ``output_stride`` (8 or 16). ``aux_loss``: add the auxiliary FCN head on the stride-16
    stage.
    ``pretrained_backbone``: URI (local path or s3://) of the backbone's published state dict
    used to initialise the backbone only, or :data:`~kubeseg.models.TORCHVISION_DEFAULT` for
    the public ImageNet weights (downloads); ``None`` leaves it randomly initialised. Heads are
    never pretrained.
    """
    problems = [f"algorithm={algorithm!r} is not supported; choose one of "
                f"{', '.join(ALGORITHMS)}"] if algorithm not in HEADS else []
    problems += [p for p in (value_problem("num_classes", num_classes),
                             value_problem("output_stride", output_stride)) if p]
    if problems:
        raise ConfigError(problems)
    output_stride = int(output_stride)
    body = Backbone(backbone, pretrained_backbone, output_stride)
    head = HEADS[algorithm](body.channels, num_classes, output_stride)
    aux = FCNHead(body.aux_channels, num_classes, source="aux") if aux_loss else None
    return SegmentationModel(body, head, aux)
