"""The Prometheus names serving exports for monitoring, and the alert rules built on them.

Declared once, here: the server exports these metrics, the rules below read them with the
thresholds of :mod:`kubeseg.monitoring.drift`, and the PrometheusRule in
``manifests/components/monitoring/prometheusrule.yaml`` is this module's output (a test keeps
them equal; regenerate it with ``python -m kubeseg.monitoring.alerts``).

Both drift alerts carry the label ``kubeseg_drift="true"``: Alertmanager routes them to the
retraining webhook (``kubeseg retrain-on-alert``), which acts only on alerts named in
:data:`DRIFT_ALERTS`.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

# Names only at module level: the CLI's parser reads them, and must not load numpy.

# -- what serving exports (every series carries the label model="<model name>") -------------
PREDICTED_PIXELS = "kubeseg_predicted_pixels_total"  # counter, label class="<class name>"
PIXEL_CONFIDENCE = "kubeseg_pixel_confidence"  # histogram of the largest class probability
IMAGES = "kubeseg_images_total"  # counter: images predicted
IMAGE_PIXELS = "kubeseg_image_pixels"  # histogram: height x width of the images predicted
DRIFT_CLASS_SHIFT = "kubeseg_drift_class_shift"  # gauge: JS distance, window vs training
DRIFT_LOW_CONFIDENCE = "kubeseg_drift_low_confidence_fraction"  # gauge, the window's
DRIFT_LOW_CONFIDENCE_BASELINE = "kubeseg_drift_low_confidence_baseline"  # gauge, validation's
DRIFT_LOW_CONFIDENCE_EXCESS = "kubeseg_drift_low_confidence_excess"  # gauge: the difference
DRIFT_WINDOW_IMAGES = "kubeseg_drift_window_images"  # gauge: images in the window now
DRIFT_BASELINE = "kubeseg_drift_baseline"  # gauge: 1 when the model has a baseline, else 0
# production images kept for labelling (kubeseg serve --keep-images)
KEPT_IMAGES = "kubeseg_kept_images_total"  # counter, label reason: sampled | low_confidence
KEPT_DROPPED = "kubeseg_kept_images_dropped_total"  # counter, reason: queue_full|budget|error
KEPT_BYTES = "kubeseg_kept_bytes"  # gauge: bytes under the keep prefix

# -- the alerts ------------------------------------------------------------------------------
CLASS_SHIFT_ALERT = "KubesegClassShift"
LOW_CONFIDENCE_ALERT = "KubesegLowConfidence"
NO_BASELINE_ALERT = "KubesegNoDriftBaseline"
DRIFT_ALERTS = (CLASS_SHIFT_ALERT, LOW_CONFIDENCE_ALERT)
DRIFT_LABEL = "kubeseg_drift"  # = "true" on the drift alerts: what Alertmanager routes on
RULE_GROUP = "kubeseg-drift"
DEFAULT_FOR = "15m"  # a drift condition must hold this long before its alert fires
DOCS = "docs/monitoring.md"


def _drift_rule(alert: str, expr: str, for_: str, summary: str, description: str) -> dict:
    return {"alert": alert, "expr": expr, "for": for_,
            "labels": {"severity": "warning", DRIFT_LABEL: "true"},
            "annotations": {"summary": summary, "description": description}}


def rule_groups(thresholds: Optional[Any] = None,
                for_: str = DEFAULT_FOR) -> List[Dict[str, Any]]:
    """The rule groups (a Prometheus rule file's ``groups``, a PrometheusRule's
    ``spec.groups``); ``thresholds``: a :class:`~kubeseg.monitoring.drift.DriftThresholds`
    (default: the defaults); ``for_``: how long a condition must hold (a Prometheus
    duration)."""
    from kubeseg.monitoring.drift import LOW_CONFIDENCE_BELOW, DriftThresholds

    thresholds = thresholds or DriftThresholds()
    problems = thresholds.problems()
    if problems:
        from kubeseg.errors import ConfigError

        raise ConfigError(problems, what="drift threshold")
    shift = _drift_rule(
        CLASS_SHIFT_ALERT, f"{DRIFT_CLASS_SHIFT} > {thresholds.class_shift}", for_,
        "Model {{ $labels.model }} predicts classes in other shares than it was trained on",
        "Over the server's window of recent images, the Jensen-Shannon distance between the "
        "predicted class shares and the training labels' is {{ $value | printf \"%.3f\" }} "
        "(threshold " + str(thresholds.class_shift) + "). The images served no longer look "
        "like the training data: retrain with recent images (" + DOCS + ").")
    low = _drift_rule(
        LOW_CONFIDENCE_ALERT, f"{DRIFT_LOW_CONFIDENCE_EXCESS} > {thresholds.low_confidence_excess}",
        for_, "Model {{ $labels.model }} is unsure of more pixels than on its validation data",
        "The share of pixels whose largest class probability is below "
        + str(LOW_CONFIDENCE_BELOW) + " exceeds the validation split's by {{ $value | printf "
        "\"%.3f\" }} (threshold " + str(thresholds.low_confidence_excess) + "): retrain with "
        "recent images (" + DOCS + ").")
    missing = {"alert": NO_BASELINE_ALERT, "expr": f"{DRIFT_BASELINE} == 0", "for": "1h",
               "labels": {"severity": "info"},
               "annotations": {
                   "summary": "Model {{ $labels.model }} has no training baseline: drift is "
                              "not watched",
                   "description": "The model artifact was written before kubeseg recorded "
                                  "the training baseline; train it again to watch its drift "
                                  "(" + DOCS + ")."}}
    return [{"name": RULE_GROUP, "rules": [shift, low, missing]}]


def rule_file(thresholds: Optional[Any] = None, for_: str = DEFAULT_FOR) -> str:
    """A Prometheus rule file (what ``rule_files`` and ``promtool test rules`` read)."""
    import yaml

    return yaml.safe_dump({"groups": rule_groups(thresholds, for_)}, sort_keys=False,
                          width=100)


def prometheus_rule() -> Dict[str, Any]:
    """The PrometheusRule (prometheus-operator, monitoring.coreos.com/v1) with the defaults."""
    return {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
            "metadata": {"name": "kubeseg-drift",
                         "labels": {"app.kubernetes.io/name": "kubeseg",
                                    "app.kubernetes.io/component": "monitoring"}},
            "spec": {"groups": rule_groups()}}


def prometheus_rule_yaml() -> str:
    """The manifest file's text."""
    import yaml

    header = ("# Written by `python -m kubeseg.monitoring.alerts` from kubeseg/monitoring/: the "
              "drift alerts,\n# their metrics and default thresholds. Change them there, not "
              "here (a test compares).\n")
    return header + yaml.safe_dump(prometheus_rule(), sort_keys=False, width=100)


__all__ = ["PREDICTED_PIXELS", "PIXEL_CONFIDENCE", "IMAGES", "IMAGE_PIXELS",
           "DRIFT_CLASS_SHIFT", "DRIFT_LOW_CONFIDENCE", "DRIFT_LOW_CONFIDENCE_BASELINE",
           "DRIFT_LOW_CONFIDENCE_EXCESS", "DRIFT_WINDOW_IMAGES", "DRIFT_BASELINE",
           "KEPT_IMAGES", "KEPT_DROPPED", "KEPT_BYTES",
           "CLASS_SHIFT_ALERT", "LOW_CONFIDENCE_ALERT", "NO_BASELINE_ALERT", "DRIFT_ALERTS",
           "DRIFT_LABEL", "DEFAULT_FOR", "rule_groups", "rule_file", "prometheus_rule",
           "prometheus_rule_yaml"]

if __name__ == "__main__":
    print(prometheus_rule_yaml(), end="")
