"""Quality gate: decide whether an evaluated model may be deployed.

Two checks, both on the validation mIoU:

- a floor: ``mIoU >= min_miou``;
- champion/challenger: when the metrics of the model currently deployed (the champion) are
  given, the new model (the challenger) must not be worse by more than ``max_regression``
  (absolute mIoU, e.g. 0.01 = one point): ``mIoU >= previous mIoU - max_regression``.

The result is a :class:`GateDecision` whose ``reason`` states the numbers compared, so a
pipeline can log it and branch on ``passed``. :func:`apply_gate` decides on an evaluation's
result and records the decision beside it (gate.json, and a line in its report).
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from typing import Any, Dict, Mapping, Optional

from kubeseg import storage
from kubeseg.config import value_problem
from kubeseg.errors import ConfigError, DataError
from kubeseg.strict_json import json_safe

logger = logging.getLogger(__name__)
MIOU_KEYS = ("mIOU", "validation:mIOU", "miou", "mIoU")
GATE_FILE = "gate.json"


@dataclass(frozen=True)
class GateDecision:
    """``passed`` and a one-line ``reason`` naming the numbers compared."""

    passed: bool
    reason: str
    miou: Optional[float] = None
    previous_miou: Optional[float] = None

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def miou_of(metrics: Mapping[str, Any], source: str = "metrics") -> float:
    """The mIoU in a metrics mapping (metrics.json, a training epoch record, an artifact's
    metrics); NaN or null count as NaN. Raises DataError when there is none."""
    for key in MIOU_KEYS:
        if key in metrics:
            value = metrics[key]
            return math.nan if value is None else float(value)
    nested = metrics.get("metrics")
    if isinstance(nested, Mapping):
        return miou_of(nested, source)
    raise DataError(f"{source} has no mIoU: expected one of the keys {', '.join(MIOU_KEYS)}; "
                    f"found {', '.join(sorted(map(str, metrics))) or 'no keys'}")


def _find_metrics(uri: str) -> Optional[Dict[str, Any]]:
    """The metrics at ``uri`` (see :func:`read_metrics`), or None when nothing is there."""
    candidates = [uri] if str(uri).endswith(".json") else [
        storage.join(uri, "metrics.json"), storage.join(uri, "kubeseg.json")]
    for candidate in candidates:
        if storage.exists(candidate):
            try:
                data = json.loads(storage.read_text(candidate))
            except json.JSONDecodeError as exc:
                raise DataError(f"{candidate} is not valid JSON: {exc}") from None
            if not isinstance(data, dict):
                raise DataError(f"{candidate} must hold a JSON object with an mIOU key")
            if candidate.endswith("kubeseg.json"):
                data = data.get("metrics") or {}
            miou_of(data, candidate)  # fail now, naming the file, if it has no mIoU
            return data
    return None


def read_metrics(uri: str) -> Dict[str, Any]:
    """Metrics from ``uri``: a metrics.json file, a folder/prefix holding one (an evaluation
    output), or a model artifact folder (its kubeseg.json ``metrics``)."""
    data = _find_metrics(uri)
    if data is None:
        raise DataError(f"no metrics found at {uri}: expected a metrics.json file, a folder "
                        "holding metrics.json (an evaluation output), or a model artifact")
    return data


def read_champion_metrics(uri: str) -> Optional[Dict[str, Any]]:
    """The champion's metrics at ``uri``, or None when there is no champion yet.

    A retraining run gates against the model promoted by an earlier run; before the first
    promotion nothing is there, which is normal: the gate then uses ``min_miou`` alone, and a
    warning says so. Metrics that exist but cannot be read are still an error.
    """
    data = _find_metrics(uri) if uri else None
    if uri and data is None:
        logger.warning("no champion yet: nothing at %s, so the quality gate uses min_miou "
                       "alone (a passing model becomes the first champion)", uri)
    return data


def metrics_to_beat(previous_metrics_uri: str = "",
                    champion_uri: str = "") -> Optional[Dict[str, Any]]:
    """The metrics a new model is compared with: those at ``previous_metrics_uri`` when given,
    else the champion's below ``champion_uri``; None when neither is given or there is no
    champion yet (see :func:`read_champion_metrics`)."""
    if previous_metrics_uri:
        return read_champion_metrics(previous_metrics_uri)
    if champion_uri:
        from kubeseg.engine.promote import champion_metrics_uri

        return read_champion_metrics(champion_metrics_uri(champion_uri))
    return None


def _check_threshold(name: str, value: float) -> float:
    """``min_miou`` or ``max_regression``, checked against its pipeline parameter's range."""
    problem = value_problem(name, value)
    if problem:
        raise ConfigError([problem + " (mIoU as a fraction)"], what="quality gate parameter")
    return float(value)


