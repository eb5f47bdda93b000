"""The hyperparameter search space, derived from :class:`kubeseg.config.Hyperparameters`.

A search is given as ``NAME`` (the suggested range below, or the parameter's own range when that
is closed), ``NAME=LOW:HIGH`` (optionally ``:log``) or ``NAME=A,B,C`` (choices; for a numeric
parameter, the values to try). Every bound and choice is checked with the parameter's own
parser, so a search never proposes a value that ``kubeseg train`` would refuse. The same :class:`SearchSpace` feeds the Katib Experiment and the
local Optuna run.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from kubeseg.config import Hyperparameters, Spec
from kubeseg.errors import ConfigError

OBJECTIVE_METRIC = "validation:mIOU"
ADDITIONAL_METRICS = ("validation:pixel_accuracy",)

# What is searched when the user names nothing: the usual first knobs of a segmentation model.
DEFAULT_SEARCH = ("learning_rate", "momentum", "weight_decay", "optimizer")

# Ranges worth searching where a parameter's own range is open-ended or too wide to be useful
# (learning_rate may be anything in (0, 1]); each one is checked against that range.
SUGGESTED_RANGES: Dict[str, Tuple[float, float, bool]] = {  # name -> (low, high, log scale)
    "learning_rate": (1e-4, 1e-1, True),
    "momentum": (0.8, 0.99, False),
    "weight_decay": (1e-5, 1e-3, True),
    "mini_batch_size": (4, 32, False),
    "validation_mini_batch_size": (4, 32, False),
    "epochs": (5, 50, False),
    "crop_size": (240, 480, False),
    "base_size": (400, 800, False),
    "lr_scheduler_factor": (0.05, 0.5, True),
    "early_stopping_patience": (2, 8, False),
    "early_stopping_min_epochs": (2, 10, False),
}
# Choices worth searching where searching every one is not (sgd and nag differ little).
SUGGESTED_CHOICES: Dict[str, Tuple[str, ...]] = {
    "optimizer": ("sgd", "adam", "rmsprop"),
}
NOT_SEARCHABLE = ("num_classes", "num_training_samples", "seed")


@dataclass(frozen=True)
class SearchParameter:
    """One searched hyperparameter: a numeric range (``kind`` int/double), choices
    (categorical) or numeric values to try (discrete, ascending)."""

    name: str
    kind: str                   # "double", "int", "categorical" or "discrete" (Katib's names)
    low: Optional[float] = None
    high: Optional[float] = None
    log: bool = False
    choices: Tuple[str, ...] = ()

    @property
    def is_range(self) -> bool:
        return self.kind in ("int", "double")

    def describe(self) -> str:
        if not self.is_range:
            return "{" + ", ".join(self.choices) + "}"
        scale = ", log scale" if self.log else ""
        return f"[{_text(self.low, self.kind)}, {_text(self.high, self.kind)}]{scale}"


def _text(value: float, kind: str) -> str:
    return str(int(value)) if kind == "int" else repr(float(value))


@dataclass(frozen=True)
class SearchSpace:
    parameters: Tuple[SearchParameter, ...]

    @property
    def names(self) -> Tuple[str, ...]:
        return tuple(p.name for p in self.parameters)

    def describe(self) -> str:
        return "\n".join(f"  {p.name}: {p.describe()}" for p in self.parameters)


def parse_search(items: Optional[Iterable[str]]) -> SearchSpace:
    """The search space for ``--search`` items (``DEFAULT_SEARCH`` when there are none).

    Raises :class:`ConfigError` listing every problem, each naming the parameter and its range.
    """
    items = list(items or DEFAULT_SEARCH)
    specs = Hyperparameters.specs()
    problems: List[str] = []
    parameters: List[SearchParameter] = []
    seen = set()
    for item in items:
        name, sep, value = (part.strip() for part in str(item).partition("="))
        if name not in specs:
            close = difflib.get_close_matches(name, list(specs), n=1, cutoff=0.6)
            problems.append(f"--search {item!r}: unknown hyperparameter '{name}'"
                            + (f"; did you mean '{close[0]}'?" if close else ""))
            continue
        if name in seen:
            problems.append(f"--search {item!r}: {name} is searched twice")
            continue
        seen.add(name)
        try:
            parameters.append(_parameter(name, specs[name], value if sep else None))
        except ValueError as exc:
            problems.append(f"--search {item!r}: {exc}")
    if problems:
        raise ConfigError(problems, what="search parameter")
    return SearchSpace(tuple(parameters))


def _parameter(name: str, spec: Spec, value: Optional[str]) -> SearchParameter:
    if name in NOT_SEARCHABLE or spec.kind in ("int_list", "float_list"):
        raise ValueError(f"{name} cannot be searched (it describes the data or is a list)")
    if spec.kind in ("choice", "bool") or spec.choices:  # output_stride: integer choices
        if value is None:
            if spec.kind == "bool":
                choices: Sequence[str] = ("True", "False")
            else:
                choices = SUGGESTED_CHOICES.get(name, spec.choices)
        else:
            choices = [c.strip() for c in value.split(",") if c.strip()]
        checked = []
        for choice in choices:
            try:
                checked.append(str(spec.parse(choice)))
            except ValueError as exc:
                raise ValueError(f"{name}={choice!r}: {exc}; allowed: {spec.describe()}") \
                    from None
        if len(set(checked)) < 2:
            raise ValueError(f"{name}: give at least two different choices, e.g. "
                             f"{name}={','.join(spec.choices[:2] or ('True', 'False'))}")
        return SearchParameter(name, "categorical", choices=tuple(dict.fromkeys(checked)))
    kind = "int" if spec.kind == "int" else "double"
    if value is not None and "," in value:
        return _discrete(name, spec, value)
    if value is None:
        if name in SUGGESTED_RANGES:
            low, high, log = SUGGESTED_RANGES[name]
        elif (spec.low is not None and spec.high is not None
              and not spec.low_open and not spec.high_open):
            low, high, log = spec.low, spec.high, False
        else:
            raise ValueError(f"{name} has no closed range ({spec.describe()}): give one, "
                             f"e.g. {name}=LOW:HIGH")
    else:
        parts = [p.strip() for p in value.split(":")]
        log = len(parts) == 3 and parts[2].lower() == "log"
        if len(parts) not in (2, 3) or (len(parts) == 3 and not log):
            raise ValueError(f"expected {name}=LOW:HIGH or {name}=LOW:HIGH:log")
        low, high = parts[0], parts[1]
    bounds = []
    for bound in (low, high):
        try:
            bounds.append(spec.parse(bound))
        except ValueError as exc:
            raise ValueError(f"{name} bound {bound!r}: {exc}; allowed: {spec.describe()}") \
                from None
    low, high = bounds
    if not low < high:
        raise ValueError(f"{name}: the low bound {low} must be below the high bound {high}")
    if log and low <= 0:
        raise ValueError(f"{name}: a log-scale range needs a positive low bound, not {low}")
    return SearchParameter(name, kind, low=low, high=high, log=log)


def _discrete(name: str, spec: Spec, value: str) -> SearchParameter:
    """``NAME=A,B,C`` for a numeric parameter: the values to try, checked, ascending."""
    parsed = {}
    for text in (v.strip() for v in value.split(",") if v.strip()):
        try:
            parsed[spec.parse(text)] = None
        except ValueError as exc:
            raise ValueError(f"{name}={text!r}: {exc}; allowed: {spec.describe()}") from None
    if len(parsed) < 2:
        raise ValueError(f"{name}: give at least two different values, e.g. "
                         f"{name}=A,B or a range {name}=LOW:HIGH")
    return SearchParameter(name, "discrete", choices=tuple(str(v) for v in sorted(parsed)))


def check_fixed(values: Mapping[str, Any], space: SearchSpace) -> Hyperparameters:
    """Check the fixed hyperparameters with every searched one at its low end and high end.

    Cross-checks (e.g. class_weights against num_classes) fail here, before any trial starts.
    """
    corners: List[Dict[str, Any]] = [{}, {}]
    for p in space.parameters:
        if not p.is_range:
            corners[0][p.name], corners[1][p.name] = p.choices[0], p.choices[-1]
        else:
            corners[0][p.name], corners[1][p.name] = p.low, p.high
    hp = None
    for corner in corners:
        hp = Hyperparameters.from_dict({**values, **corner})
    return hp


__all__ = ["OBJECTIVE_METRIC", "ADDITIONAL_METRICS", "DEFAULT_SEARCH", "SUGGESTED_RANGES",
           "SearchParameter", "SearchSpace", "parse_search", "check_fixed"]
