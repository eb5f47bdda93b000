"""``kubeseg submit``: create a run (or a recurring run) of the compiled pipeline on a Kubeflow
Pipelines API server, from a parameters YAML file checked before anything is sent."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

from kubeseg.pipeline_auth import DEFAULT_SA_TOKEN_PATH, SA_TOKEN_PATH_ENV, TOKEN_ENV

HEALTHZ_PATH = "/apis/v2beta1/healthz"


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


def check_server(host: str, token: Optional[str], timeout_s: float = 10.0) -> None:
    """GET the API server's healthz once, with a clear error when it cannot be reached."""
    import urllib.error
    import urllib.request

    from kubeseg.errors import KubesegError

    url = host.rstrip("/") + HEALTHZ_PATH
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            response.read()
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            raise KubesegError(f"the Kubeflow Pipelines API at {host} refused the request "
                               f"({exc.code}): give a valid token with --token or "
                               f"${TOKEN_ENV}") from None
        raise KubesegError(f"the Kubeflow Pipelines API at {host} answered GET {HEALTHZ_PATH} "
                           f"with {exc.code} {exc.reason}: check --host (it must point at the "
                           "KFP API, e.g. http://localhost:8080 after 'kubectl port-forward "
                           "-n kubeflow svc/ml-pipeline-ui 8080:80')") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise KubesegError(f"cannot reach the Kubeflow Pipelines API at {host} (GET "
                           f"{HEALTHZ_PATH}: {reason}): check --host and that the server is "
                           "running, e.g. 'kubectl port-forward -n kubeflow "
                           "svc/ml-pipeline-ui 8080:80' then --host http://localhost:8080") \
            from None


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


def submit(options: SubmitOptions) -> str:
    """Check the parameters, then create the run (or recurring run); returns what to print:
    the checked arguments as YAML with ``check_only``, else what was created."""
    import yaml

    from kubeseg.errors import KubesegError
    from pipelines.compile import compiled_pipeline_path

    arguments = read_parameters(options.parameters)
    cron = kfp_cron(options.schedule) if options.schedule else None
    pipeline_file = options.pipeline_file or str(compiled_pipeline_path())
    if not Path(pipeline_file).is_file():
        raise KubesegError(f"--pipeline-file {pipeline_file}: no such file (run 'kubeseg "
                           "compile')")
    if options.check_only:
        return yaml.safe_dump(arguments, sort_keys=True).rstrip("\n")
    token = options.token or os.environ.get(TOKEN_ENV) or service_account_token()
    check_server(options.host, token)
    try:
        return _create(options, arguments, pipeline_file, cron, token)
    except KubesegError:
        raise
    except Exception as exc:  # the API's exceptions carry the server's reason
        raise KubesegError(f"the Kubeflow Pipelines API at {options.host} rejected the "
                           f"submission: {exc}") from None


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


__all__ = ["SubmitOptions", "submit", "pipeline_arguments", "read_parameters", "kfp_cron",
           "check_server", "service_account_token"]
