"""Distributed training as a Kubeflow Training Operator ``PyTorchJob`` (``kubeflow.org/v1``).

:func:`build_pytorch_job` is pure (no cluster, no kubernetes import): it returns the object that
runs ``kubeseg train`` under torchrun (``python -m torch.distributed.run``) on ``num_nodes``
pods with ``gpus_per_node`` GPUs each: one ``Master`` replica and ``num_nodes - 1`` ``Worker``
replicas. The Training Operator gives every pod the rendezvous settings torchrun reads from its
environment (``PET_MASTER_ADDR``, ``PET_MASTER_PORT``, ``PET_NODE_RANK``, ``PET_NNODES``,
``PET_NPROC_PER_NODE``), so the command line only names the sizes.

:func:`run_pytorch_job` creates the job (or finds the one a previous attempt created), waits
until it succeeds or fails, and recreates a failed job once per call: the new pods resume from
``<output>/checkpoints/last.pt``, because the training output location is part of the arguments
and stays the same.
"""
from __future__ import annotations

import logging
import re
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence

from kubeseg import images
from kubeseg.deploy.placement import place
from kubeseg.errors import ConfigError, TrainingJobError

logger = logging.getLogger(__name__)

API_GROUP = "kubeflow.org"
API_VERSION = "v1"
PLURAL = "pytorchjobs"
KIND = "PyTorchJob"
CONTAINER_NAME = "pytorch"  # the Training Operator looks for this container name
SHM_SIZE = "8Gi"  # DataLoader workers share batches through /dev/shm

_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def job_name(prefix: str, run_id: str) -> str:
    """A DNS-label job name that is the same for every attempt of one pipeline run."""
    suffix = re.sub(r"[^a-z0-9]", "", str(run_id).lower())[:12] or "local"
    base = re.sub(r"[^a-z0-9-]", "-", prefix.lower()).strip("-")[:40] or "kubeseg-train"
    return f"{base}-{suffix}"


def build_pytorch_job(
        name: str, train_args: Sequence[str], *, namespace: str = "kubeflow-user",
        image: Optional[str] = None, num_nodes: int = 1, gpus_per_node: int = 1,
        cpu: str = "8", memory: str = "32Gi", storage_secret: Optional[str] = None,
        node_selector: Optional[Mapping[str, str]] = None,
        tolerations: Optional[Sequence[Mapping[str, Any]]] = None,
        service_account: Optional[str] = None, backoff_limit: int = 3,
        labels: Optional[Mapping[str, str]] = None) -> Dict[str, Any]:
    """The PyTorchJob (a dict) running ``kubeseg train TRAIN_ARGS`` on ``num_nodes`` x
    ``gpus_per_node`` processes.

    ``train_args``: the arguments after ``kubeseg train`` (``--hyperparameters``, the data and
    ``--output``; every URI must be readable from the pods). ``gpus_per_node = 0`` runs CPU
    processes (one per node). ``storage_secret``: a Secret whose keys (``AWS_ACCESS_KEY_ID``,
    ``AWS_SECRET_ACCESS_KEY``, ``KUBESEG_S3_ENDPOINT``) become environment variables.
    GPU pods go to the GPU node pool: ``node_selector`` (default
    ``{"kubeseg.io/node-pool": "gpu"}``) and ``tolerations`` (default: the ``nvidia.com/gpu``
    taint). ``image`` defaults to the configured trainer image (:mod:`kubeseg.images`).
    """
    image = image or images.configured().trainer
    problems = []
    if not _DNS_LABEL.match(name or "") or len(name) > 63:
        problems.append(f"name={name!r}: must be a DNS label of at most 63 characters")
    if not isinstance(num_nodes, int) or num_nodes < 1:
        problems.append(f"num_nodes={num_nodes!r}: must be an integer >= 1")
    if not isinstance(gpus_per_node, int) or gpus_per_node < 0:
        problems.append(f"gpus_per_node={gpus_per_node!r}: must be an integer >= 0")
    if "--output" not in train_args:
        problems.append("train_args must contain --output (the checkpoint location)")
    if problems:
        raise ConfigError(problems)
    procs = max(1, gpus_per_node)
    command = ["python", "-m", "torch.distributed.run", f"--nnodes={num_nodes}",
               f"--nproc-per-node={procs}", "-m", "kubeseg", "train", *map(str, train_args)]
    resources: Dict[str, Dict[str, str]] = {
        "requests": {"cpu": str(cpu), "memory": str(memory)},
        "limits": {"cpu": str(cpu), "memory": str(memory)},
    }
    container: Dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": image,
        "imagePullPolicy": images.pull_policy(image),
        "command": command,
        "env": [{"name": "PYTHONUNBUFFERED", "value": "1"}],
        "resources": resources,
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
    }
    if storage_secret:
        container["envFrom"] = [{"secretRef": {"name": storage_secret}}]
    pod_spec: Dict[str, Any] = {
        "containers": [container],
        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": SHM_SIZE}}],
    }
    place(pod_spec, resources, gpus_per_node, node_selector=node_selector,
          tolerations=tolerations)
    if service_account:
        pod_spec["serviceAccountName"] = service_account
    pod_labels = {"app.kubernetes.io/name": "kubeseg", "app.kubernetes.io/component": "trainer",
                  **dict(labels or {})}

    def replica(count: int) -> Dict[str, Any]:
        return {"replicas": count, "restartPolicy": "OnFailure",
                "template": {"metadata": {"labels": dict(pod_labels)}, "spec": pod_spec}}

    replicas = {"Master": replica(1)}
    if num_nodes > 1:
        replicas["Worker"] = replica(num_nodes - 1)
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": KIND,
        "metadata": {"name": name, "namespace": namespace, "labels": dict(pod_labels)},
        "spec": {
            "nprocPerNode": str(procs),
            "pytorchReplicaSpecs": replicas,
            "runPolicy": {"backoffLimit": int(backoff_limit), "cleanPodPolicy": "Running"},
        },
    }


