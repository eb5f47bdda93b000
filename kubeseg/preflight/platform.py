"""Checks of the Kubeflow parts kubeseg runs on: Kubeflow Pipelines, Kubeflow Trainer (or the
Training Operator), KServe with its deployment mode and Knative flags, and Katib.

Pure functions over the objects the API server returns (see :mod:`kubeseg.preflight.base`).
The custom resources are those kubeseg's builders write; the names, keys and rules of the
upstream controllers are encoded below with the source they come from.
"""
from __future__ import annotations

import json
from typing import Any, Mapping, Optional, Sequence, Tuple

from kubeseg import versions
from kubeseg.pipeline_auth import HEALTHZ_PATH
from kubeseg.deploy import inference_service
from kubeseg.deploy.training_job import CONTAINER_NAMES, KINDS, PYTORCHJOB, TRAINER_V2
from kubeseg.preflight.base import (FAIL, OK, WARN, Api, Check, Lookup, image_version,
                                    parse_version, show, supported, unreadable, version_range)
from kubeseg.tuning import katib


def _job_api(operator: str) -> Api:
    kind = KINDS[operator]
    return Api(kind.kind, kind.group, kind.version, kind.plural, kind.what_to_install)


TRAINJOB_API = _job_api(TRAINER_V2)
PYTORCHJOB_API = _job_api(PYTORCHJOB)
INFERENCE_SERVICE_API = Api("InferenceService", inference_service.API_GROUP,
                            inference_service.API_VERSION, inference_service.PLURAL, "KServe")
EXPERIMENT_API = Api(katib.KIND, katib.API_GROUP, katib.API_VERSION, katib.PLURAL, "Katib")
APIS = {TRAINER_V2: TRAINJOB_API, PYTORCHJOB: PYTORCHJOB_API,
        "kserve": INFERENCE_SERVICE_API, "katib": EXPERIMENT_API}
# The runtime a TrainJob's runtimeRef names (cluster-scoped; same group and version).
RUNTIME_API = Api("ClusterTrainingRuntime", TRAINJOB_API.group, TRAINJOB_API.version,
                  "clustertrainingruntimes", TRAINJOB_API.install)

# -- Kubeflow Pipelines ---------------------------------------------------------------------------
# GET /apis/v2beta1/healthz answers {"commit_sha", "tag_name", "multi_user", ...}
# (kubeflow/pipelines, backend/src/apiserver/main.go, 2.5.0 to 2.17.0); tag_name is the release
# ("2.5.0"), or "unknown" for an image built without one (backend/Dockerfile, ARG TAG_NAME).
KFP_HEALTHZ_PATH = HEALTHZ_PATH
# Its API Service (manifests/kustomize/base/pipeline/ml-pipeline-apiserver-service.yaml), in
# the namespace where standalone KFP also runs the steps; multi-user KFP runs them in profiles.
KFP_NAMESPACE = "kubeflow"
KFP_SERVICE = "ml-pipeline:8888"
PORT_FORWARD = "kubectl port-forward -n kubeflow svc/ml-pipeline-ui 8080:80"


def check_kfp(healthz: Lookup, where: str, namespace: str, *, direct: bool) -> Check:
    """The KFP API server answered (``direct``: at the URL the user gave) with a version at or
    above :data:`kubeseg.versions.KFP_BACKEND_LOWEST`, in the mode the namespace implies."""
    name, lowest = "KFP API", parse_version(versions.KFP_BACKEND_LOWEST)
    if healthz.obj is None:
        return _kfp_unreachable(healthz, where, direct)
    tag = healthz.obj.get("tag_name")
    multi_user = bool(healthz.obj.get("multi_user"))
    mode = "multi-user" if multi_user else "standalone"
    version = parse_version(tag)
    if version is None:
        return Check(name, WARN, f"Kubeflow Pipelines at {where} ({mode}) does not report its "
                                 f"version (tag_name {tag!r})",
                     f"make sure the backend is {versions.KFP_BACKEND_LOWEST} or newer")
    text = f"Kubeflow Pipelines {show(version)} ({mode}) at {where}"
    if version < lowest:
        return Check(name, FAIL, f"{text}: older than {versions.KFP_BACKEND_LOWEST}",
                     f"upgrade Kubeflow Pipelines to {versions.KFP_BACKEND_LOWEST} or newer")
    if multi_user == (namespace == KFP_NAMESPACE):
        expected = "a profile namespace" if multi_user else KFP_NAMESPACE
        return Check(name, WARN, f"{text}; its steps run in {expected}, the namespace checked "
                                 f"is {namespace}",
                     "rerun with --namespace set to where the steps run")
    return Check(name, OK, text)


