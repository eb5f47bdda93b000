"""``kubeseg submit``: create a run (or a recurring run) of the compiled pipeline on a Kubeflow
Pipelines API server, from a parameters YAML file checked before anything is sent."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

from kubeseg.pipeline_auth import DEFAULT_SA_TOKEN_PATH, HEALTHZ_PATH, SA_TOKEN_PATH_ENV, TOKEN_ENV



@dataclass(frozen=True)
class SubmitOptions:
    """What ``kubeseg submit`` was asked for (see its ``--help``)."""

    host: str
    parameters: str  # YAML file: path or s3:// URI
    experiment: str = "kubeseg"
    run_name: Optional[str] = None
    schedule: Optional[str] = None  # cron: a recurring run instead of one run
    token: Optional[str] = None
    namespace: Optional[str] = None
    service_account: Optional[str] = None
    pipeline_file: Optional[str] = None
    check_only: bool = False


def pipeline_arguments(values: Mapping[str, Any]) -> Dict[str, Any]:
    """Check a parameters mapping and return the pipeline arguments to send.

    Hyperparameters are checked with :class:`kubeseg.config.Hyperparameters`, the other
    parameters with :class:`kubeseg.config.PipelineParameters` (every problem at once); only
    the names given are sent. Raises ConfigError.
    """
    import difflib

    from kubeseg.config import Hyperparameters, PipelineParameters
    from kubeseg.errors import ConfigError

    if not isinstance(values, Mapping):
        raise ConfigError(["the parameters file must hold a YAML mapping of name: value"],
                          what="parameter")
    declarations = (Hyperparameters, PipelineParameters)
    given = [{k: v for k, v in values.items() if k in d.specs()} for d in declarations]
    known = [name for d in declarations for name in d.specs()]
    problems = []
    for name in values:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            problems.append(f"unknown pipeline parameter '{name}'"
                            + (f"; did you mean '{close[0]}'?" if close else ""))
    checked = []
    for declaration, subset in zip(declarations, given):
        try:
            checked.append(declaration.from_dict(subset).to_dict())
        except ConfigError as exc:
            problems.extend(exc.problems)
    if problems:
        raise ConfigError(problems, what="pipeline parameter")
    arguments: Dict[str, Any] = {}
    for subset, values_checked in zip(given, checked):
        for name in subset:
            value = values_checked[name]
            arguments[name] = ", ".join(map(str, value)) if isinstance(value, list) else value
    return arguments


def kfp_cron(expression: str) -> str:
    """KFP wants 6 cron fields (seconds first); 5-field cron gets ``0`` seconds."""
    from kubeseg.errors import ConfigError

    fields = expression.split()
    if len(fields) == 5:
        return " ".join(["0", *fields])
    if len(fields) == 6:
        return " ".join(fields)
    raise ConfigError([f"--schedule {expression!r}: expected 5 cron fields (minute hour day "
                       "month weekday) or 6 (seconds first)"], what="option")


def check_server(host: str, token: Optional[str], timeout_s: float = 10.0) -> Optional[str]:
    """GET the API server's healthz once, with a clear error when it cannot be reached; returns
    the backend release it reports (``tag_name``; kubeflow/pipelines 2.14.0
    backend/src/apiserver/main.go), None when it reports none."""
    from kubeseg.errors import KubesegError
    from kubeseg.preflight.reads import kfp_healthz

    answer = kfp_healthz(host, token, timeout_s)
    if answer.status in (401, 403):
        raise KubesegError(f"the Kubeflow Pipelines API at {host} refused the request "
                           f"({answer.status}): give a valid token with --token or "
                           f"${TOKEN_ENV}")
    if answer.status is not None:
        raise KubesegError(f"the Kubeflow Pipelines API at {host} answered GET {HEALTHZ_PATH} "
                           f"with {answer.why()}: check --host (it must point at the "
                           "KFP API, e.g. http://localhost:8080 after 'kubectl port-forward "
                           "-n kubeflow svc/ml-pipeline-ui 8080:80')")
    if answer.obj is None:
        raise KubesegError(f"cannot reach the Kubeflow Pipelines API at {host} (GET "
                           f"{HEALTHZ_PATH}: {answer.why()}): check --host and that the server "
                           "is running, e.g. 'kubectl port-forward -n kubeflow "
                           "svc/ml-pipeline-ui 8080:80' then --host http://localhost:8080")
    reported = answer.obj.get("tag_name")
    return str(reported) if reported else None


def service_account_token() -> Optional[str]:
    path = Path(os.environ.get(SA_TOKEN_PATH_ENV, DEFAULT_SA_TOKEN_PATH))
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def read_parameters(uri: str) -> Dict[str, Any]:
    """The parameters YAML file at ``uri``, checked (:func:`pipeline_arguments`)."""
    import yaml

    from kubeseg import storage
    from kubeseg.errors import KubesegError

    try:
        values = yaml.safe_load(storage.read_text(uri)) or {}
    except yaml.YAMLError as exc:
        raise KubesegError(f"--parameters {uri} is not valid YAML: {exc}") from None
    return pipeline_arguments(values)


def gated_parameters(uri: str) -> Dict[str, Any]:
    """The parameters at ``uri`` (checked), refused unless the run is gated against the model
    it would replace: retraining that no person starts must never deploy a worse model. The
    gate compares with ``champion_uri`` (a default is declared) or ``previous_metrics_uri``."""
    from kubeseg.config import PipelineParameters
    from kubeseg.errors import ConfigError

    arguments = read_parameters(uri)
    champion = arguments.get("champion_uri", PipelineParameters().champion_uri)
    if not champion and not arguments.get("previous_metrics_uri"):
        raise ConfigError([f"--parameters {uri}: champion_uri is empty and "
                           "previous_metrics_uri is not set; retraining on an alert needs the "
                           "champion gate (a new model must beat the one it replaces): set "
                           "champion_uri, e.g. s3://kubeseg/models/champion"],
                          what="pipeline parameter")
    return arguments


def submit_retraining(options: SubmitOptions, request: Any,
                      dry_run: Optional[str] = None) -> str:
    """Submit one retraining run for a drift alert ``request``
    (:class:`kubeseg.monitoring.receiver.RetrainRequest`) with the parameters of
    ``options.parameters``, read again and checked now; with ``dry_run`` (a folder or s3://
    prefix) write the submission it would make to ``<dry_run>/<run name>.json`` instead.
    Returns what it did."""
    import json

    from kubeseg import storage

    arguments = gated_parameters(options.parameters)
    if dry_run:
        record = {"run_name": request.run_name, "experiment": options.experiment,
                  "namespace": options.namespace, "host": options.host,
                  "pipeline_file": options.pipeline_file or str(_pipeline_file(None)),
                  "arguments": arguments, "group_key": request.group_key,
                  "alerts": list(request.alerts), "labels": dict(request.labels),
                  "reason": request.reason}
        uri = storage.join(dry_run, f"{request.run_name}.json")
        storage.write_text(uri, json.dumps(record, indent=2, sort_keys=True))
        return f"dry run: submission written to {uri}"
    run_options = SubmitOptions(**{**options.__dict__, "run_name": request.run_name})
    return submit(run_options)


def _pipeline_file(given: Optional[str]) -> Path:
    from kubeseg_platform.pipelines.compile import compiled_pipeline_path

    return Path(given) if given else compiled_pipeline_path()


def submit(options: SubmitOptions) -> str:
    """Check the parameters, then create the run (or recurring run); returns what to print:
    the checked arguments as YAML with ``check_only``, else what was created."""
    import yaml

    from kubeseg.errors import KubesegError
    from kubeseg_platform.pipelines.compile import compiled_pipeline_path

    arguments = read_parameters(options.parameters)
    cron = kfp_cron(options.schedule) if options.schedule else None
    pipeline_file = options.pipeline_file or str(compiled_pipeline_path())
    if not Path(pipeline_file).is_file():
        raise KubesegError(f"--pipeline-file {pipeline_file}: no such file (run 'kubeseg "
                           "compile')")
    if options.check_only:
        return yaml.safe_dump(arguments, sort_keys=True).rstrip("\n")
    token = options.token or os.environ.get(TOKEN_ENV) or service_account_token()
    _check_backend(check_server(options.host, token), pipeline_file)
    try:
        return _create(options, arguments, pipeline_file, cron, token)
    except KubesegError:
        raise
    except Exception as exc:  # the API's exceptions carry the server's reason
        raise KubesegError(f"the Kubeflow Pipelines API at {options.host} rejected the "
                           f"submission: {exc}") from None


def _check_backend(tag_name: Optional[str], pipeline_file: str) -> None:
    """Refuse, naming the release needed, when the server is older than the compiled target."""
    import logging

    from kubeseg.errors import KubesegError
    from kubeseg_platform.pipelines.kfp_backend import (reported_version, required_backend_of_text,
                                       server_version_problem)

    needed = required_backend_of_text(Path(pipeline_file).read_text())
    version = reported_version(tag_name)
    if version is None:
        logging.getLogger(__name__).warning(
            "the Kubeflow Pipelines API does not report its release (tag_name %r); %s needs "
            "%s or newer", tag_name, pipeline_file, needed)
        return
    problem = server_version_problem(version, needed, pipeline_file)
    if problem:
        raise KubesegError(problem)


def _create(options: SubmitOptions, arguments: Mapping[str, Any], pipeline_file: str,
            cron: Optional[str], token: Optional[str]) -> str:
    import kfp

    client = kfp.Client(host=options.host, existing_token=token,
                        namespace=options.namespace or "kubeflow")
    name = options.run_name or f"kubeseg-{Path(options.parameters).stem}"
    if cron:
        experiment = client.create_experiment(options.experiment, namespace=options.namespace)
        job = client.create_recurring_run(
            experiment_id=experiment.experiment_id, job_name=name, cron_expression=cron,
            params=dict(arguments), pipeline_package_path=pipeline_file,
            service_account=options.service_account)
        return (f"recurring run {job.recurring_run_id} ({cron}) created in experiment "
                f"'{options.experiment}' on {options.host}")
    result = client.create_run_from_pipeline_package(
        pipeline_file, arguments=dict(arguments), run_name=name,
        experiment_name=options.experiment, namespace=options.namespace,
        service_account=options.service_account)
    return f"run {result.run_id} created in experiment '{options.experiment}' on {options.host}"


__all__ = ["SubmitOptions", "submit", "submit_retraining", "gated_parameters",
           "pipeline_arguments", "read_parameters", "kfp_cron", "check_server",
           "service_account_token"]
