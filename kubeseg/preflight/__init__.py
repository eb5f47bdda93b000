"""``kubeseg preflight``: check a cluster before the first pipeline run, reading only.

One line per check (ok, warn or FAIL, what was found) and, short of ok, what to do:

- the Kubeflow Pipelines API and its version;
- Kubeflow Trainer v2 (TrainJob, the ``training_runtime`` ClusterTrainingRuntime) or the
  Training Operator (PyTorchJob), whichever ``training_operator`` names;
- KServe, its default deployment mode, and in Knative mode the flags GPU serving needs;
- Katib;
- the GPU node pool: label, taint, allocatable GPUs;
- the storage Secret, the keys and annotations KServe's storage initializer reads, the
  predictor's service account;
- the step account's permissions, one access review per action of kubeseg's Role;
- the S3 endpoint, listed with the Secret's credentials.

What must pass follows from the run's parameters (:class:`kubeseg.config.PipelineParameters`):
without GPU serving the Knative flags are a warn, without distributed training the Trainer is.
The checks are pure functions (:mod:`.platform`, :mod:`.nodes`, :mod:`.credentials`,
:mod:`.rbac`) over the objects :mod:`.reads` fetches.
"""
from __future__ import annotations

import os
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple

from kubeseg.config import PipelineParameters
from kubeseg.deploy.training_job import DISTRIBUTED, OPERATORS, TRAINER_V2, training_plan
from kubeseg.errors import ConfigError
from kubeseg.preflight import credentials, nodes, platform, rbac
from kubeseg.preflight.base import FAIL, OK, WARN, Check, Lookup, api_served
from kubeseg.preflight.reads import ClusterReader, kfp_healthz


@dataclass(frozen=True)
class PreflightOptions:
    """What ``kubeseg preflight`` was asked for (see its ``--help``)."""

    namespace: Optional[str] = None  # default: parameters.namespace
    kfp_host: Optional[str] = None  # default: the KFP Service through the API server
    kfp_token: Optional[str] = None
    s3_endpoint: Optional[str] = None  # default: the storage Secret's endpoint
    step_account: Optional[str] = None  # default: the account kubeseg's RoleBinding names
    manifests: Optional[str] = None  # default: the checkout's manifests/
    parameters: PipelineParameters = field(default_factory=PipelineParameters)

    @property
    def checked_namespace(self) -> str:
        return self.namespace or self.parameters.namespace


def _configmap(namespace: str, name: str) -> str:
    return f"/api/v1/namespaces/{namespace}/configmaps/{name}"


def _deployment(namespace: str, name: str) -> str:
    return f"/apis/apps/v1/namespaces/{namespace}/deployments/{name}"


def _kfp(reader: ClusterReader, options: PreflightOptions) -> Tuple[Check, Optional[bool]]:
    if options.kfp_host:
        where, healthz = options.kfp_host, kfp_healthz(options.kfp_host, options.kfp_token)
    else:
        where = f"service {platform.KFP_NAMESPACE}/{platform.KFP_SERVICE}"
        healthz = reader.get(f"/api/v1/namespaces/{platform.KFP_NAMESPACE}/services/"
                             f"{platform.KFP_SERVICE}/proxy{platform.KFP_HEALTHZ_PATH}")
    multi_user = bool(healthz.obj.get("multi_user")) if healthz.obj is not None else None
    return (platform.check_kfp(healthz, where, options.checked_namespace,
                               direct=bool(options.kfp_host)), multi_user)


def _training(reader: ClusterReader, params: PipelineParameters) -> List[Check]:
    distributed = training_plan(params.num_nodes, params.gpus_per_node) == DISTRIBUTED
    served = {op: api_served(platform.APIS[op], *reader.crd(platform.APIS[op]))
              for op in OPERATORS}
    public = Lookup()
    if served[TRAINER_V2][0]:
        public = reader.first([_configmap(n, platform.TRAINER_PUBLIC_CONFIGMAP)
                               for n in platform.TRAINER_NAMESPACES])
    checks = [platform.check_training(params.training_operator, distributed, served, public)]
    if params.training_operator == TRAINER_V2 and served[TRAINER_V2][0] is not False:
        api = platform.RUNTIME_API
        runtime = reader.get(f"/apis/{api.group}/{api.version}/{api.plural}/"
                             f"{params.training_runtime}")
        checks.append(platform.check_runtime(params.training_runtime, runtime, distributed))
    return checks


def _serving(reader: ClusterReader, params: PipelineParameters, config: Lookup) -> List[Check]:
    served = api_served(platform.APIS["kserve"], *reader.crd(platform.APIS["kserve"]))
    controller = reader.first([_deployment(n, platform.KSERVE_CONTROLLER)
                               for n in platform.KSERVE_NAMESPACES])
    checks = [platform.check_kserve(served, controller)]
    if served[0] is False:
        return checks
    mode_check, mode = platform.check_kserve_mode(config)
    features = Lookup()
    if mode not in (platform.STANDARD, platform.MODELMESH):
        features = reader.get(_configmap(platform.KNATIVE_NAMESPACE, platform.KNATIVE_FEATURES))
    return checks + [mode_check,
                     platform.check_knative_flags(mode, features, params.serving_gpus > 0)]


def _katib(reader: ClusterReader) -> Check:
    served = api_served(platform.APIS["katib"], *reader.crd(platform.APIS["katib"]))
    controller = Lookup()
    if served[0]:
        controller = reader.first([_deployment(n, platform.KATIB_CONTROLLER)
                                   for n in platform.KATIB_NAMESPACES])
    return platform.check_katib(served, controller)


