"""The same search on this machine, with Optuna (the library behind Katib's TPE suggestions).

Each trial is a real ``kubeseg train`` run (in this process) with the suggested values, writing
to ``<output>/trial-NNN/`` (checkpoints, metrics.jsonl, model/), all of which are kept. Its
score is the best epoch's ``validation:mIOU``, as Katib's ``max`` metric strategy takes it. A
trial whose values training refuses, or whose training diverges, is recorded as failed and the
search goes on. At the end ``<output>/trials.csv`` and ``<output>/best.json`` hold the table
and the best parameters (both written atomically).
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional

from kubeseg import storage
from kubeseg.config import Hyperparameters
from kubeseg.engine.train import TrainOptions, train
from kubeseg.errors import ConfigError, KubesegError
from kubeseg.tuning.space import OBJECTIVE_METRIC, SearchSpace

logger = logging.getLogger(__name__)

LOCAL_ALGORITHMS = ("tpe", "multivariate-tpe", "random")
TRIALS_FILE = "trials.csv"
BEST_FILE = "best.json"


@dataclass
class TrialRecord:
    number: int
    state: str                      # "complete" or "failed"
    parameters: Dict[str, Any]
    miou: Optional[float] = None
    pixel_accuracy: Optional[float] = None
    best_epoch: Optional[int] = None
    seconds: float = 0.0
    output_uri: str = ""
    error: str = ""


@dataclass
class TuningResult:
    trials: List[TrialRecord] = field(default_factory=list)
    best: Optional[TrialRecord] = None
    output_uri: str = ""

    def table(self) -> str:
        """The trials as an aligned text table (best trial marked with *)."""
        names = sorted({k for t in self.trials for k in t.parameters})
        header = ["trial", "state", OBJECTIVE_METRIC, "pixel_accuracy", "epoch", "seconds",
                  *names]
        rows = [header]
        for t in self.trials:
            mark = "*" if self.best is not None and t.number == self.best.number else ""
            rows.append([f"{t.number}{mark}", t.state, _show(t.miou), _show(t.pixel_accuracy),
                         _show(t.best_epoch), f"{t.seconds:.1f}",
                         *[_show(t.parameters.get(n)) for n in names]])
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
                         for r in rows)


def _show(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e-3 and value != 0 else f"{value:.4f}"
    return str(value)


def _sampler(algorithm: str, seed: int):
    import optuna

    if algorithm == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if algorithm == "multivariate-tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True)
    return optuna.samplers.RandomSampler(seed=seed)


def _suggest(trial, space: SearchSpace) -> Dict[str, Any]:
    values = {}
    for p in space.parameters:
        if not p.is_range:  # choices, or numeric values to try
            values[p.name] = trial.suggest_categorical(p.name, list(p.choices))
        elif p.kind == "int":
            values[p.name] = trial.suggest_int(p.name, int(p.low), int(p.high), log=p.log)
        else:
            values[p.name] = trial.suggest_float(p.name, float(p.low), float(p.high), log=p.log)
    return values


@dataclass(frozen=True)
class LocalSearch:
    """How Optuna searches on this machine: ``trials`` in all, the ``algorithm`` and its
    ``seed``."""

    trials: int
    algorithm: str = "tpe"
    seed: int = 0

    def problems(self) -> List[str]:
        out = []
        if self.algorithm not in LOCAL_ALGORITHMS:
            out.append(f"algorithm={self.algorithm!r}: a local search runs "
                       f"{', '.join(LOCAL_ALGORITHMS)} (the others on Katib)")
        if self.trials < 1:
            out.append(f"trials={self.trials}: must be >= 1")
        return out


def tune_locally(space: SearchSpace, fixed: Mapping[str, Any], channels, output_uri: str, *,
                 search: LocalSearch, pretrained_uri: Optional[str] = None,
                 device: Optional[str] = None,
                 options: TrainOptions = TrainOptions(workers=0)) -> TuningResult:
    """Run ``search.trials`` training trials chosen by Optuna; returns every trial and the best
    one. ``pretrained_uri``, ``device`` and ``options`` go to each trial's training."""
    problems = search.problems()
    if not space.parameters:
        problems.append("the search space is empty: name at least one hyperparameter")
    if problems:
        raise ConfigError(problems, what="tuning option")
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize",
                                sampler=_sampler(search.algorithm, search.seed),
                                study_name="kubeseg")
    result = TuningResult(output_uri=output_uri)
    trials = search.trials
    for _ in range(trials):
        trial = study.ask()
        values = _suggest(trial, space)
        trial_uri = storage.join(output_uri, f"trial-{trial.number:03d}")
        record = TrialRecord(number=trial.number, state="failed", parameters=values,
                             output_uri=trial_uri)
        logger.info("trial %d/%d: %s", trial.number + 1, trials,
                    " ".join(f"{k}={_show(v)}" for k, v in values.items()))
        started = time.perf_counter()
        try:
            hp = Hyperparameters.from_dict({**fixed, **values,
                                            "_tuning_objective_metric": OBJECTIVE_METRIC})
            trained = train(hp, channels, trial_uri, pretrained_uri=pretrained_uri,
                            device=device, options=options)
        except KubesegError as exc:
            record.seconds = time.perf_counter() - started
            record.error = "; ".join(getattr(exc, "problems", None) or [str(exc)])
            logger.warning("trial %d failed: %s", trial.number, exc)
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            result.trials.append(record)
            continue
        record.seconds = time.perf_counter() - started
        record.best_epoch = trained.best_epoch
        best_row = next((r for r in trained.history if r.get("epoch") == trained.best_epoch),
                        {})
        miou = best_row.get(OBJECTIVE_METRIC)
        record.pixel_accuracy = best_row.get("validation:pixel_accuracy")
        if not isinstance(miou, (int, float)) or not math.isfinite(miou):
            record.error = "no finite validation:mIOU (is there validation data?)"
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        else:
            record.state, record.miou = "complete", float(miou)
            study.tell(trial, record.miou)
        result.trials.append(record)
    complete = [t for t in result.trials if t.state == "complete"]
    if complete:
        # the first of equal scores wins
        result.best = max(complete, key=lambda t: (t.miou, -t.number))
    _write_outputs(result, space)
    return result


