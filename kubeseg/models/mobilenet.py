"""MobileNetV3-Large: torchvision's network and state-dict format (``mobilenet_v3_large``),
dilated to the output stride with :func:`~kubeseg.models.spec.dilate_chain` (at 16 this is
exactly torchvision's ``dilated=True``, the setting of its own segmentation models)."""
from __future__ import annotations

from torch import nn
from torchvision.models import mobilenetv3

from kubeseg.models.spec import BackboneSpec, dilate_chain


def make_mobilenet_v3_large(output_stride: int) -> nn.Module:
    net = mobilenetv3.mobilenet_v3_large(weights=None)
    dilate_chain(net.features, output_stride)
    return net


def _default_weights():
    return mobilenetv3.MobileNet_V3_Large_Weights.IMAGENET1K_V1.get_state_dict(
        progress=False, check_hash=True)


SPECS = {
    # features: 3 = last stride-4 block, 6 = last stride-8 block, 12 = last stride-16 block,
    # 16 = the final 1x1 expansion to 960 channels (torchvision's segmentation models read it)
    "mobilenet-v3-large": BackboneSpec(
        make=make_mobilenet_v3_large, body=lambda net: net.features,
        return_layers={"3": "low", "6": "mid", "12": "aux", "16": "out"},
        channels={"low": 24, "mid": 40, "aux": 112, "out": 960},
        weights_format="a torchvision mobilenet_v3_large state dict (torchvision's "
                       "MobileNet_V3_Large_Weights files, or torch.save(net.state_dict()))",
        default_weights=_default_weights),
}
