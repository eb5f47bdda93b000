"""Tuning on Kubernetes as a Katib ``Experiment`` (``kubeflow.org/v1beta1``).

:func:`build_experiment` is pure (no cluster, no kubernetes import). Each trial is a
``batch/v1`` Job running ``kubeseg train`` in the trainer image on the GPU node pool, with the
storage Secret's keys as environment variables, a memory-backed ``/dev/shm`` for the data
loaders, and Istio's sidecar turned off (a Job whose sidecar keeps running never completes).
Katib puts each suggested value into the trial's command through ``${trialParameters.NAME}``.

The objective is ``validation:mIOU`` (maximised, the best epoch of each trial counts), with
``validation:pixel_accuracy`` collected beside it. Training prints them once per epoch as
``validation:mIOU=0.523456``; Katib's StdOut collector reads ``name=value`` pairs with a regular
expression whose name part is ``[\\w|-]+``, which stops at ``:``. The Experiment therefore
names :data:`METRICS_FILTER`: Katib's default filter with ``:`` allowed in names.

:func:`run_experiment` creates the Experiment (or adopts one of the same name), waits until it
succeeds or fails, and returns Katib's best trial.
"""
from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence

from kubeseg import images, versions
from kubeseg.deploy import cluster, placement
from kubeseg.deploy.placement import place
from kubeseg.errors import ClusterError, ConfigError
from kubeseg.tuning.space import ADDITIONAL_METRICS, OBJECTIVE_METRIC, SearchSpace

logger = logging.getLogger(__name__)

API_GROUP = "kubeflow.org"
API_VERSION = "v1beta1"
KIND = "Experiment"
PLURAL = "experiments"
ALGORITHMS = ("tpe", "multivariate-tpe", "random", "grid", "bayesianoptimization", "cmaes",
              "sobol")
CONTAINER_NAME = "training"
# Katib's default StdOut filter (pkg/metricscollector/v1beta1/common/const.go) with ':' added
# to the characters of a metric name, so "validation:mIOU=0.52" yields "validation:mIOU".
KATIB_DEFAULT_FILTER = r"([\w|-]+)\s*=\s*([+-]?\d*(\.\d+)?([Ee][+-]?\d+)?)"
METRICS_FILTER = r"([\w|:-]+)\s*=\s*([+-]?\d*(\.\d+)?([Ee][+-]?\d+)?)"
# gjson conditions Katib evaluates on the trial's Job
SUCCESS_CONDITION = 'status.conditions.#(type=="Complete")#|#(status=="True")#'
FAILURE_CONDITION = 'status.conditions.#(type=="Failed")#|#(status=="True")#'
TRIAL_NAME_PARAMETER = "trialName"
# Which suggestion service runs each algorithm (kubeflow/katib v0.17.0 and v0.18.0
# manifests/v1beta1/installs/katib-standalone/katib-config.yaml), and what it does with
# feasibleSpace.distribution at v0.18.0 (pkg/suggestion/v1beta1/<service>/):
# hyperopt (tpe, random) and optuna (multivariate-tpe, grid) honour logUniform; goptuna (cmaes,
# sobol) ignores it (converter.go); skopt (bayesianoptimization) searches every double
# log-uniformly and every int uniformly, whatever it says (base_service.py).
IGNORES_DISTRIBUTION = ("cmaes", "sobol")
ALWAYS_LOG_DOUBLES = ("bayesianoptimization",)
# Points per numeric range on a grid: a step for linear ranges, log-spaced values for log ones.
GRID_POINTS = 5

_NAME = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


