"""bench/serve.py --models: every round serves every side, and a side's ratio is the median of
its ratios to the first side within the same round."""
import argparse
import importlib.util
from pathlib import Path

_PATH = Path(__file__).resolve().parents[1] / "bench" / "serve.py"
_SPEC = importlib.util.spec_from_file_location("kubeseg_bench_serve", _PATH)
serve = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(serve)


def _side(label, precision, rates, agreement=None):
    return {"label": label, "uri": label, "precision": precision, "params": 2e6, "flops": 4e9,
            "agreement": agreement, "rates": rates}


def test_ratios_are_taken_within_each_round(capsys):
    # The machine runs twice as fast in round 2: every side doubles, and each round's ratio
    # stays 5.00.
    sides = [_side("a", "float32", [2.0, 4.0, 2.2]),
             _side("b", "int8", [10.0, 20.0, 11.0], agreement=0.9932)]
    serve.print_model_rows(sides, argparse.Namespace(size=512))
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert rows[1].split(" | ")[4:7] == ["2.20", "1.00x", "1.00, 1.00, 1.00"]
    assert rows[2].split(" | ")[4:8] == ["11.00", "5.00x", "5.00, 5.00, 5.00", "99.32% |"]


def test_median_ratio_is_of_rounds_not_of_medians(capsys):
    sides = [_side("a", "float32", [1.0, 2.0, 4.0]), _side("b", "int8", [3.0, 12.0, 8.0])]
    serve.print_model_rows(sides, argparse.Namespace(size=512))
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| b")][0]
    # ratios 3, 6, 2: median 3.00; the medians' ratio would be 8 / 2 = 4.
    assert row.split(" | ")[4:7] == ["8.00", "3.00x", "3.00, 6.00, 2.00"]


def test_round_order_reverses_odd_rounds():
    assert [serve.round_order(["a", "b", "c"], i) for i in range(3)] == [
        ["a", "b", "c"], ["c", "b", "a"], ["a", "b", "c"]]