def check_gate_options(min_miou: float = 0.0, max_regression: float = 0.0) -> None:
    """Raise ConfigError now, before an evaluation runs, when an option is out of range."""
    _check_threshold("min_miou", min_miou)
    _check_threshold("max_regression", max_regression)


def quality_gate(metrics: Mapping[str, Any], *, min_miou: float = 0.0,
                 previous_metrics: Optional[Mapping[str, Any]] = None,
                 max_regression: float = 0.0) -> GateDecision:
    """Decide whether ``metrics`` (with an ``mIOU`` key) pass the floor and, when
    ``previous_metrics`` is given, the champion/challenger comparison."""
    min_miou = _check_threshold("min_miou", min_miou)
    max_regression = _check_threshold("max_regression", max_regression)
    miou = miou_of(metrics, "the new model's metrics")
    previous = None if previous_metrics is None else miou_of(previous_metrics,
                                                            "the previous model's metrics")
    if math.isnan(miou):
        return GateDecision(False, "failed: the new model's mIoU is undefined (no scored "
                                   "pixels in the evaluation data)", None, previous)
    checks, passed = [], True
    if miou >= min_miou:
        checks.append(f"mIoU {miou:.4f} >= minimum {min_miou:.4f}")
    else:
        passed = False
        checks.append(f"mIoU {miou:.4f} < minimum {min_miou:.4f}")
    if previous is not None:
        if math.isnan(previous):
            checks.append("the previous model's mIoU is undefined, so there is no "
                          "champion to compare with")
            previous = None
        else:
            diff = miou - previous
            detail = (f"previous model's mIoU {previous:.4f}, difference {diff:+.4f}, "
                      f"allowed regression {max_regression:.4f}")
            if diff >= -max_regression - 1e-12:
                checks.append(f"not worse than the previous model ({detail})")
            else:
                passed = False
                checks.append(f"worse than the previous model ({detail})")
    reason = ("passed: " if passed else "failed: ") + "; ".join(checks)
    return GateDecision(passed, reason, miou, previous)


def apply_gate(result: Any, *, min_miou: float = 0.0,
               previous_metrics: Optional[Mapping[str, Any]] = None,
               max_regression: float = 0.0) -> GateDecision:
    """Decide on an evaluation (:class:`kubeseg.engine.evaluate.EvaluationResult`) with
    :func:`quality_gate`, write the decision to ``gate.json`` beside its outputs and show it
    in its report. The caller decides what a failed gate means."""
    decision = quality_gate(result.metrics, min_miou=min_miou,
                            previous_metrics=previous_metrics, max_regression=max_regression)
    storage.write_bytes(result.uri(GATE_FILE),
                        json.dumps(json_safe(decision.to_dict()), indent=2).encode(),
                        content_type="application/json")
    result.write_report(gate=decision.reason)
    logger.info("quality gate %s", decision.reason)
    return decision


__all__ = ["GateDecision", "quality_gate", "apply_gate", "check_gate_options", "metrics_to_beat", "GATE_FILE", "read_metrics", "read_champion_metrics", "miou_of"]
