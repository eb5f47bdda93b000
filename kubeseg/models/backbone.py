"""Backbones by name: build, dilate to the output stride, load pretrained weights, and return
the features the heads read (``{"low", "mid", "aux", "out"}``, see :mod:`kubeseg.models.spec`).

Pretrained weights are the standard published state dict of the backbone's architecture (the
``.pth`` files torchvision publishes for the ResNets, MobileNetV3 and ConvNeXt; the
``efficientnet-lite0-57934424.pth`` layout for EfficientNet-Lite0), read from a URI through
:mod:`kubeseg.storage`. A file whose keys or shapes do not fit is refused, naming the first keys
that differ. Nothing is downloaded at import; the public ImageNet weights are fetched only when
asked for with :data:`~kubeseg.config.TORCHVISION_DEFAULT`.
"""
from __future__ import annotations

import io
import logging
from typing import Dict, Mapping

import torch
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter

from kubeseg.config import BACKBONES, OUTPUT_STRIDE, TORCHVISION_DEFAULT
from kubeseg.errors import ConfigError, DataError
from kubeseg.models import convnext, efficientnet_lite, mobilenet, resnet
from kubeseg.models.spec import BackboneSpec

logger = logging.getLogger(__name__)

BACKBONE_SPECS: Mapping[str, BackboneSpec] = {
    **resnet.SPECS, **mobilenet.SPECS, **efficientnet_lite.SPECS, **convnext.SPECS}


def backbone_spec(name: str) -> BackboneSpec:
    """The :class:`BackboneSpec` of ``name``; ConfigError listing the backbones otherwise."""
    if name not in BACKBONE_SPECS or name not in BACKBONES:
        raise ConfigError([f"backbone={name!r} is not supported; choose one of "
                           f"{', '.join(BACKBONES)}"])
    return BACKBONE_SPECS[name]


def _unwrap_state_dict(obj, uri: str) -> Dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor)
                                               for v in obj.values()):
        raise DataError(f"pretrained weights {uri}: not a state dict (expected a mapping of "
                        "parameter names to tensors, as saved by torch.save(net.state_dict()))")
    out = {}
    for key, value in obj.items():
        for prefix in ("module.", "backbone."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def read_state_dict(uri: str) -> Dict[str, torch.Tensor]:
    """Read a state dict from a local path or ``s3://`` URI."""
    from kubeseg import storage

    data = storage.read_bytes(uri)
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or foreign files
        raise DataError(f"pretrained weights {uri}: not a readable PyTorch state dict "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    return _unwrap_state_dict(obj, uri)


def _default_state_dict(name: str, spec: BackboneSpec) -> Dict[str, torch.Tensor]:
    if spec.default_weights is None:
        raise DataError(f"backbone={name}: {spec.no_default}, or set "
                        "use_pretrained_model=False")
    try:
        return spec.default_weights()
    except Exception as exc:
        raise DataError(
            f"could not download the public ImageNet weights of {name} "
            f"({type(exc).__name__}: {exc}). Without internet, pass a URI of {spec.weights_format} "
            f"(--pretrained-weights s3://bucket/{name}.pth) or set use_pretrained_model=False"
        ) from None


def state_dict_problems(expected: Mapping[str, torch.Tensor],
                        given: Mapping[str, torch.Tensor]) -> str:
    """The first keys that differ between two state dicts (missing, unexpected, wrong shape),
    or "" when they fit."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    wrong_shape = sorted(f"{k} {tuple(given[k].shape)} instead of {tuple(expected[k].shape)}"
                         for k in set(given) & set(expected)
                         if tuple(given[k].shape) != tuple(expected[k].shape))
    parts = []
    for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                        ("keys with the wrong shape", wrong_shape)):
        if keys:
            shown = ", ".join(keys[:5]) + (f", ... ({len(keys)} in all)" if len(keys) > 5
                                           else "")
            parts.append(f"{label}: {shown}")
    return "; ".join(parts)


def load_backbone_weights(net: nn.Module, name: str, weights_uri: str) -> None:
    """Load a published state dict into the classifier ``net`` of backbone ``name``; keys or
    shapes that do not fit are a DataError naming the first of them."""
    spec = backbone_spec(name)
    if weights_uri == TORCHVISION_DEFAULT:
        state = _default_state_dict(name, spec)
    else:
        state = read_state_dict(weights_uri)
    problems = state_dict_problems(net.state_dict(), state)
    if problems:
        raise DataError(f"pretrained weights {weights_uri} do not fit backbone={name} "
                        f"({spec.weights_format} is expected); {problems}")
    net.load_state_dict(state, strict=True)
    logger.info("backbone %s initialised from %s", name, weights_uri)


class Backbone(nn.Module):
    """A backbone dilated to ``output_stride`` returning ``{"low", "mid", "aux", "out"}``
    features; ``channels`` gives the channels of each."""

    def __init__(self, name: str, weights_uri: str = None, output_stride: int = OUTPUT_STRIDE):
        super().__init__()
        spec = backbone_spec(name)
        net = spec.make(output_stride)
        if weights_uri:
            load_backbone_weights(net, name, weights_uri)
        self.name = name
        self.output_stride = output_stride
        self.channels = dict(spec.channels)
        self.body = IntermediateLayerGetter(spec.body(net), return_layers=dict(spec.return_layers))

    @property
    def aux_channels(self) -> int:
        return self.channels["aux"]

    @property
    def out_channels(self) -> int:
        return self.channels["out"]

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        return self.body(x)
