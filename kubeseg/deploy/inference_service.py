"""A KServe InferenceService for a kubeseg model: built as a plain dict, applied with the client.

:func:`build_inference_service` is pure (no cluster, no kubernetes import): it returns the
``serving.kserve.io/v1beta1`` object, which ``kubeseg deploy --dry-run`` prints as YAML and the
tests validate against the InferenceService CRD schema. The predictor is a custom container
running ``kubeseg serve`` from the predictor image (images/predictor); the model URI goes to
KServe's storage initializer through the container's ``STORAGE_URI`` variable, which downloads
it to ``/mnt/models`` with the credentials of the service account (KServe's S3 secret
annotations) before the server starts. A storage Secret, when given, is also exposed to the
container as environment (``KUBESEG_S3_ENDPOINT``, ``AWS_ACCESS_KEY_ID``, ...), so the server
can read ``s3://`` URIs itself.

:func:`apply_inference_service` creates the object, or merge-patches it when it exists (with
explicit nulls for the optional fields it leaves out), and waits until KServe serves it
(:func:`rollout_pending`). A rollout that fails never takes the endpoint down: Knative routes
traffic only to revisions that became ready (a Deployment keeps its old pods until new ones
are ready), so the last ready revision keeps serving, and in Serverless (Knative) mode with
``canary_traffic_percent`` the previous revision keeps ``100 - percent`` of the traffic until
the canary is promoted (``canary_traffic_percent=100``). Nothing is ever deleted here.
:func:`serving_notes` says what the cluster must allow beyond the object (Knative's flags for
GPU placement).
"""
from __future__ import annotations

import copy
import json
import logging
import re
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from kubeseg import images, versions
from kubeseg.config import DEFAULT_PREDICTOR_SERVICE_ACCOUNT, value_problem
from kubeseg.deploy import cluster
from kubeseg.deploy.placement import place
from kubeseg.errors import ConfigError, DeploymentError
from kubeseg.serving.defaults import SERVING_POD_MEMORY

logger = logging.getLogger(__name__)

API_GROUP = "serving.kserve.io"
API_VERSION = "v1beta1"
PLURAL = "inferenceservices"
MODEL_MOUNT = "/mnt/models"  # where KServe's storage initializer puts STORAGE_URI
CONTAINER_NAME = "kserve-container"
HTTP_PORT = 8080

# KServe's deployment modes (serving.kserve.io/deploymentMode). KServe 0.15 knows Serverless and
# RawDeployment; 0.16 to 0.20 name them Knative and Standard and still take the old names
# (kserve/kserve v0.16.0..v0.20.0 pkg/constants/constants.go, LegacyServerless and
# LegacyRawDeployment), so kubeseg writes the old names, which every supported release reads.
DEPLOYMENT_MODE_ANNOTATION = "serving.kserve.io/deploymentMode"
SERVERLESS, RAW_DEPLOYMENT = "Serverless", "RawDeployment"
DEPLOYMENT_MODES = {"Serverless": SERVERLESS, "Knative": SERVERLESS,
                    "RawDeployment": RAW_DEPLOYMENT, "Standard": RAW_DEPLOYMENT}
# Predictor fields kubeseg writes for some deployments only. Applying is a JSON merge patch
# (RFC 7386), which keeps a field the patch leaves out: the patch names each absent one with
# null, which removes it (a GPU predictor redeployed on CPU must leave the GPU node pool).
OPTIONAL_PREDICTOR_FIELDS = ("nodeSelector", "tolerations", "serviceAccountName")

_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_QUANTITY = re.compile(r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|"
                       r"([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$")


