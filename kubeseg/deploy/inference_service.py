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

:func:`apply_inference_service` creates the object, or patches it when it exists, and waits
until KServe reports the new generation Ready. A rollout that fails never takes the endpoint
down: KServe (Knative) routes traffic only to revisions that became ready, so the last ready
revision keeps serving, and with ``canary_traffic_percent`` the previous revision keeps
``100 - percent`` of the traffic until the canary is promoted (``canary_traffic_percent=100``
or removed). Nothing is ever deleted here.
"""
from __future__ import annotations

import logging
import re
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence

from kubeseg import images
from kubeseg.config import value_problem
from kubeseg.deploy.placement import place
from kubeseg.errors import ConfigError, DeploymentError

logger = logging.getLogger(__name__)

API_GROUP = "serving.kserve.io"
API_VERSION = "v1beta1"
PLURAL = "inferenceservices"
MODEL_MOUNT = "/mnt/models"  # where KServe's storage initializer puts STORAGE_URI
CONTAINER_NAME = "kserve-container"
HTTP_PORT = 8080

_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_QUANTITY = re.compile(r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|"
                       r"([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$")


def _check_arguments(name, namespace, model_uri, cpu, memory, gpus, min_replicas, max_replicas,
                     canary_traffic_percent) -> None:
    problems = []
    if not _DNS_LABEL.match(name or "") or len(name) > 45:
        problems.append(f"name={name!r}: must be a DNS label (lower-case letters, digits, '-', "
                        "starting with a letter) of at most 45 characters")
    if not _DNS_LABEL.match(namespace or "") or len(namespace) > 63:
        problems.append(f"namespace={namespace!r}: must be a DNS label")
    if not model_uri:
        problems.append("model_uri is empty: give the model artifact's s3:// URI")
    for label, value in (("cpu", cpu), ("memory", memory)):
        if not _QUANTITY.match(str(value)):
            problems.append(f"{label}={value!r}: not a Kubernetes quantity (e.g. '2', '500m', "
                            "'4Gi')")
    if not isinstance(gpus, int) or gpus < 0:
        problems.append(f"gpus={gpus!r}: must be an integer >= 0")
    if not isinstance(min_replicas, int) or min_replicas < 0:
        problems.append(f"min_replicas={min_replicas!r}: must be an integer >= 0")
    if not isinstance(max_replicas, int) or max_replicas < max(1, min_replicas or 0):
        problems.append(f"max_replicas={max_replicas!r}: must be an integer >= max(1, "
                        f"min_replicas={min_replicas})")
    problems.append(value_problem("canary_traffic_percent", canary_traffic_percent))
    problems = [p for p in problems if p]
    if problems:
        raise ConfigError(problems, what="option")


def build_inference_service(
        name: str, model_uri: str, *, namespace: str = "kubeflow-user",
        image: Optional[str] = None, service_account: Optional[str] = None,
        storage_secret: Optional[str] = None, cpu: str = "2", memory: str = "4Gi",
        gpus: int = 0, node_selector: Optional[Mapping[str, str]] = None,
        tolerations: Optional[Sequence[Mapping[str, Any]]] = None,
        min_replicas: int = 1, max_replicas: int = 1,
        canary_traffic_percent: int = 100, max_pixels: Optional[int] = None,
        labels: Optional[Mapping[str, str]] = None,
        annotations: Optional[Mapping[str, str]] = None) -> Dict[str, Any]:
    """The InferenceService object (a dict) serving the artifact at ``model_uri``.

    ``gpus > 0`` requests ``nvidia.com/gpu`` and schedules on the GPU node pool:
    ``node_selector`` (default ``{"kubeseg.io/node-pool": "gpu"}``) and ``tolerations``
    (default: tolerate the ``nvidia.com/gpu`` taint). ``service_account`` carries the storage
    credentials for KServe's storage initializer; ``storage_secret`` (a Secret with
    ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``KUBESEG_S3_ENDPOINT``) is also given to
    the server as environment. ``canary_traffic_percent`` sends that share of traffic to the
    new revision and keeps the rest on the previous one. ``image`` defaults to the configured
    predictor image for ``gpus`` (:mod:`kubeseg.images`: the CUDA build when ``gpus > 0``).
    """
    _check_arguments(name, namespace, model_uri, cpu, memory, gpus, min_replicas, max_replicas,
                     canary_traffic_percent)
    image = image or images.configured().predictor_for(gpus)
    resources: Dict[str, Dict[str, Any]] = {
        "requests": {"cpu": str(cpu), "memory": str(memory)},
        "limits": {"cpu": str(cpu), "memory": str(memory)},
    }
    args = ["serve", MODEL_MOUNT, "--host", "0.0.0.0", "--port", str(HTTP_PORT),
            "--model-name", name]
    if max_pixels:
        args += ["--max-pixels", str(int(max_pixels))]
    container: Dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": image,
        "imagePullPolicy": images.pull_policy(image),
        "command": ["kubeseg"],
        "args": args,
        "env": [{"name": "STORAGE_URI", "value": model_uri}],
        "ports": [{"containerPort": HTTP_PORT, "name": "http1", "protocol": "TCP"}],
        # The port is required where KServe copies the probe into a Deployment (RawDeployment).
        "readinessProbe": {"httpGet": {"path": "/v2/health/ready", "port": HTTP_PORT},
                           "periodSeconds": 5},
        "resources": resources,
    }
    if storage_secret:
        container["envFrom"] = [{"secretRef": {"name": storage_secret}}]
    predictor: Dict[str, Any] = {
        "minReplicas": min_replicas,
        "maxReplicas": max_replicas,
        "containers": [container],
    }
    place(predictor, resources, gpus, node_selector=node_selector, tolerations=tolerations)
    if service_account:
        predictor["serviceAccountName"] = service_account
    # Always written: applying is a merge patch, so an omitted field would keep the share of an
    # earlier canary; 100 sends all traffic to the new revision, which promotes it.
    predictor["canaryTrafficPercent"] = canary_traffic_percent
    metadata: Dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "labels": {"app.kubernetes.io/name": "kubeseg", "app.kubernetes.io/component": "predictor",
                   **dict(labels or {})},
    }
    if annotations:
        metadata["annotations"] = dict(annotations)
    return {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": "InferenceService",
            "metadata": metadata, "spec": {"predictor": predictor}}


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


def apply_inference_service(obj: Mapping[str, Any], *, timeout_s: float = 600,
                            poll_s: float = 5.0, api_client=None) -> str:
    """Create (or patch) the InferenceService, wait until it is Ready, return its URL.

    Uses the kubeconfig (or the in-cluster service account) unless ``api_client`` is given.
    On timeout raises :class:`DeploymentError` naming the failing conditions; the object is left
    as it is, and KServe keeps routing traffic to the last ready revision.
    """
    from kubernetes import client, config
    from kubernetes.client.rest import ApiException

    if api_client is None:
        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        api_client = client.ApiClient()
    api = client.CustomObjectsApi(api_client)
    name = obj["metadata"]["name"]
    namespace = obj["metadata"].get("namespace", "default")
    where = f"InferenceService {namespace}/{name}"
    try:
        try:
            api.get_namespaced_custom_object(API_GROUP, API_VERSION, namespace, PLURAL, name)
            exists = True
        except ApiException as exc:
            if exc.status != 404:
                raise
            exists = False
        if exists:
            # merge patch: fields we set are replaced; the previous revision keeps serving
            # until the new one is ready
            result = api.patch_namespaced_custom_object(API_GROUP, API_VERSION, namespace,
                                                        PLURAL, name, dict(obj))
            logger.info("patched %s", where)
        else:
            result = api.create_namespaced_custom_object(API_GROUP, API_VERSION, namespace,
                                                         PLURAL, dict(obj))
            logger.info("created %s", where)
    except ApiException as exc:
        raise DeploymentError(f"{where}: the API server refused it ({exc.status} {exc.reason}): "
                              f"{(exc.body or '')[:500]}") from None
    generation = (result.get("metadata") or {}).get("generation", 0)
    deadline = time.monotonic() + timeout_s
    current: Mapping[str, Any] = result
    while True:
        current = api.get_namespaced_custom_object(API_GROUP, API_VERSION, namespace, PLURAL,
                                                   name)
        status = current.get("status") or {}
        ready = _ready_condition(current)
        if (ready is not None and ready.get("status") == "True"
                and status.get("observedGeneration", generation) >= generation):
            url = status.get("url") or (status.get("address") or {}).get("url", "")
            logger.info("%s is ready at %s", where, url)
            return url
        if time.monotonic() > deadline:
            raise DeploymentError(
                f"{where} did not become Ready within {timeout_s:.0f} s: "
                f"{_condition_summary(current)}. Nothing was deleted: KServe keeps serving the "
                f"last ready revision; inspect with 'kubectl describe isvc {name} -n "
                f"{namespace}', fix, and deploy again")
        time.sleep(poll_s)


__all__ = ["API_GROUP", "API_VERSION", "PLURAL", "MODEL_MOUNT",
           "DeploymentError", "build_inference_service", "apply_inference_service"]