def _storage(reader: ClusterReader, options: PreflightOptions, config: Lookup) -> List[Check]:
    namespace, params = options.checked_namespace, options.parameters
    secret = reader.get(f"/api/v1/namespaces/{namespace}/secrets/{credentials.SECRET}")
    account = reader.get(f"/api/v1/namespaces/{namespace}/serviceaccounts/"
                         f"{params.predictor_service_account}")
    checks = [credentials.check_storage_secret(secret, namespace),
              credentials.check_kserve_s3(secret, config, namespace),
              credentials.check_predictor_account(account, params.predictor_service_account,
                                                  namespace),
              credentials.check_s3_access(secret, params.output_root, options.s3_endpoint,
                                          in_cluster=bool(os.environ.get(
                                              "KUBERNETES_SERVICE_HOST")))]
    return [check for check in checks if check is not None]


def _reviews(options: PreflightOptions, overlay: str) -> Tuple[List[rbac.Access], str]:
    """The actions of kubeseg's Role and the step account, from kubeseg's manifests (a
    ConfigError when they cannot be read)."""
    folder = Path(options.manifests) if options.manifests else rbac.default_manifests_dir()
    if folder is None:
        raise ConfigError(["kubeseg's manifests/ folder was not found: give --manifests DIR "
                           "(the manifests/ folder of a kubeseg checkout)"], what="option")
    accesses = rbac.required_access(folder)
    account = options.step_account or rbac.step_accounts(folder).get(overlay)
    if not account:
        raise ConfigError([f"{folder}/components/{overlay}: no RoleBinding of kubeseg's Role "
                           "to a ServiceAccount; give --step-account"], what="manifest")
    return accesses, account


def _permissions(reader: ClusterReader, options: PreflightOptions,
                 multi_user: Optional[bool]) -> Check:
    """Access reviews for every action of kubeseg's Role, asked as the step account: the one
    the install's RoleBinding names (multi-user or standalone KFP), unless given."""
    namespace = options.checked_namespace
    if multi_user is None:
        multi_user = namespace != platform.KFP_NAMESPACE
    overlay = rbac.MULTI_USER if multi_user else rbac.STANDALONE
    try:
        accesses, account = _reviews(options, overlay)
    except ConfigError as exc:
        user = rbac.service_account_user(namespace, options.step_account) \
            if options.step_account else None
        return rbac.check_permissions(user, namespace, None, "; ".join(exc.problems), overlay)
    user = rbac.service_account_user(namespace, account)
    results, problem = reader.access_reviews(accesses, namespace, user)
    return rbac.check_permissions(user, namespace, results, problem, overlay)


def run_preflight(options: PreflightOptions, reader: ClusterReader) -> List[Check]:
    """Every check, in the order a person sets a cluster up; reads only."""
    kserve_config = reader.first([_configmap(n, platform.KSERVE_CONFIGMAP)
                                  for n in platform.KSERVE_NAMESPACES])
    kfp, multi_user = _kfp(reader, options)
    return [kfp,
            *_training(reader, options.parameters),
            *_serving(reader, options.parameters, kserve_config),
            _katib(reader),
            nodes.check_gpu_nodes(reader.get("/api/v1/nodes"),
                                  nodes.gpu_needs(options.parameters)),
            *_storage(reader, options, kserve_config),
            _permissions(reader, options, multi_user)]


def failures(checks: List[Check]) -> List[Check]:
    return [check for check in checks if check.status == FAIL]


def format_report(checks: List[Check], width: int = 100) -> str:
    """One line per check (wrapped at ``width``), its fix below it, and the counts."""
    name_width = max(len(check.name) for check in checks)
    indent = " " * (4 + 2 + name_width + 2)
    lines = []
    for check in checks:
        head = f"{check.status:<4}  {check.name:<{name_width}}  "
        lines.append(textwrap.fill(check.found, width, initial_indent=head,
                                   subsequent_indent=indent, break_on_hyphens=False))
        if check.fix and check.status != OK:
            lines.append(f"{indent}-> {check.fix}")
    counts = {status: sum(c.status == status for c in checks) for status in (OK, WARN, FAIL)}
    lines.append(f"{counts[OK]} ok, {counts[WARN]} warn, {counts[FAIL]} FAIL")
    return "\n".join(lines)


def read_parameters(uri: str) -> PipelineParameters:
    """The pipeline parameters of a parameters YAML file (the one ``kubeseg submit`` sends);
    hyperparameters in it are skipped, unknown names are an error."""
    import difflib

    import yaml

    from kubeseg import storage
    from kubeseg.config import Hyperparameters

    try:
        values = yaml.safe_load(storage.read_text(uri)) or {}
    except yaml.YAMLError as exc:
        raise ConfigError([f"{uri}: not YAML ({exc})"], what="parameter") from None
    if not isinstance(values, dict):
        raise ConfigError([f"{uri}: must hold a mapping of name: value"], what="parameter")
    ours, known = PipelineParameters.specs(), {**Hyperparameters.specs(),
                                               **PipelineParameters.specs()}
    unknown = []
    for name in values:
        if name not in known:
            close = difflib.get_close_matches(str(name), list(known), n=1)
            unknown.append(f"unknown pipeline parameter '{name}'"
                           + (f"; did you mean '{close[0]}'?" if close else ""))
    if unknown:
        raise ConfigError(unknown, what="pipeline parameter")
    return PipelineParameters.from_dict({k: v for k, v in values.items() if k in ours})


__all__ = ["Check", "ClusterReader", "PreflightOptions", "failures", "format_report",
           "read_parameters", "run_preflight", "OK", "WARN", "FAIL"]
