"""Whole-image inference shared by evaluation and serving.

Images larger than ``tile_size`` on a side are scored with a sliding window (overlapping tiles
whose logits are averaged), so memory stays bounded however large the input. Optional
multi-scale and horizontal-flip averaging (test-time augmentation).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F


def _forward(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    out = model(images)
    return out["out"] if isinstance(out, dict) else out


def _tile_starts(length: int, tile: int, stride: int) -> list:
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return starts


def _sliding_window(model, images: torch.Tensor, tile_size: int, overlap: float) -> torch.Tensor:
    n, _, h, w = images.shape
    stride = max(1, int(math.ceil(tile_size * (1 - overlap))))
    logits = None
    counts = torch.zeros(1, 1, h, w, device=images.device, dtype=images.dtype)
    for top in _tile_starts(h, tile_size, stride):
        for left in _tile_starts(w, tile_size, stride):
            crop = images[:, :, top:top + tile_size, left:left + tile_size]
            out = _forward(model, crop)
            if logits is None:
                logits = torch.zeros(n, out.shape[1], h, w, device=images.device,
                                     dtype=out.dtype)
            logits[:, :, top:top + crop.shape[2], left:left + crop.shape[3]] += out
            counts[:, :, top:top + crop.shape[2], left:left + crop.shape[3]] += 1
    return logits / counts


def _single_scale(model, images: torch.Tensor, tile_size: Optional[int],
                  overlap: float) -> torch.Tensor:
    h, w = images.shape[-2:]
    if tile_size and max(h, w) > tile_size:
        return _sliding_window(model, images, tile_size, overlap)
    return _forward(model, images)


def long_side_size(height: int, width: int, long_side: int) -> Tuple[int, int]:
    """``height`` x ``width`` rescaled so the long side is ``long_side``, the aspect ratio kept
    (rounded as GluonCV's evaluation rounds it)."""
    if height > width:
        return long_side, max(1, int(width * long_side / height + 0.5))
    return max(1, int(height * long_side / width + 0.5)), long_side


@torch.inference_mode()
def predict_logits(model: torch.nn.Module, images: torch.Tensor, *,
                   tile_size: Optional[int] = None, tile_overlap: float = 1 / 3,
                   scales: Sequence[float] = (1.0,), flip: bool = False,
                   long_side: Optional[int] = None) -> torch.Tensor:
    """Logits ``[N, C, H, W]`` at the input size for normalised ``images`` ``[N, 3, H, W]``.

    Each of ``scales`` scores the images at that multiple of their own size, or, with
    ``long_side`` (the model's ``inference_long_side``), of that long side; the logits are
    resized back to the input size. The model must be in eval mode and return
    ``{"out": logits}`` (or a tensor).
    """
    if not 0 <= tile_overlap < 1:
        raise ValueError(f"tile_overlap={tile_overlap}: must be in [0, 1)")
    h, w = images.shape[-2:]
    total = None
    passes = 0
    for scale in scales:
        # Shrinking antialiases, as the PIL resize of the training transforms does.
        if long_side is None:
            scaled = images if scale == 1.0 else F.interpolate(
                images, scale_factor=scale, mode="bilinear", align_corners=False,
                antialias=scale < 1)
        else:
            size = long_side_size(h, w, int(math.ceil(long_side * scale)))
            scaled = images if size == (h, w) else F.interpolate(
                images, size=size, mode="bilinear", align_corners=False,
                antialias=size[0] < h)
        variants = [False, True] if flip else [False]
        for flipped in variants:
            x = scaled.flip(-1) if flipped else scaled
            out = _single_scale(model, x, tile_size, tile_overlap)
            if flipped:
                out = out.flip(-1)
            if out.shape[-2:] != (h, w):
                out = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False)
            total = out.float() if total is None else total + out.float()
            passes += 1
    # one pass (the serving default): its logits as they are, without a copy divided by 1
    return total if passes == 1 else total / passes


def predict_probabilities(model: torch.nn.Module, images: torch.Tensor, **kwargs) -> torch.Tensor:
    """Softmax over classes of :func:`predict_logits`."""
    return predict_logits(model, images, **kwargs).softmax(dim=1)


def confidence_bins(confidence: torch.Tensor) -> torch.Tensor:
    """The bin of :data:`kubeseg.monitoring.drift.CONFIDENCE_EDGES` of each largest softmax
    probability (a value of 1 falls in the last bin), as int64."""
    from kubeseg.monitoring.drift import CONFIDENCE_BINS

    return (confidence * CONFIDENCE_BINS).long().clamp_(0, CONFIDENCE_BINS - 1)


def output_counts(logits: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """What monitoring counts of each image's logits ``[N, C, H, W]``: predicted pixels per class
    ``[N, C]`` and pixels per confidence bin ``[N, B]`` (the largest softmax probability, in the
    bins of :data:`kubeseg.monitoring.drift.CONFIDENCE_EDGES`), int64 on the logits' device."""
    from kubeseg.monitoring.drift import CONFIDENCE_BINS

    confidence, predicted = logits.float().softmax(dim=1).max(dim=1)
    return pixel_counts(predicted, confidence_bins(confidence), logits.shape[1])


def pixel_counts(predicted: torch.Tensor, bins: torch.Tensor, classes: int
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pixels per class ``[N, classes]`` and per confidence bin ``[N, B]`` of ``N`` masks
    ``[N, ...]`` (class ids) and their confidence bins (:func:`confidence_bins`, same shape),
    int64: one ``bincount`` of (image, bin, class) triples."""
    from kubeseg.monitoring.drift import CONFIDENCE_BINS

    n = predicted.shape[0]
    image = torch.arange(n, device=predicted.device).view(n, 1) * CONFIDENCE_BINS
    triples = (bins.reshape(n, -1) + image).mul_(classes).add_(predicted.reshape(n, -1))
    joint = torch.bincount(triples.reshape(-1), minlength=n * CONFIDENCE_BINS * classes)
    joint = joint.view(n, CONFIDENCE_BINS, classes)
    return joint.sum(dim=1), joint.sum(dim=2)
