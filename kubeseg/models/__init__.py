"""Segmentation models: a backbone, a decoder head, an optional auxiliary head.

``build_model`` is the one constructor; every algorithm and backbone takes the same keywords::

    model = build_model(algorithm="deeplabv3plus", backbone="efficientnet-lite0",
                        num_classes=11, output_stride=16)
    logits = model(images)["out"]            # [N, C, H, W], the size of the input

In training mode the output dict also holds ``"aux"`` (logits of the auxiliary FCN head on the
backbone's stride-16 stage, upsampled to the input size) when the model has one; in eval mode
only ``"out"`` is computed. The model returns logits: no softmax inside.

The names of the algorithms and backbones are declared once, in :mod:`kubeseg.config`. This
package loads torch only when a model is built (``kubeseg --help`` stays light).
"""
from __future__ import annotations

from kubeseg.config import ALGORITHMS, BACKBONES, TORCHVISION_DEFAULT

__all__ = ["ALGORITHMS", "BACKBONES", "TORCHVISION_DEFAULT", "SegmentationModel", "build_model"]


def __getattr__(name: str):
    if name in ("SegmentationModel", "build_model"):
        from kubeseg.models import segmentation

        return getattr(segmentation, name)
    raise AttributeError(f"module 'kubeseg.models' has no attribute {name!r}")
