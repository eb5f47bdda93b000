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
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from kubeseg import images
from kubeseg.config import value_problem
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
    new revision and keeps the rest on the previous one. ``image`` defaults to the configured
    predictor image for ``gpus`` (:mod:`kubeseg.images`: the CUDA build when ``gpus > 0``).
    """

    name: str
    model_uri: str
    namespace: str = "kubeflow-user"
    image: Optional[str] = None
    service_account: Optional[str] = None
    storage_secret: Optional[str] = None
    cpu: str = "2"
    memory: str = SERVING_POD_MEMORY
    gpus: int = 0
    node_selector: Optional[Mapping[str, str]] = None
    tolerations: Optional[Sequence[Mapping[str, Any]]] = None
    min_replicas: int = 1
    max_replicas: int = 1
    canary_traffic_percent: int = 100
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
        problems += self._replica_problems()
        problems.append(value_problem("canary_traffic_percent", self.canary_traffic_percent))
        problems = [p for p in problems if p]
        if problems:
            raise ConfigError(problems, what="option")

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
    if spec.annotations:
        metadata["annotations"] = dict(spec.annotations)
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


def _create_or_patch(api, obj: Mapping[str, Any]) -> Mapping[str, Any]:
    """Create the object, or merge-patch it when it exists; the API server's answer."""
    from kubernetes.client.rest import ApiException

    name, namespace, where = _identity(obj)
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
    return result


def _wait_ready(api, obj: Mapping[str, Any], generation: int, timeout_s: float,
                poll_s: float) -> str:
    """Poll until KServe reports ``generation`` Ready; its URL."""
    name, namespace, where = _identity(obj)
    deadline = time.monotonic() + timeout_s
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


def apply_inference_service(obj: Mapping[str, Any], *, timeout_s: float = 600,
                            poll_s: float = 5.0, api_client=None) -> str:
    """Create (or patch) the InferenceService, wait until it is Ready, return its URL.

    Uses the kubeconfig (or the in-cluster service account) unless ``api_client`` is given.
    On timeout raises :class:`DeploymentError` naming the failing conditions; the object is left
    as it is, and KServe keeps routing traffic to the last ready revision.
    """
    from kubernetes import client

    api = client.CustomObjectsApi(api_client if api_client is not None
                                  else cluster.api_client("deploy the InferenceService to"))
    result = _create_or_patch(api, obj)
    generation = (result.get("metadata") or {}).get("generation", 0)
    return _wait_ready(api, obj, generation, timeout_s, poll_s)


__all__ = ["API_GROUP", "API_VERSION", "PLURAL", "MODEL_MOUNT", "ServingSpec",
           "DeploymentError", "build_inference_service", "apply_inference_service"]
