"""Segmentation metrics from one confusion matrix accumulated over a whole dataset.

mIoU is computed from the summed matrix (as torchvision's reference scripts do), not averaged per
image. Pixels labelled 255 (ignore), or with a ground-truth value outside 0..C-1, are excluded.

Rule for absent classes: a class with no pixels in the ground truth *and* none in the
predictions has an undefined IoU (0/0). It is reported as NaN in ``per_class_iou`` and left out
of ``mIOU`` and ``mean_class_accuracy``. A class present in the ground truth but never predicted
scores 0; a class predicted but absent from the ground truth scores 0 too (all false positives).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch


class ConfusionMatrix:
    """Accumulates ``matrix[gt, pred]`` pixel counts; rows are ground truth, columns predictions."""

    def __init__(self, num_classes: int, device: Optional[torch.device] = None):
        self.num_classes = int(num_classes)
        self.matrix = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64,
                                  device=device)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: ``pred`` and ``target`` are integer tensors of the same shape."""
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape "
                             f"{tuple(target.shape)}")
        n = self.num_classes
        pred = pred.reshape(-1).to(self.matrix.device, torch.int64)
        target = target.reshape(-1).to(self.matrix.device, torch.int64)
        keep = (target >= 0) & (target < n)
        index = target[keep] * n + pred[keep].clamp(0, n - 1)
        self.matrix += torch.bincount(index, minlength=n * n).reshape(n, n)

    def reset(self) -> None:
        self.matrix.zero_()

    def all_reduce(self) -> None:
        """Sum the matrix over all ranks when torch.distributed is initialised."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.matrix, op=dist.ReduceOp.SUM)

    def compute(self) -> Dict[str, object]:
        return metrics_from_matrix(self.matrix)


def metrics_from_matrix(matrix) -> Dict[str, object]:
    """mIOU, pixel_accuracy, mean_class_accuracy, fw_iou and per-class lists from a CxC matrix."""
    m = torch.as_tensor(matrix, dtype=torch.float64).cpu()
    true_pos = m.diag()
    gt_total = m.sum(dim=1)
    pred_total = m.sum(dim=0)
    union = gt_total + pred_total - true_pos
    total = m.sum()
    iou = torch.where(union > 0, true_pos / union.clamp(min=1), torch.full_like(union, math.nan))
    acc = torch.where(gt_total > 0, true_pos / gt_total.clamp(min=1),
                      torch.full_like(gt_total, math.nan))
    present = ~torch.isnan(iou)
    freq = gt_total / total if total > 0 else torch.zeros_like(gt_total)
    return {
        "mIOU": _mean(iou[present]),
        "pixel_accuracy": float(true_pos.sum() / total) if total > 0 else math.nan,
        "mean_class_accuracy": _mean(acc[~torch.isnan(acc)]),
        "fw_iou": float((freq[present] * iou[present]).sum()) if total > 0 else math.nan,
        "per_class_iou": _list(iou),
        "per_class_accuracy": _list(acc),
        "pixels": int(total),
    }


def _mean(values: torch.Tensor) -> float:
    return float(values.mean()) if values.numel() else math.nan


def _list(values: torch.Tensor) -> List[float]:
    return [float(v) for v in values]