def job_state(obj: Mapping[str, Any]) -> Optional[str]:
    """``"Succeeded"``, ``"Failed"``, ``"Running"``, ... : the newest true condition, or None."""
    conditions = (obj.get("status") or {}).get("conditions") or []
    for wanted in ("Succeeded", "Failed"):
        if any(c.get("type") == wanted and str(c.get("status")) == "True" for c in conditions):
            return wanted
    true = [c for c in conditions if str(c.get("status")) == "True"]
    return true[-1].get("type") if true else None


def _failure_message(obj: Mapping[str, Any]) -> str:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == "Failed":
            return c.get("message") or c.get("reason") or "no message"
    return "no message"


def _custom_objects_api():
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.CustomObjectsApi()


def run_pytorch_job(obj: Mapping[str, Any], *, timeout_s: float = 7 * 24 * 3600,
                    poll_s: float = 30.0, recreate_failed: bool = True, api=None) -> str:
    """Create ``obj`` (or adopt the job of that name left by an earlier attempt), wait for it,
    and return its final state ``"Succeeded"``. A job found Failed is deleted and created again
    (once), so a retried pipeline step resumes training from the last checkpoint. Raises
    :class:`TrainingJobError` when the job fails or ``timeout_s`` passes.
    """
    from kubernetes.client.exceptions import ApiException

    api = api or _custom_objects_api()
    name = obj["metadata"]["name"]
    namespace = obj["metadata"].get("namespace", "default")
    where = f"PyTorchJob {namespace}/{name}"

    def get():
        try:
            return api.get_namespaced_custom_object(API_GROUP, API_VERSION, namespace, PLURAL, name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise TrainingJobError(f"{where}: cannot read it ({exc.status} {exc.reason})") from None

    def create():
        try:
            api.create_namespaced_custom_object(API_GROUP, API_VERSION, namespace, PLURAL,
                                                dict(obj))
        except ApiException as exc:
            raise TrainingJobError(
                f"{where}: cannot create it ({exc.status} {exc.reason}); check that the "
                "Training Operator is installed and the pipeline's service account may "
                "create pytorchjobs.kubeflow.org (manifests/base/rbac.yaml)") from None
        logger.info("%s created", where)

    existing = get()
    if existing is None:
        create()
    elif job_state(existing) == "Failed" and recreate_failed:
        logger.warning("%s failed earlier (%s); recreating it to resume from the checkpoint",
                       where, _failure_message(existing))
        api.delete_namespaced_custom_object(API_GROUP, API_VERSION, namespace, PLURAL, name)
        while get() is not None:
            time.sleep(min(poll_s, 5.0))
        create()
    else:
        logger.info("%s exists (state %s); waiting for it", where, job_state(existing))
    deadline = time.monotonic() + timeout_s
    last = None
    while True:
        current = get()
        state = job_state(current) if current else None
        if state != last:
            logger.info("%s: %s", where, state or "pending")
            last = state
        if state == "Succeeded":
            return state
        if state == "Failed":
            raise TrainingJobError(f"{where} failed: {_failure_message(current)}; the "
                                   "checkpoint is kept, a retry resumes from it")
        if time.monotonic() > deadline:
            raise TrainingJobError(f"{where} did not finish within {timeout_s:.0f} s")
        time.sleep(poll_s)


def train_arguments(*, hyperparameters_uri: str, output_uri: str,
                    channels: Mapping[str, Optional[str]],
                    pretrained_uri: Optional[str] = None, initial_model_uri: Optional[str] = None,
                    class_names: Optional[Sequence[str]] = None) -> List[str]:
    """The ``kubeseg train`` arguments for a dataset given as a Channels dict."""
    args = ["--hyperparameters", hyperparameters_uri, "--output", output_uri]
    flags = {"train": "--train", "validation": "--validation",
             "train_annotation": "--train-annotation",
             "validation_annotation": "--validation-annotation",
             "label_map": "--label-map", "shards": "--shards"}
    for key, flag in flags.items():
        if channels.get(key):
            args += [flag, str(channels[key])]
    if pretrained_uri:
        args += ["--pretrained-weights", pretrained_uri]
    if initial_model_uri:
        args += ["--model", initial_model_uri]
    if class_names:
        args += ["--class-names", ",".join(class_names)]
    return args


__all__ = ["build_pytorch_job", "run_pytorch_job", "train_arguments", "job_name", "job_state",
           "TrainingJobError"]