@dataclass(frozen=True)
class KatibSearch:
    """How Katib searches: its ``algorithm``, the trials in all and at once, and how many may
    fail (None: all of them) before the Experiment fails."""

    algorithm: str = "tpe"
    max_trials: int = 12
    parallel_trials: int = 3
    max_failed_trials: Optional[int] = None
    katib_version: str = versions.KATIB_DEFAULT_VERSION

    def problems(self) -> List[str]:
        out = []
        if self.algorithm not in ALGORITHMS:
            out.append(f"algorithm={self.algorithm!r}: one of {', '.join(ALGORITHMS)}")
        if self.katib_version not in versions.KATIB_VERSIONS:
            out.append(f"katib_version={self.katib_version!r}: one of "
                       f"{', '.join(versions.KATIB_VERSIONS)}")
        if self.max_trials < 1:
            out.append(f"max_trials={self.max_trials}: must be >= 1")
        if not 1 <= self.parallel_trials <= max(1, self.max_trials):
            out.append(f"parallel_trials={self.parallel_trials}: must be in [1, max_trials="
                       f"{self.max_trials}]")
        if self.max_failed_trials is not None \
                and not 0 <= self.max_failed_trials <= self.max_trials:
            out.append(f"max_failed_trials={self.max_failed_trials}: must be in [0, max_trials="
                       f"{self.max_trials}]")
        return out


@dataclass(frozen=True)
class TrialPod:
    """What each trial's pod runs with and where: the trainer ``image``, GPUs, CPU and memory
    (requests = limits), the storage Secret, placement and service account."""

    image: str
    gpus: int = 1
    cpu: str = "8"
    memory: str = "32Gi"
    storage_secret: str = placement.STORAGE_SECRET
    node_selector: Optional[Mapping[str, str]] = None
    tolerations: Optional[Sequence[Mapping[str, Any]]] = None
    service_account: Optional[str] = None


def build_experiment(
        name: str, space: SearchSpace, *, fixed: Mapping[str, Any], train_args: Sequence[str],
        output_uri: str, pod: TrialPod, search: KatibSearch = KatibSearch(),
        namespace: str = "kubeflow-user") -> Dict[str, Any]:
    """The Experiment (a dict) searching ``space`` with ``kubeseg train`` trials.

    ``fixed``: the hyperparameters every trial gets (already checked); ``train_args``: the data
    flags of ``kubeseg train`` (``--data-root``/``--train`` ... or ``--shards``, and optionally
    ``--pretrained-weights``); every URI must be readable from the pods. Trial ``T`` writes to
    ``<output_uri>/T`` (checkpoints, metrics.jsonl, model/). ``pod``: the trial pods
    (:class:`TrialPod`); ``search``: algorithm and trial counts (:class:`KatibSearch`).
    """
    _check_experiment(name, space, fixed, search, pod)
    labels = {"app.kubernetes.io/name": "kubeseg", "app.kubernetes.io/component": "tuning"}
    trial_parameters = [{"name": TRIAL_NAME_PARAMETER, "reference": "${trialSpec.Name}",
                         "description": "the trial's name: its output folder"}]
    trial_parameters += [{"name": p.name, "reference": p.name,
                          "description": f"hyperparameter {p.name}"} for p in space.parameters]
    spec: Dict[str, Any] = {
        "objective": {
            "type": "maximize",
            "objectiveMetricName": OBJECTIVE_METRIC,
            "additionalMetricNames": list(ADDITIONAL_METRICS),
            "metricStrategies": [{"name": m, "value": "max"}
                                 for m in (OBJECTIVE_METRIC, *ADDITIONAL_METRICS)],
        },
        "algorithm": {"algorithmName": search.algorithm},
        "parallelTrialCount": int(search.parallel_trials),
        "maxTrialCount": int(search.max_trials),
        "maxFailedTrialCount": int(search.max_trials if search.max_failed_trials is None
                                   else search.max_failed_trials),
        "parameters": [katib_parameter(p, search.algorithm) for p in space.parameters],
        "metricsCollectorSpec": {
            "collector": {"kind": "StdOut"},
            "source": {"filter": {"metricsFormat": [METRICS_FILTER]}},
        },
        "trialTemplate": {
            "primaryContainerName": CONTAINER_NAME,
            "successCondition": SUCCESS_CONDITION,
            "failureCondition": FAILURE_CONDITION,
            "trialParameters": trial_parameters,
            "trialSpec": _trial_job(_trial_command(space, fixed, train_args, output_uri), pod,
                                    labels),
        },
    }
    return {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": KIND,
            "metadata": {"name": name, "namespace": namespace, "labels": dict(labels)},
            "spec": spec}


