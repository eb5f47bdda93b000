import json
import math

import torch

from kubeseg.metrics import metrics_from_matrix
from kubeseg.strict_json import json_safe


def test_json_safe_turns_undefined_metrics_into_null():
    matrix = torch.tensor([[3, 0, 0], [1, 2, 0], [0, 0, 0]])
    safe = json_safe({"m": metrics_from_matrix(matrix), "t": torch.tensor([1.5, float("inf")])})
    assert safe["m"]["per_class_iou"][2] is None
    assert safe["t"] == [1.5, None]
    json.dumps(safe, allow_nan=False)  # raises if a NaN/inf slipped through


def test_json_safe_keeps_finite_values_and_names_keys_as_strings():
    safe = json_safe({1: (0.25, -math.inf), "n": [None, "x", 3]})
    assert safe == {"1": [0.25, None], "n": [None, "x", 3]}