def _kfp_unreachable(healthz: Lookup, where: str, direct: bool) -> Check:
    if not direct:
        return Check("KFP API", WARN, f"not reached through the API server ({where}: "
                                      f"{healthz.why()})",
                     f"{PORT_FORWARD}, then rerun with --kfp-host http://localhost:8080")
    if healthz.status in (401, 403):
        return Check("KFP API", FAIL, f"{where} refused the request ({healthz.why()})",
                     "give a valid token with --kfp-token or $KF_PIPELINES_TOKEN")
    return Check("KFP API", FAIL, f"no answer from {where}{KFP_HEALTHZ_PATH} "
                                  f"({healthz.why()})",
                 f"check --kfp-host: the KFP API, e.g. http://localhost:8080 after {PORT_FORWARD}")


# -- distributed training -----------------------------------------------------------------------
# Kubeflow Trainer publishes its version to every authenticated user in a ConfigMap of its own
# namespace (kubeflow/trainer v2.2.0 and v2.3.0: manifests/overlays/manager/kustomization.yaml,
# manifests/base/rbac/public_configmap_role_binding.yaml); kubeflow-system when installed alone,
# kubeflow in the Kubeflow platform (manifests/overlays/kubeflow-platform).
TRAINER_PUBLIC_CONFIGMAP = "kubeflow-trainer-public"
TRAINER_VERSION_KEY = "kubeflow_trainer_version"
TRAINER_NAMESPACES = ("kubeflow-system", "kubeflow")
# The runtime's job that runs TrainJob.spec.trainer carries this label (kubeflow/trainer v2.2.0,
# pkg/constants/constants.go: LabelTrainJobAncestor, AncestorTrainer).
ANCESTOR_LABEL, ANCESTOR_TRAINER = "trainer.kubeflow.org/trainjob-ancestor-step", "trainer"
RUNTIMES_INSTALL = ("kubectl apply --server-side -k \"https://github.com/kubeflow/trainer.git/"
                    "manifests/overlays/runtimes?ref=v{}.0\"")

Served = Tuple[Optional[bool], str]  # what base.api_served returns


def _only_distributed(distributed: bool) -> str:
    return "" if distributed else " (needed only for num_nodes > 1 or gpus_per_node > 1)"


def check_training(operator: str, distributed: bool, served: Mapping[str, Served],
                   trainer_public: Lookup) -> Check:
    """The job kind of ``training_operator`` is served; for Trainer v2, a supported version."""
    name, bad = "training jobs", FAIL if distributed else WARN
    is_served, text = served[operator]
    if not is_served:
        text += _only_distributed(distributed)
    if is_served is None:
        return Check(name, WARN, text, f"ask a cluster admin whether {APIS[operator]} is "
                                       f"installed ({APIS[operator].install})")
    if not is_served:
        other = PYTORCHJOB if operator == TRAINER_V2 else TRAINER_V2
        fix = f"install {APIS[operator].install}"
        if served[other][0]:
            fix += f", or set training_operator={other} ({served[other][1]})"
        return Check(name, bad, text, fix)
    if operator == PYTORCHJOB:
        return Check(name, OK, f"{text}; kubeseg supports Training Operator "
                               f"{versions.TRAINING_OPERATOR_VERSION}")
    return _trainer_version(text, trainer_public, bad)


