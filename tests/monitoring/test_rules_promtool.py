"""The alert rules under ``promtool test rules`` (Debian's prometheus package): each drift alert
fires once its gauge has stayed above the threshold for the rule's ``for``, and not before,
not below it, not while the window is still filling (NaN), not for other models; the rule file
passes ``promtool check rules``. Series values come from the thresholds in the Python module."""
import shutil
import subprocess

import pytest
import yaml

from kubeseg.monitoring import alerts
from kubeseg.monitoring.drift import DriftThresholds

PROMTOOL = shutil.which("promtool")
pytestmark = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian: "
                                                         "apt-get install prometheus)")
T = DriftThresholds()
LABELS = '{model="kubeseg", namespace="kubeflow-user"}'


def _series(metric: str, values: str, labels: str = LABELS) -> dict:
    return {"series": f"{metric}{labels}", "values": values}


def _annotations(alert: str) -> dict:
    (rule,) = [r for g in alerts.rule_groups() for r in g["rules"] if r["alert"] == alert]
    return rule["annotations"]


def _firing(alert: str, value: float, **extra) -> dict:
    description = _annotations(alert)
    return {"exp_labels": {"alertname": alert, "model": "kubeseg",
                           "namespace": "kubeflow-user", "severity": "warning",
                           alerts.DRIFT_LABEL: "true", **extra},
            "exp_annotations": {
                "summary": description["summary"].replace("{{ $labels.model }}", "kubeseg"),
                "description": description["description"].replace(
                    '{{ $value | printf "%.3f" }}', f"{value:.3f}")}}


def _tests() -> dict:
    high_shift, low_shift = T.class_shift + 0.05, T.class_shift - 0.05
    high_excess = T.low_confidence_excess + 0.1
    return {"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": [{
        "interval": "1m",
        "input_series": [
            # drifting from the start: fires once 15m have passed, not at 10m
            _series(alerts.DRIFT_CLASS_SHIFT, f"{high_shift}x30"),
            # another model stays below the threshold
            _series(alerts.DRIFT_CLASS_SHIFT, f"{low_shift}x30",
                    '{model="calm", namespace="kubeflow-user"}'),
            # the window fills for 20 minutes (NaN), then the excess rises
            _series(alerts.DRIFT_LOW_CONFIDENCE_EXCESS, "NaN " * 21 + f"{high_excess}x30"),
            _series(alerts.DRIFT_BASELINE, "1x90"),
            _series(alerts.DRIFT_BASELINE, "0x90", '{model="old", namespace="kubeflow-user"}'),
        ],
        "alert_rule_test": [
            {"eval_time": "10m", "alertname": alerts.CLASS_SHIFT_ALERT, "exp_alerts": []},
            {"eval_time": "16m", "alertname": alerts.CLASS_SHIFT_ALERT,
             "exp_alerts": [_firing(alerts.CLASS_SHIFT_ALERT, high_shift)]},
            {"eval_time": "20m", "alertname": alerts.LOW_CONFIDENCE_ALERT, "exp_alerts": []},
            {"eval_time": "30m", "alertname": alerts.LOW_CONFIDENCE_ALERT, "exp_alerts": []},
            {"eval_time": "37m", "alertname": alerts.LOW_CONFIDENCE_ALERT,
             "exp_alerts": [_firing(alerts.LOW_CONFIDENCE_ALERT, high_excess)]},
            {"eval_time": "50m", "alertname": alerts.NO_BASELINE_ALERT, "exp_alerts": []},
            {"eval_time": "61m", "alertname": alerts.NO_BASELINE_ALERT, "exp_alerts": [
                {"exp_labels": {"alertname": alerts.NO_BASELINE_ALERT, "model": "old",
                                "namespace": "kubeflow-user", "severity": "info"},
                 "exp_annotations": {k: v.replace("{{ $labels.model }}", "old")
                                     for k, v in _annotations(alerts.NO_BASELINE_ALERT).items()}
                 }]},
        ]}]}


def _promtool(*args, cwd):
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=120,
                          cwd=cwd)


def test_promtool_checks_the_rule_file(tmp_path):
    (tmp_path / "rules.yaml").write_text(alerts.rule_file())
    result = _promtool("check", "rules", "rules.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 3 rules found" in result.stdout


def test_promtool_unit_tests_of_the_drift_alerts(tmp_path):
    (tmp_path / "rules.yaml").write_text(alerts.rule_file())
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(_tests(), sort_keys=False))
    result = _promtool("test", "rules", "tests.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_promtool_catches_a_rule_that_misses_its_metric(tmp_path):
    """The unit tests have teeth: a rule reading a misspelt gauge fails them."""
    (tmp_path / "rules.yaml").write_text(alerts.rule_file().replace(
        alerts.DRIFT_CLASS_SHIFT, alerts.DRIFT_CLASS_SHIFT + "_typo"))
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(_tests(), sort_keys=False))
    result = _promtool("test", "rules", "tests.yaml", cwd=tmp_path)
    assert result.returncode != 0 and alerts.CLASS_SHIFT_ALERT in result.stdout + result.stderr