def _check_experiment(name: str, space: SearchSpace, fixed: Mapping[str, Any],
                      search: KatibSearch, pod: TrialPod) -> None:
    """ConfigError listing every option Katib or the search would refuse."""
    problems = []
    if not _NAME.match(name or "") or len(name) > 40:
        problems.append(f"name={name!r}: Katib needs lower-case letters, digits and '-', "
                        "starting with a letter, at most 40 characters")
    problems += search.problems()
    if pod.gpus < 0:
        problems.append(f"gpus={pod.gpus}: must be >= 0")
    if not space.parameters:
        problems.append("the search space is empty: name at least one hyperparameter")
    overlap = sorted(set(space.names) & set(fixed))
    if overlap:
        problems.append(f"{', '.join(overlap)}: both fixed and searched; drop the fixed value")
    if not problems:
        problems += search_problems(space, search)
    if problems:
        raise ConfigError(problems, what="tuning option")


def search_problems(space: SearchSpace, search: KatibSearch) -> List[str]:
    """What the Katib release and algorithm would search otherwise than asked, or refuse."""
    algorithm, version = search.algorithm, search.katib_version
    problems = []
    for p in space.parameters:
        if not p.is_range:
            continue
        asked = f"{p.name}={_number(p.low, p.kind)}:{_number(p.high, p.kind)}"
        values = f"values ({p.name}=A,B,C)"
        if p.log and algorithm != "grid" and \
                not versions.at_least(version, versions.KATIB_LOG_UNIFORM_SINCE):
            problems.append(
                f"{asked}:log: Katib {version} has no log-uniform search (feasibleSpace."
                f"distribution arrived in {versions.KATIB_LOG_UNIFORM_SINCE}) and would search "
                f"it uniformly; on Katib {versions.KATIB_LOG_UNIFORM_SINCE} say --katib-version "
                f"{versions.KATIB_LOG_UNIFORM_SINCE}, else search {asked} or {values}")
        elif p.log and algorithm in IGNORES_DISTRIBUTION:
            problems.append(f"{asked}:log: Katib's {algorithm} ignores the log-uniform "
                            f"distribution and would search it uniformly; use tpe, random or "
                            f"multivariate-tpe, or give {values}")
        elif algorithm in ALWAYS_LOG_DOUBLES and (p.kind == "double") != p.log:
            scale = "uniformly" if p.kind == "double" else "on a log scale"
            problems.append(f"{asked}{':log' if p.log else ''}: Katib's {algorithm} searches "
                            f"every double log-uniformly and every int uniformly, so it would "
                            f"not search this {p.kind} {scale}; use another algorithm or give "
                            f"{values}")
    if algorithm == "grid" and not problems:
        combinations = grid_size([katib_parameter(p, "grid") for p in space.parameters])
        if search.max_trials > combinations:
            problems.append(f"max_trials={search.max_trials}: the grid has {combinations} "
                            f"combinations and Katib refuses more trials than that; use "
                            f"--trials {combinations} or fewer, or search more values")
    return problems


def _trial_command(space: SearchSpace, fixed: Mapping[str, Any], train_args: Sequence[str],
                   output_uri: str) -> List[str]:
    """``kubeseg train`` with the fixed values and Katib's placeholders for the searched."""
    command = ["python", "-m", "kubeseg", "train", *map(str, train_args),
               "--output", f"{output_uri.rstrip('/')}/${{trialParameters.{TRIAL_NAME_PARAMETER}}}",
               "--set", f"_tuning_objective_metric={OBJECTIVE_METRIC}"]
    for key, value in fixed.items():
        command += ["--set", f"{key}={_value_text(value)}"]
    for p in space.parameters:
        command += ["--set", f"{p.name}=${{trialParameters.{p.name}}}"]
    return command