def _trainer_version(text: str, public: Lookup, bad: str) -> Check:
    name, minors = "training jobs", versions.TRAINER_VERSIONS
    raw = ((public.obj or {}).get("data") or {}).get(TRAINER_VERSION_KEY)
    version = parse_version(raw)
    if version is None:
        where = unreadable(public, f"ConfigMap {TRAINER_PUBLIC_CONFIGMAP}") if public.obj is None \
            else f"{TRAINER_VERSION_KEY}={raw!r}"
        return Check(name, OK, f"{text}; Trainer version not visible ({where})")
    text = f"Kubeflow Trainer {show(version)}: {text}"
    if version < parse_version(minors[0]):
        return Check(name, bad, f"{text}; kubeseg's TrainJob needs {minors[0]} or newer "
                                "(runtimePatches)",
                     f"upgrade Kubeflow Trainer to {minors[-1]}, or set "
                     f"training_operator={PYTORCHJOB} on Training Operator "
                     f"{versions.TRAINING_OPERATOR_VERSION}")
    if not supported(version, minors):
        return Check(name, WARN, f"{text}; kubeseg was checked against {version_range(minors)}",
                     "watch the first distributed run")
    return Check(name, OK, text)


def runtime_problems(runtime: Mapping[str, Any]) -> Sequence[str]:
    """Why a ClusterTrainingRuntime cannot run kubeseg's TrainJob (empty: it can): torchrun's
    settings come from its torch policy, and kubeseg's runtimePatches and trainer settings go
    to the replicated job and container named ``node`` that runs the trainer step."""
    spec, node = runtime.get("spec") or {}, CONTAINER_NAMES[TRAINER_V2]
    problems = []
    if (spec.get("mlPolicy") or {}).get("torch") is None:
        problems.append("no torch policy (spec.mlPolicy.torch), so no torchrun settings")
    jobs = ((spec.get("template") or {}).get("spec") or {}).get("replicatedJobs") or []
    job = next((j for j in jobs if j.get("name") == node), None)
    if job is None:
        return problems + [f"no replicated job {node!r}, the one kubeseg's runtimePatches change"]
    template = (job.get("template") or {})
    labels = (template.get("metadata") or {}).get("labels") or {}
    if labels.get(ANCESTOR_LABEL) != ANCESTOR_TRAINER:
        problems.append(f"replicated job {node!r} is not the trainer step (label "
                        f"{ANCESTOR_LABEL}: {ANCESTOR_TRAINER})")
    pod = (((template.get("spec") or {}).get("template") or {}).get("spec") or {})
    if not any(c.get("name") == node for c in pod.get("containers") or []):
        problems.append(f"replicated job {node!r} has no container {node!r}")
    return problems


def check_runtime(name: str, runtime: Lookup, distributed: bool) -> Check:
    """The ClusterTrainingRuntime ``name`` (``training_runtime``) exists and fits."""
    title, bad = "training runtime", FAIL if distributed else WARN
    what = f"ClusterTrainingRuntime {name}"
    install = RUNTIMES_INSTALL.format(versions.TRAINER_VERSIONS[-1])
    if runtime.absent:
        return Check(title, bad, f"no {what}{_only_distributed(distributed)}",
                     f"install Kubeflow Trainer's runtimes ({install}), or set "
                     "training_runtime to one that exists")
    if runtime.obj is None:
        return Check(title, WARN, unreadable(runtime, what),
                     f"ask a cluster admin: kubectl get clustertrainingruntime {name}")
    problems = runtime_problems(runtime.obj)
    if problems:
        return Check(title, bad, f"{what}: " + "; ".join(problems),
                     f"set training_runtime to a PyTorch runtime like Kubeflow Trainer's "
                     f"torch-distributed ({install})")
    return Check(title, OK, f"{what}: torch policy, trainer step "
                            f"{CONTAINER_NAMES[TRAINER_V2]!r}")


def _controller_version(name: str, text: str, controller: Lookup, product: str,
                        minors: Sequence[str]) -> Check:
    """An ok line naming the controller's version where its Deployment can be read, a warn when
    that version is not one kubeseg was checked against."""
    version = image_version(controller.obj) if controller.obj is not None else None
    if version is None:
        where = unreadable(controller, "its controller Deployment") if controller.obj is None \
            else "no version in its controller's image tag"
        return Check(name, OK, f"{text}; {product} version not visible ({where})")
    text = f"{product} {show(version)}: {text}"
    if not supported(version, minors):
        return Check(name, WARN, f"{text}; kubeseg supports {version_range(minors)}",
                     f"use {product} {version_range(minors)}")
    return Check(name, OK, text)