@dataclass(frozen=True)
class ServingSpec:
    """What an InferenceService serves and how: the model, its image, resources and rollout.

    ``gpus > 0`` requests ``nvidia.com/gpu`` and schedules on the GPU node pool:
    ``node_selector`` (default ``{"kubeseg.io/node-pool": "gpu"}``) and ``tolerations``
    (default: tolerate the ``nvidia.com/gpu`` taint). ``service_account`` carries the storage
    credentials for KServe's storage initializer; ``storage_secret`` (a Secret with
    ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``KUBESEG_S3_ENDPOINT``) is also given to
    the server as environment. ``canary_traffic_percent`` sends that share of traffic to the
    new revision and keeps the rest on the previous one; KServe honours it in Serverless
    (Knative) mode only. ``deployment_mode``: Serverless (Knative) or RawDeployment (Standard),
    written as KServe's annotation; None leaves it to the cluster's default (Serverless in
    KServe's released configuration). ``image`` defaults to the configured predictor image for
    ``gpus`` (:mod:`kubeseg.images`: the CUDA build when ``gpus > 0``).
    """

    name: str
    model_uri: str
    namespace: str = "kubeflow-user"
    image: Optional[str] = None
    service_account: Optional[str] = DEFAULT_PREDICTOR_SERVICE_ACCOUNT
    storage_secret: Optional[str] = None
    cpu: str = "2"
    memory: str = SERVING_POD_MEMORY
    gpus: int = 0
    node_selector: Optional[Mapping[str, str]] = None
    tolerations: Optional[Sequence[Mapping[str, Any]]] = None
    min_replicas: int = 1
    max_replicas: int = 1
    canary_traffic_percent: int = 100
    deployment_mode: Optional[str] = None
    max_pixels: Optional[int] = None
    labels: Optional[Mapping[str, str]] = None
    annotations: Optional[Mapping[str, str]] = None

    def check(self) -> None:
        """Raise one ConfigError naming every bad setting."""
        name, namespace = self.name, self.namespace
        problems = []
        if not _DNS_LABEL.match(name or "") or len(name) > 45:
            problems.append(f"name={name!r}: must be a DNS label (lower-case letters, digits, "
                            "'-', starting with a letter) of at most 45 characters")
        if not _DNS_LABEL.match(namespace or "") or len(namespace) > 63:
            problems.append(f"namespace={namespace!r}: must be a DNS label")
        if not self.model_uri:
            problems.append("model_uri is empty: give the model artifact's s3:// URI")
        for label, value in (("cpu", self.cpu), ("memory", self.memory)):
            if not _QUANTITY.match(str(value)):
                problems.append(f"{label}={value!r}: not a Kubernetes quantity (e.g. '2', "
                                "'500m', '4Gi')")
        problems += self._replica_problems() + self._mode_problems()
        problems.append(value_problem("canary_traffic_percent", self.canary_traffic_percent))
        problems = [p for p in problems if p]
        if problems:
            raise ConfigError(problems, what="option")

    @property
    def mode(self) -> Optional[str]:
        """The deployment mode asked for, by its KServe 0.15 name; None: the cluster's."""
        return DEPLOYMENT_MODES.get(self.deployment_mode) if self.deployment_mode else None

    def _mode_problems(self) -> List[str]:
        if self.deployment_mode and self.mode is None:
            return [f"deployment_mode={self.deployment_mode!r}: one of "
                    f"{' | '.join(DEPLOYMENT_MODES)}"]
        if self.mode == RAW_DEPLOYMENT:
            return [canary_problem(self.canary_traffic_percent, self.deployment_mode)]
        return []

    def _replica_problems(self) -> List[str]:
        gpus, low, high = self.gpus, self.min_replicas, self.max_replicas
        problems = []
        if not isinstance(gpus, int) or gpus < 0:
            problems.append(f"gpus={gpus!r}: must be an integer >= 0")
        if not isinstance(low, int) or low < 0:
            problems.append(f"min_replicas={low!r}: must be an integer >= 0")
        if not isinstance(high, int) or high < max(1, low or 0):
            problems.append(f"max_replicas={high!r}: must be an integer >= max(1, "
                            f"min_replicas={low})")
        return problems


def canary_problem(percent: int, mode: str) -> Optional[str]:
    """Why a canary share cannot be honoured in ``mode``; None when it can (or is 100)."""
    if DEPLOYMENT_MODES.get(mode) != RAW_DEPLOYMENT or percent == 100:
        return None
    # kserve/kserve v0.15.0..v0.20.0: only the Knative reconciler
    # (pkg/controller/v1beta1/inferenceservice/reconcilers/knative/ksvc_reconciler.go) reads
    # canaryTrafficPercent; in raw mode the new pods replace the old ones, whatever it says.
    return (f"canary_traffic_percent={percent}: KServe splits traffic only in Serverless "
            f"(Knative) mode; in {mode} mode it would be ignored and the new model take all "
            "traffic. Deploy with canary_traffic_percent=100, or in Serverless mode")


