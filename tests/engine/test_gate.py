import json
import math

import pytest

from kubeseg.engine.gate import GateDecision, miou_of, quality_gate, read_metrics
from kubeseg.errors import ConfigError, DataError


def test_passes_above_the_floor_and_says_the_numbers():
    d = quality_gate({"mIOU": 0.62}, min_miou=0.5)
    assert isinstance(d, GateDecision) and d.passed
    assert "0.6200" in d.reason and "0.5000" in d.reason and d.reason.startswith("passed")


def test_fails_below_the_floor():
    d = quality_gate({"mIOU": 0.42}, min_miou=0.5)
    assert not d.passed
    assert d.reason.startswith("failed") and "0.4200 < minimum 0.5000" in d.reason


def test_exactly_at_the_floor_passes():
    assert quality_gate({"mIOU": 0.5}, min_miou=0.5).passed


def test_challenger_within_tolerance_of_the_champion_passes():
    d = quality_gate({"mIOU": 0.595}, previous_metrics={"mIOU": 0.60}, max_regression=0.01)
    assert d.passed and d.previous_miou == 0.60
    assert "0.6000" in d.reason and "-0.0050" in d.reason


def test_challenger_worse_than_the_champion_by_more_than_the_tolerance_fails():
    d = quality_gate({"mIOU": 0.58}, min_miou=0.5, previous_metrics={"mIOU": 0.60},
                     max_regression=0.01)
    assert not d.passed
    assert "worse than the previous model" in d.reason and "-0.0200" in d.reason
    assert "0.5800 >= minimum 0.5000" in d.reason  # the floor part is still reported


def test_zero_tolerance_means_not_worse_at_all():
    assert quality_gate({"mIOU": 0.6}, previous_metrics={"mIOU": 0.6}).passed
    assert not quality_gate({"mIOU": 0.5999}, previous_metrics={"mIOU": 0.6}).passed
    assert quality_gate({"mIOU": 0.7}, previous_metrics={"mIOU": 0.6}).passed


def test_both_checks_must_pass():
    d = quality_gate({"mIOU": 0.45}, min_miou=0.5, previous_metrics={"mIOU": 0.40})
    assert not d.passed and "< minimum" in d.reason and "not worse" in d.reason


def test_undefined_miou_fails():
    d = quality_gate({"mIOU": float("nan")})
    assert not d.passed and "undefined" in d.reason
    assert not quality_gate({"mIOU": None}).passed


def test_previous_without_a_defined_miou_does_not_block():
    d = quality_gate({"mIOU": 0.3}, previous_metrics={"mIOU": None})
    assert d.passed and "no champion" in d.reason


def test_training_metric_names_and_nested_metrics_are_understood():
    assert miou_of({"validation:mIOU": 0.7}) == 0.7
    assert miou_of({"metrics": {"mIOU": 0.4}}) == 0.4


def test_metrics_without_miou_name_the_expected_key():
    with pytest.raises(DataError, match="mIOU"):
        quality_gate({"pixel_accuracy": 0.9})


@pytest.mark.parametrize("kwargs", [{"min_miou": 1.5}, {"max_regression": -0.1},
                                    {"min_miou": math.nan}])
def test_out_of_range_thresholds_are_config_errors(kwargs):
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        quality_gate({"mIOU": 0.5}, **kwargs)


@pytest.mark.parametrize("kwargs", [{"min_miou": 1.5}, {"max_regression": -0.1}])
def test_gate_options_are_checked_before_any_evaluation(kwargs):
    from kubeseg.engine.gate import check_gate_options

    name = next(iter(kwargs))
    with pytest.raises(ConfigError, match=rf"{name}=.*\[0, 1\]"):
        check_gate_options(**kwargs)
    check_gate_options(0.5, 0.01)


def test_metrics_to_beat_prefers_the_given_metrics_over_the_champion(tmp_path):
    from kubeseg.engine.gate import metrics_to_beat

    (tmp_path / "champion").mkdir()
    (tmp_path / "champion" / "metrics.json").write_text(json.dumps({"mIOU": 0.6}))
    (tmp_path / "other.json").write_text(json.dumps({"mIOU": 0.3}))
    assert metrics_to_beat("", str(tmp_path / "champion"))["mIOU"] == 0.6
    assert metrics_to_beat(str(tmp_path / "other.json"), str(tmp_path / "champion"))[
        "mIOU"] == 0.3
    assert metrics_to_beat("", str(tmp_path / "no-champion-yet")) is None
    assert metrics_to_beat("", "") is None


def test_read_metrics_from_file_folder_and_model_artifact(tmp_path):
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "metrics.json").write_text(json.dumps({"mIOU": 0.61}))
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "kubeseg.json").write_text(json.dumps({"metrics": {"mIOU": 0.55}}))
    assert read_metrics(str(tmp_path / "eval" / "metrics.json"))["mIOU"] == 0.61
    assert read_metrics(str(tmp_path / "eval"))["mIOU"] == 0.61
    assert read_metrics(str(tmp_path / "model"))["mIOU"] == 0.55
    with pytest.raises(DataError, match="no metrics found"):
        read_metrics(str(tmp_path / "missing"))
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(DataError, match="not valid JSON"):
        read_metrics(str(tmp_path / "bad.json"))


def test_read_metrics_from_s3(bucket):
    from kubeseg import storage

    storage.write_text(f"{bucket}/champion/metrics.json", json.dumps({"mIOU": 0.7}))
    previous = read_metrics(f"{bucket}/champion")
    assert quality_gate({"mIOU": 0.69}, previous_metrics=previous, max_regression=0.02).passed