# -- KServe -----------------------------------------------------------------------------------
# The controller Deployment and its ConfigMap (kserve/kserve v0.15.0-v0.20.0:
# config/manager/manager.yaml, config/configmap/inferenceservice.yaml; namespace kserve, or
# kubeflow where the Kubeflow platform installs it).
KSERVE_CONTROLLER = "kserve-controller-manager"
KSERVE_NAMESPACES = ("kserve", "kubeflow")
KSERVE_CONFIGMAP = "inferenceservice-config"
# defaultDeploymentMode of the `deploy` key (pkg/apis/serving/v1beta1/configmap.go,
# NewDeployConfig): v0.15 knows Serverless, RawDeployment and ModelMesh; v0.16 and later name
# the first two Knative and Standard and read the old names as those.
KNATIVE, STANDARD, MODELMESH = "Knative", "Standard", "ModelMesh"
DEPLOYMENT_MODES = {"Serverless": KNATIVE, "Knative": KNATIVE, "RawDeployment": STANDARD,
                    "Standard": STANDARD, "ModelMesh": MODELMESH}


def check_kserve(served: Served, controller: Lookup) -> Check:
    """The InferenceService API is served (the deploy step creates one)."""
    is_served, text = served
    if is_served is None:
        return Check("KServe", WARN, text, "ask a cluster admin whether KServe is installed")
    if not is_served:
        return Check("KServe", FAIL, text, f"install {INFERENCE_SERVICE_API.install} "
                                           f"{version_range(versions.KSERVE_VERSIONS)}")
    return _controller_version("KServe", text, controller, "KServe", versions.KSERVE_VERSIONS)


def deployment_mode(config: Mapping[str, Any]) -> Tuple[Optional[str], str]:
    """(Knative, Standard, ModelMesh or None, what the ``deploy`` key says) of an
    ``inferenceservice-config`` ConfigMap, as the KServe controller reads it."""
    raw = (config.get("data") or {}).get("deploy")
    if raw is None:
        return None, "no `deploy` key"
    try:
        mode = json.loads(raw).get("defaultDeploymentMode")
    except (ValueError, AttributeError) as exc:
        return None, f"`deploy` is not a JSON object ({exc})"
    if mode not in DEPLOYMENT_MODES:
        return None, f"defaultDeploymentMode {mode!r} is none of {', '.join(DEPLOYMENT_MODES)}"
    same = "" if DEPLOYMENT_MODES[mode] == mode else f" ({mode})"
    return DEPLOYMENT_MODES[mode], f"default deployment mode {DEPLOYMENT_MODES[mode]}{same}"


def check_kserve_mode(config: Lookup) -> Tuple[Check, Optional[str]]:
    """The default deployment mode of InferenceServices, and that mode (None: unknown)."""
    name, where = "KServe mode", f"ConfigMap {KSERVE_CONFIGMAP}"
    if config.obj is None:
        fix = "" if config.absent else (f"ask a cluster admin: kubectl get configmap "
                                        f"{KSERVE_CONFIGMAP} -n kserve "
                                        "-o jsonpath='{.data.deploy}'")
        return Check(name, WARN, unreadable(config, where) if not config.absent
                     else f"no {where} in {', '.join(KSERVE_NAMESPACES)}", fix), None
    mode, text = deployment_mode(config.obj)
    if mode is None:
        return Check(name, FAIL, f"{where}: {text}",
                     'set deploy to {"defaultDeploymentMode": "Knative"} or "Standard"'), None
    return Check(name, OK, text), mode


# -- Knative --------------------------------------------------------------------------------------
# In Knative mode a predictor's nodeSelector and tolerations are kept only when these features
# are not Disabled, which they are by default (knative/serving knative-v1.15.2 to v1.22.0:
# pkg/apis/config/features.go; pkg/apis/serving/fieldmask.go). Values match Enabled, Allowed or
# Disabled in any case; anything else leaves the default.
KNATIVE_NAMESPACE = versions.KNATIVE_FEATURES_NAMESPACE
KNATIVE_FEATURES = versions.KNATIVE_FEATURES_CONFIGMAP
GPU_SERVING_FLAGS = (versions.KNATIVE_NODE_SELECTOR_FLAG, versions.KNATIVE_TOLERATIONS_FLAG)
FLAG_VALUES = ("enabled", "allowed", "disabled")