def serving_notes(spec: ServingSpec) -> List[str]:
    """What the cluster must allow for ``spec`` to become Ready or behave as asked, beyond the
    object itself: said at render time, since the cluster would refuse or ignore it silently."""
    notes = []
    placed = spec.gpus or spec.node_selector or spec.tolerations
    if placed and spec.mode != RAW_DEPLOYMENT:
        unless = "" if spec.mode else (" (the default unless the cluster's KServe defaults to "
                                       "RawDeployment)")
        notes.append(
            f"Serverless (Knative) mode{unless}: Knative refuses a pod spec with nodeSelector "
            f"or tolerations unless the {versions.KNATIVE_FEATURES_NAMESPACE}/"
            f"{versions.KNATIVE_FEATURES_CONFIGMAP} ConfigMap sets "
            f"{versions.KNATIVE_NODE_SELECTOR_FLAG} and {versions.KNATIVE_TOLERATIONS_FLAG} to "
            "\"enabled\" (both disabled by default), so the predictor never becomes Ready. "
            f"Enable them once: {knative_flags_command()} (or deploy in RawDeployment mode)")
    if spec.canary_traffic_percent < 100 and spec.mode is None:
        notes.append(f"canary_traffic_percent={spec.canary_traffic_percent} is honoured in "
                     "Serverless (Knative) mode only; on a cluster whose KServe defaults to "
                     "RawDeployment (Standard) a redeployment is refused")
    return notes


def knative_flags_command() -> str:
    """The kubectl command enabling the Knative flags GPU serving needs."""
    data = {versions.KNATIVE_NODE_SELECTOR_FLAG: "enabled",
            versions.KNATIVE_TOLERATIONS_FLAG: "enabled"}
    patch = json.dumps({"data": data}, separators=(",", ":"))
    return (f"kubectl patch configmap {versions.KNATIVE_FEATURES_CONFIGMAP} -n "
            f"{versions.KNATIVE_FEATURES_NAMESPACE} --type merge -p '{patch}'")


def _container(spec: ServingSpec, image: str,
               resources: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    args = ["serve", MODEL_MOUNT, "--host", "0.0.0.0", "--port", str(HTTP_PORT),
            "--model-name", spec.name]
    if spec.max_pixels:
        args += ["--max-pixels", str(int(spec.max_pixels))]
    container: Dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": image,
        "imagePullPolicy": images.pull_policy(image),
        "command": ["kubeseg"],
        "args": args,
        "env": [{"name": "STORAGE_URI", "value": spec.model_uri}],
        "ports": [{"containerPort": HTTP_PORT, "name": "http1", "protocol": "TCP"}],
        # The port is required where KServe copies the probe into a Deployment (RawDeployment).
        "readinessProbe": {"httpGet": {"path": "/v2/health/ready", "port": HTTP_PORT},
                           "periodSeconds": 5},
        "resources": resources,
    }
    if spec.storage_secret:
        container["envFrom"] = [{"secretRef": {"name": spec.storage_secret}}]
    return container


def _metadata(spec: ServingSpec) -> Dict[str, Any]:
    metadata: Dict[str, Any] = {
        "name": spec.name,
        "namespace": spec.namespace,
        "labels": {"app.kubernetes.io/name": "kubeseg", "app.kubernetes.io/component": "predictor",
                   **dict(spec.labels or {})},
    }
    annotations = dict(spec.annotations or {})
    if spec.mode:
        annotations[DEPLOYMENT_MODE_ANNOTATION] = spec.mode
    if annotations:
        metadata["annotations"] = annotations
    return metadata