def _write_outputs(result: TuningResult, space: SearchSpace) -> None:
    buf = io.StringIO()
    names = list(space.names)
    writer = csv.writer(buf)
    writer.writerow(["trial", "state", OBJECTIVE_METRIC, "validation:pixel_accuracy",
                     "best_epoch", "seconds", *names, "output", "error"])
    for t in result.trials:
        writer.writerow([t.number, t.state, "" if t.miou is None else repr(t.miou),
                         "" if t.pixel_accuracy is None else repr(t.pixel_accuracy),
                         "" if t.best_epoch is None else t.best_epoch, f"{t.seconds:.3f}",
                         *[t.parameters.get(n, "") for n in names], t.output_uri, t.error])
    storage.write_text(storage.join(result.output_uri, TRIALS_FILE), buf.getvalue())
    best = result.best
    summary = {
        "objective": {"metric": OBJECTIVE_METRIC, "type": "maximize"},
        "trials": len(result.trials),
        "failed": sum(t.state == "failed" for t in result.trials),
        "best": None if best is None else {
            "trial": best.number, OBJECTIVE_METRIC: best.miou,
            "validation:pixel_accuracy": best.pixel_accuracy, "best_epoch": best.best_epoch,
            "parameters": best.parameters, "model": storage.join(best.output_uri, "model")},
    }
    storage.write_text(storage.join(result.output_uri, BEST_FILE),
                       json.dumps(summary, indent=2, sort_keys=True) + "\n")


__all__ = ["tune_locally", "LocalSearch", "TuningResult", "TrialRecord", "LOCAL_ALGORITHMS", "TRIALS_FILE",
           "BEST_FILE"]