def knative_flag(data: Mapping[str, Any], key: str) -> Tuple[str, bool]:
    """(enabled / allowed / disabled, whether the ConfigMap sets it) as Knative reads it."""
    raw = str(data.get(key, "")).strip().lower()
    return (raw, True) if raw in FLAG_VALUES else ("disabled", False)


def gpu_serving_fix() -> str:
    data = ",".join(f'"{flag}":"enabled"' for flag in GPU_SERVING_FLAGS)
    return (f"kubectl patch configmap {KNATIVE_FEATURES} -n {KNATIVE_NAMESPACE} --type merge "
            f"-p '{{\"data\":{{{data}}}}}'")


def check_knative_flags(mode: Optional[str], features: Lookup, gpu_serving: bool) -> Check:
    """In Knative mode, the flags GPU serving needs (FAIL when ``gpu_serving`` asks for it)."""
    name, where = "Knative flags", f"ConfigMap {KNATIVE_NAMESPACE}/{KNATIVE_FEATURES}"
    if mode in (STANDARD, MODELMESH):
        return Check(name, OK, f"not needed: KServe runs InferenceServices in {mode} mode")
    if features.obj is None:
        if features.absent and mode == KNATIVE:
            return Check(name, FAIL, f"no {where}: Knative Serving is not installed, and "
                                     "KServe's default mode needs it",
                         "install Knative Serving, or set KServe's defaultDeploymentMode to "
                         "Standard")
        return Check(name, WARN, unreadable(features, where) if not features.absent
                     else f"no {where}", f"GPU serving in Knative mode needs "
                                         f"{' and '.join(GPU_SERVING_FLAGS)} enabled")
    data = features.obj.get("data") or {}
    states = {flag: knative_flag(data, flag) for flag in GPU_SERVING_FLAGS}
    shown = ", ".join(f"{flag} {value}" + ("" if set_ else " (default)")
                      for flag, (value, set_) in states.items())
    if any(value == "disabled" for value, _ in states.values()):
        return Check(name, FAIL if gpu_serving else WARN,
                     f"{shown}: Knative drops a GPU predictor's nodeSelector and tolerations, "
                     "so GPU serving never becomes Ready" + ("" if gpu_serving else
                                                              " (CPU serving is not affected)"),
                     gpu_serving_fix())
    return Check(name, OK, shown)


# -- Katib ----------------------------------------------------------------------------------------
# kubeflow/katib v0.17.0, v0.18.0: manifests/v1beta1/components/controller/controller.yaml.
KATIB_CONTROLLER = "katib-controller"
KATIB_NAMESPACES = ("kubeflow",)


def check_katib(served: Served, controller: Lookup) -> Check:
    """The Experiment API is served (only ``kubeseg tune`` needs it, so a warn at most)."""
    is_served, text = served
    if is_served is None:
        return Check("Katib", WARN, text, "ask a cluster admin whether Katib is installed")
    if not is_served:
        return Check("Katib", WARN, f"{text} (needed only for kubeseg tune)",
                     f"install Katib {version_range(versions.KATIB_VERSIONS)} to tune on the "
                     "cluster; kubeseg tune --local needs nothing")
    return _controller_version("Katib", text, controller, "Katib", versions.KATIB_VERSIONS)


__all__ = ["APIS", "RUNTIME_API", "check_kfp", "check_training", "check_runtime", "check_kserve",
           "check_kserve_mode", "check_knative_flags", "check_katib", "deployment_mode",
           "knative_flag", "runtime_problems", "KFP_HEALTHZ_PATH", "KFP_NAMESPACE", "KFP_SERVICE",
           "TRAINER_PUBLIC_CONFIGMAP", "TRAINER_NAMESPACES", "KSERVE_CONTROLLER",
           "KSERVE_NAMESPACES", "KSERVE_CONFIGMAP", "KNATIVE_NAMESPACE", "KNATIVE_FEATURES",
           "KATIB_CONTROLLER", "KATIB_NAMESPACES", "GPU_SERVING_FLAGS"]