def build_inference_service(spec: ServingSpec) -> Dict[str, Any]:
    """The InferenceService object (a dict) serving the artifact at ``spec.model_uri``."""
    spec.check()
    image = spec.image or images.configured().predictor_for(spec.gpus)
    resources: Dict[str, Dict[str, Any]] = {
        "requests": {"cpu": str(spec.cpu), "memory": str(spec.memory)},
        "limits": {"cpu": str(spec.cpu), "memory": str(spec.memory)},
    }
    predictor: Dict[str, Any] = {
        "minReplicas": spec.min_replicas,
        "maxReplicas": spec.max_replicas,
        "containers": [_container(spec, image, resources)],
    }
    place(predictor, resources, spec.gpus, node_selector=spec.node_selector,
          tolerations=spec.tolerations)
    if spec.service_account:
        predictor["serviceAccountName"] = spec.service_account
    # Always written: applying is a merge patch, so an omitted field would keep the share of an
    # earlier canary; 100 sends all traffic to the new revision, which promotes it.
    predictor["canaryTrafficPercent"] = spec.canary_traffic_percent
    return {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": "InferenceService",
            "metadata": _metadata(spec), "spec": {"predictor": predictor}}


def _ready_condition(obj: Mapping[str, Any]) -> Optional[Mapping[str, Any]]:
    for condition in (obj.get("status") or {}).get("conditions") or []:
        if condition.get("type") == "Ready":
            return condition
    return None


def _condition_summary(obj: Mapping[str, Any]) -> str:
    parts: List[str] = []
    for condition in (obj.get("status") or {}).get("conditions") or []:
        if condition.get("status") != "True":
            text = condition.get("message") or condition.get("reason") or ""
            parts.append(f"{condition.get('type')}={condition.get('status')} {text}".strip())
    return "; ".join(parts) or "no status conditions reported yet"


def _identity(obj: Mapping[str, Any]) -> Tuple[str, str, str]:
    """(name, namespace, "InferenceService namespace/name") of the object."""
    name = obj["metadata"]["name"]
    namespace = obj["metadata"].get("namespace", "default")
    return name, namespace, f"InferenceService {namespace}/{name}"


def merge_patch_body(obj: Mapping[str, Any]) -> Dict[str, Any]:
    """The JSON merge patch (RFC 7386) that turns an existing InferenceService into ``obj``:
    ``obj`` itself, with null for each optional predictor field it leaves out, so that the
    field is removed instead of kept."""
    body = copy.deepcopy(dict(obj))
    predictor = body["spec"]["predictor"]
    for name in OPTIONAL_PREDICTOR_FIELDS:
        predictor.setdefault(name, None)
    return body


def live_mode(obj: Mapping[str, Any]) -> Optional[str]:
    """The deployment mode an existing InferenceService runs in, by its KServe 0.15 name: the
    annotation KServe's defaulting webhook writes (v0.15.0..v0.20.0
    pkg/apis/serving/v1beta1/inference_service_defaults.go), else status.deploymentMode
    (v0.16.0 and later)."""
    annotations = (obj.get("metadata") or {}).get("annotations") or {}
    mode = annotations.get(DEPLOYMENT_MODE_ANNOTATION) or \
        (obj.get("status") or {}).get("deploymentMode")
    return DEPLOYMENT_MODES.get(mode) if mode else None


def _create_or_patch(api, obj: Mapping[str, Any]) -> Tuple[Mapping[str, Any],
                                                           Optional[Mapping[str, Any]]]:
    """Create the object, or merge-patch it when it exists: (the API server's answer, the
    object as it was before, None when created)."""
    from kubernetes.client.rest import ApiException

    name, namespace, where = _identity(obj)
    try:
        try:
            before = api.get_namespaced_custom_object(API_GROUP, API_VERSION, namespace,
                                                      PLURAL, name)
        except ApiException as exc:
            if exc.status != 404:
                raise
            before = None
        if before is not None:
            problem = canary_problem(obj["spec"]["predictor"].get("canaryTrafficPercent", 100),
                                     live_mode(before) or "")
            if problem:
                raise DeploymentError(f"{where}: {problem}; nothing was changed")
            # the previous revision keeps serving until the new one is ready
            result = api.patch_namespaced_custom_object(API_GROUP, API_VERSION, namespace,
                                                        PLURAL, name, merge_patch_body(obj))
            logger.info("patched %s", where)
        else:
            result = api.create_namespaced_custom_object(API_GROUP, API_VERSION, namespace,
                                                         PLURAL, dict(obj))
            logger.info("created %s", where)
    except ApiException as exc:
        raise DeploymentError(f"{where}: the API server refused it ({exc.status} {exc.reason}): "
                              f"{(exc.body or '')[:500]}") from None
    return result, before