def _trial_job(command: List[str], pod: TrialPod, labels: Mapping[str, str]) -> Dict[str, Any]:
    """The ``batch/v1`` Job of one trial."""
    resources: Dict[str, Dict[str, str]] = {
        "requests": {"cpu": str(pod.cpu), "memory": str(pod.memory)},
        "limits": {"cpu": str(pod.cpu), "memory": str(pod.memory)},
    }
    container: Dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": pod.image,
        "imagePullPolicy": images.pull_policy(pod.image),
        "command": command,
        "env": [{"name": "PYTHONUNBUFFERED", "value": "1"}]
               + placement.storage_env(pod.storage_secret),
        "resources": resources,
        "volumeMounts": [placement.shm_mount()],
    }
    pod_spec: Dict[str, Any] = {
        "restartPolicy": "Never",
        "containers": [container],
        "volumes": [placement.shm_volume()],
    }
    place(pod_spec, resources, pod.gpus, node_selector=pod.node_selector,
          tolerations=pod.tolerations)
    if pod.service_account:
        pod_spec["serviceAccountName"] = pod.service_account
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "spec": {
            "backoffLimit": 0,  # a failed trial is Katib's to count, not the Job's to retry
            "template": {
                "metadata": {"labels": dict(labels),
                             "annotations": dict(placement.NO_ISTIO_SIDECAR)},
                "spec": pod_spec,
            },
        },
    }


def _value_text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


def katib_parameter(p, algorithm: str) -> Dict[str, Any]:
    """One entry of ``spec.parameters`` for ``algorithm``. On a grid every int and double needs
    a step (kubeflow/katib v0.18.0 pkg/suggestion/v1beta1/internal/search_space.py,
    convert_to_combinations): linear ranges get one giving :data:`GRID_POINTS` points, log
    ranges become that many log-spaced discrete values."""
    if not p.is_range:
        return {"name": p.name, "parameterType": p.kind,
                "feasibleSpace": {"list": list(p.choices)}}
    if algorithm == "grid" and p.log:
        return {"name": p.name, "parameterType": "discrete",
                "feasibleSpace": {"list": _log_points(p.low, p.high, p.kind)}}
    space = {"min": _number(p.low, p.kind), "max": _number(p.high, p.kind)}
    if algorithm == "grid":
        space["step"] = _grid_step(p.low, p.high, p.kind)
    elif p.log:
        space["distribution"] = "logUniform"
    return {"name": p.name, "parameterType": p.kind, "feasibleSpace": space}


def _number(value: float, kind: str) -> str:
    return str(int(value)) if kind == "int" else repr(float(value))


def _significant(value: float, digits: int = 3) -> float:
    return float(f"{value:.{digits - 1}e}")


def _grid_step(low: float, high: float, kind: str) -> str:
    if kind == "int":
        return str(max(1, math.ceil((int(high) - int(low)) / (GRID_POINTS - 1))))
    return repr(_significant((float(high) - float(low)) / (GRID_POINTS - 1)))


def _log_points(low: float, high: float, kind: str) -> List[str]:
    ratio = float(high) / float(low)
    points = [float(low) * ratio ** (i / (GRID_POINTS - 1)) for i in range(GRID_POINTS)]
    points[0], points[-1] = float(low), float(high)
    if kind == "int":
        return list(dict.fromkeys(str(round(v)) for v in points))
    return list(dict.fromkeys(repr(_significant(v)) for v in points))


def grid_size(parameters: Sequence[Mapping[str, Any]]) -> int:
    """How many combinations Katib's grid makes of ``spec.parameters``, counted as
    kubeflow/katib v0.18.0 pkg/suggestion/v1beta1/internal/search_space.py does (numpy's
    arange up to max + step, the last point dropped when beyond max)."""
    import numpy as np

    total = 1
    for p in parameters:
        space = p["feasibleSpace"]
        if p["parameterType"] == "int":
            count = len(range(int(space["min"]), int(space["max"]) + 1,
                              int(space.get("step") or 1)))
        elif p["parameterType"] == "double":
            step = float(space["step"])
            points = np.arange(float(space["min"]), float(space["max"]) + step, step)
            count = len(points) - (1 if points[-1] > float(space["max"]) else 0)
        else:
            count = len(space["list"])
        total *= count
    return total


