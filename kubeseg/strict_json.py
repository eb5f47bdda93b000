"""Values made fit for strict JSON, as every file kubeseg writes must be readable by any parser.

Python's ``json`` writes NaN and Infinity, which standard JSON has no words for; an undefined
metric (a class absent from both ground truth and prediction) is NaN, so it becomes ``null``.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch


def json_safe(value: Any) -> Any:
    """A copy fit for standard JSON: NaN/inf (undefined metrics) become null, tensors lists."""
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


__all__ = ["json_safe"]