def _predictor_status(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    return ((obj.get("status") or {}).get("components") or {}).get("predictor") or {}


def rollout_pending(current: Mapping[str, Any],
                    before: Optional[Mapping[str, Any]] = None) -> Optional[str]:
    """What the InferenceService still waits for before it serves what was applied; None when
    it does. ``before``: the object as it was before an update that changed its spec.

    KServe's own readiness signals (kserve/kserve v0.15.0..v0.20.0
    pkg/apis/serving/v1beta1/inference_service_status.go): the Ready condition; in Serverless
    mode the predictor's latestCreatedRevision equal to its latestReadyRevision (the rule
    PropagateModelStatus uses for "Loaded"). status.observedGeneration is copied from the
    Knative Service or the Deployment (PropagateStatus, PropagateRawStatus), not the
    InferenceService's own generation; it only shows, like a new revision name, that KServe has
    acted on an update. Knative's conditions carry no observedGeneration.
    """
    ready = _ready_condition(current)
    if ready is None or ready.get("status") != "True":
        return f"Ready is not True ({_condition_summary(current)})"
    predictor = _predictor_status(current)
    created, serving = predictor.get("latestCreatedRevision"), predictor.get("latestReadyRevision")
    if created and created != serving:
        return f"revision {created} is not ready yet (traffic stays on {serving or 'none'})"
    if before is not None:
        old_status, old_predictor = before.get("status") or {}, _predictor_status(before)
        acted = (created != old_predictor.get("latestCreatedRevision")
                 or (current.get("status") or {}).get("observedGeneration")
                 != old_status.get("observedGeneration"))
        if not acted:
            return "KServe has not acted on the update yet"
    return None


def _wait_ready(api, obj: Mapping[str, Any], before: Optional[Mapping[str, Any]],
                timeout_s: float, poll_s: float) -> str:
    """Poll until the InferenceService serves what was applied (:func:`rollout_pending`); its
    URL."""
    name, namespace, where = _identity(obj)
    deadline = time.monotonic() + timeout_s
    while True:
        current = api.get_namespaced_custom_object(API_GROUP, API_VERSION, namespace, PLURAL,
                                                   name)
        pending = rollout_pending(current, before)
        if pending is None:
            status = current.get("status") or {}
            url = status.get("url") or (status.get("address") or {}).get("url", "")
            logger.info("%s is ready at %s", where, url)
            return url
        if time.monotonic() > deadline:
            raise DeploymentError(
                f"{where} did not become Ready within {timeout_s:.0f} s: {pending}. Nothing "
                f"was deleted: KServe keeps serving the last ready revision; inspect with "
                f"'kubectl describe isvc {name} -n {namespace}', fix, and deploy again")
        time.sleep(poll_s)


def apply_inference_service(obj: Mapping[str, Any], *, timeout_s: float = 600,
                            poll_s: float = 5.0, api_client=None) -> str:
    """Create (or update) the InferenceService, wait until it serves it, return its URL.

    Uses the kubeconfig (or the in-cluster service account) unless ``api_client`` is given.
    An update is a JSON merge patch (:func:`merge_patch_body`). A canary share below 100 on an
    InferenceService running in RawDeployment mode is refused before anything changes. On
    timeout raises :class:`DeploymentError` naming what is pending; the object is left as it
    is, and KServe keeps routing traffic to the last ready revision.
    """
    from kubernetes import client

    api = client.CustomObjectsApi(api_client if api_client is not None
                                  else cluster.api_client("deploy the InferenceService to"))
    result, before = _create_or_patch(api, obj)
    changed = before is not None and _generation(result) != _generation(before)
    return _wait_ready(api, obj, before if changed else None, timeout_s, poll_s)


def _generation(obj: Mapping[str, Any]) -> Optional[int]:
    return (obj.get("metadata") or {}).get("generation")


__all__ = ["API_GROUP", "API_VERSION", "PLURAL", "MODEL_MOUNT", "ServingSpec",
           "DeploymentError", "build_inference_service", "apply_inference_service",
           "DEPLOYMENT_MODES", "SERVERLESS", "RAW_DEPLOYMENT", "canary_problem",
           "serving_notes", "knative_flags_command", "merge_patch_body", "live_mode",
           "rollout_pending"]