# --------------------------------------------------------------------------------------------
# On a cluster
def experiment_state(obj: Mapping[str, Any]) -> Optional[str]:
    """``"Succeeded"``, ``"Failed"``, ``"Running"``, ... : the newest true condition, or None."""
    conditions = (obj.get("status") or {}).get("conditions") or []
    for wanted in ("Succeeded", "Failed"):
        if any(c.get("type") == wanted and str(c.get("status")) == "True" for c in conditions):
            return wanted
    true = [c for c in conditions if str(c.get("status")) == "True"]
    return true[-1].get("type") if true else None


def best_trial(obj: Mapping[str, Any]) -> Dict[str, Any]:
    """Katib's current optimal trial: name, parameters and metrics (empty when none yet)."""
    optimal = (obj.get("status") or {}).get("currentOptimalTrial") or {}
    parameters = {a.get("name"): a.get("value")
                  for a in optimal.get("parameterAssignments") or []}
    metrics = {m.get("name"): m.get("max", m.get("latest"))
               for m in (optimal.get("observation") or {}).get("metrics") or []}
    return {"trial": optimal.get("bestTrialName") or "", "parameters": parameters,
            "metrics": metrics}


def _custom_objects_api():
    from kubernetes import client

    return client.CustomObjectsApi(cluster.api_client("create the Experiment in",
                                                      hint="or use --dry-run or --local"))


def run_experiment(obj: Mapping[str, Any], *, timeout_s: float = 7 * 24 * 3600,
                   poll_s: float = 30.0, api=None) -> Dict[str, Any]:
    """Create ``obj`` (or adopt the Experiment of that name), wait until it ends, and return
    :func:`best_trial`. Raises :class:`ClusterError` when it fails or ``timeout_s`` passes."""
    from kubernetes.client.exceptions import ApiException

    api = api or _custom_objects_api()
    name = obj["metadata"]["name"]
    namespace = obj["metadata"].get("namespace", "default")
    where = f"Experiment {namespace}/{name}"

    def get():
        try:
            return api.get_namespaced_custom_object(API_GROUP, API_VERSION, namespace, PLURAL,
                                                    name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise ClusterError(f"{where}: cannot read it ({exc.status} {exc.reason})") from None

    if get() is None:
        try:
            api.create_namespaced_custom_object(API_GROUP, API_VERSION, namespace, PLURAL,
                                                dict(obj))
        except ApiException as exc:
            raise ClusterError(f"{where}: cannot create it ({exc.status} {exc.reason}); check "
                               "that Katib is installed and that you may create "
                               "experiments.kubeflow.org in the namespace") from None
        logger.info("%s created", where)
    else:
        logger.info("%s exists; waiting for it", where)
    deadline = time.monotonic() + timeout_s
    last = None
    while True:
        current = get() or {}
        state = experiment_state(current)
        status = current.get("status") or {}
        progress = (state, status.get("trialsSucceeded"), status.get("trialsFailed"))
        if progress != last:
            logger.info("%s: %s (trials succeeded %s, failed %s)", where, state or "pending",
                        progress[1] or 0, progress[2] or 0)
            last = progress
        if state == "Succeeded":
            return best_trial(current)
        if state == "Failed":
            message = next((c.get("message") for c in status.get("conditions") or []
                            if c.get("type") == "Failed"), "no message")
            raise ClusterError(f"{where} failed: {message}; best so far: "
                               f"{best_trial(current)}")
        if time.monotonic() > deadline:
            raise ClusterError(f"{where} did not finish within {timeout_s:.0f} s")
        time.sleep(poll_s)


__all__ = ["build_experiment", "KatibSearch", "TrialPod", "run_experiment", "best_trial",
           "experiment_state", "METRICS_FILTER", "KATIB_DEFAULT_FILTER", "ALGORITHMS",
           "katib_parameter", "search_problems", "grid_size", "GRID_POINTS"]
