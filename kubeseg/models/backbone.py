"""ResNet backbones dilated to ``OUTPUT_STRIDE`` (kubeseg.config), returning stage 3 and 4 features.

torchvision's ResNets are adapted, not subclassed: ResNet-50/101 through
``replace_stride_with_dilation``; ResNet-18/34 (BasicBlock, for which torchvision refuses
dilation) by editing the strides, dilations and paddings of stages 3 and 4 in place. Stage 3
runs at dilation 2 and stage 4 at dilation 4, as in DeepLab and torchvision's segmentation models.

Pretrained weights are a standard torchvision ResNet state dict (the ``.pth`` files torchvision
publishes, or ``torch.save(resnet.state_dict(), ...)``) read from a URI through
:mod:`kubeseg.storage`. Nothing is downloaded at import; the torchvision default ImageNet weights
are fetched only when asked for with :data:`TORCHVISION_DEFAULT`.
"""
from __future__ import annotations

import io
import logging
from typing import Dict, Mapping, Tuple

import torch
from torch import nn
from torchvision.models import resnet as tv_resnet
from torchvision.models._utils import IntermediateLayerGetter

from kubeseg.config import OUTPUT_STRIDE
from kubeseg.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

#: Pass as ``weights_uri`` to use torchvision's default ImageNet weights (needs internet).
TORCHVISION_DEFAULT = "torchvision:imagenet"

# name -> (torchvision builder, weights enum, channels of stage 3, channels of stage 4)
_RESNETS = {
    "resnet-18": (tv_resnet.resnet18, tv_resnet.ResNet18_Weights, 256, 512),
    "resnet-34": (tv_resnet.resnet34, tv_resnet.ResNet34_Weights, 256, 512),
    "resnet-50": (tv_resnet.resnet50, tv_resnet.ResNet50_Weights, 1024, 2048),
    "resnet-101": (tv_resnet.resnet101, tv_resnet.ResNet101_Weights, 1024, 2048),
}
BACKBONES = tuple(_RESNETS)


def backbone_channels(name: str) -> Tuple[int, int]:
    """``(stage 3 channels, stage 4 channels)`` of a backbone."""
    _check_name(name)
    return _RESNETS[name][2], _RESNETS[name][3]


def _check_name(name: str) -> None:
    if name not in _RESNETS:
        raise ConfigError([f"backbone={name!r} is not supported; choose one of "
                           f"{', '.join(BACKBONES)}"])


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


def _dilated_stages() -> list:
    """torchvision's ``replace_stride_with_dilation`` for OUTPUT_STRIDE: stages 2, 3 and 4 each
    halve the resolution (from stride 4 after the stem) unless dilated instead."""
    return [OUTPUT_STRIDE < 4 * 2 ** (i + 1) for i in range(3)]


def make_resnet(name: str) -> tv_resnet.ResNet:
    """A randomly initialised torchvision ResNet dilated to OUTPUT_STRIDE (stages 3 and 4)."""
    _check_name(name)
    builder = _RESNETS[name][0]
    if name in ("resnet-50", "resnet-101"):
        return builder(weights=None, replace_stride_with_dilation=_dilated_stages())
    net = builder(weights=None)
    dilation = 1
    for stage, dilate in zip((net.layer2, net.layer3, net.layer4), _dilated_stages()):
        if dilate:
            _dilate_basic_stage(stage, dilation=2 * dilation, previous_dilation=dilation)
            dilation *= 2
    return net


def _unwrap_state_dict(obj, uri: str) -> Dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor)
                                               for v in obj.values()):
        raise DataError(f"pretrained weights {uri}: not a state dict (expected a mapping of "
                        "parameter names to tensors, as saved by torch.save(resnet.state_dict()))")
    out = {}
    for key, value in obj.items():
        for prefix in ("module.", "backbone."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def read_state_dict(uri: str) -> Dict[str, torch.Tensor]:
    """Read a torchvision ResNet state dict from a local path or ``s3://`` URI."""
    from kubeseg import storage

    data = storage.read_bytes(uri)
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or foreign files
        raise DataError(f"pretrained weights {uri}: not a readable PyTorch state dict "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    return _unwrap_state_dict(obj, uri)


def _torchvision_default_state_dict(name: str) -> Dict[str, torch.Tensor]:
    weights = _RESNETS[name][1].IMAGENET1K_V1
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as exc:
        raise DataError(
            f"could not download torchvision's ImageNet weights for {name} from {weights.url} "
            f"({type(exc).__name__}: {exc}). Without internet, pass a URI of a torchvision "
            f"ResNet state dict (--pretrained-weights s3://bucket/{name}.pth) or set "
            "use_pretrained_model=False") from None


def load_resnet_weights(net: tv_resnet.ResNet, name: str, weights_uri: str) -> None:
    """Load a torchvision ResNet state dict into ``net``; wrong or missing keys are an error."""
    if weights_uri == TORCHVISION_DEFAULT:
        state = _torchvision_default_state_dict(name)
    else:
        state = read_state_dict(weights_uri)
    expected = net.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(k for k in set(state) & set(expected)
                         if tuple(state[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or wrong_shape:
        parts = []
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                            ("keys with the wrong shape", wrong_shape)):
            if keys:
                shown = ", ".join(keys[:5]) + (f", ... ({len(keys)} in all)"
                                               if len(keys) > 5 else "")
                parts.append(f"{label}: {shown}")
        raise DataError(f"pretrained weights {weights_uri} do not fit backbone={name} (a "
                        f"torchvision {name.replace('-', '')} state dict is expected); "
                        + "; ".join(parts))
    net.load_state_dict(state, strict=True)
    logger.info("backbone %s initialised from %s", name, weights_uri)


class Backbone(nn.Module):
    """Dilated ResNet returning ``{"out": stage 4 features, "aux": stage 3 features}``."""

    def __init__(self, name: str, weights_uri: str = None):
        super().__init__()
        net = make_resnet(name)
        if weights_uri:
            load_resnet_weights(net, name, weights_uri)
        self.name = name
        self.aux_channels, self.out_channels = backbone_channels(name)
        self.body = IntermediateLayerGetter(net, return_layers={"layer3": "aux", "layer4": "out"})

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        return self.body(x)
