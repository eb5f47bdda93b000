"""Distributed training as a Kubernetes job: a Kubeflow Trainer v2 ``TrainJob`` (default) or,
for clusters still on Training Operator 1.9, a ``PyTorchJob``.

Both run ``kubeseg train`` under torchrun (``python3 -m torch.distributed.run``) on
``num_nodes`` pods with ``gpus_per_node`` GPUs each, from the trainer image, with the storage
Secret as environment, a memory-backed ``/dev/shm``, the GPU node pool's selector and
toleration, and no Istio sidecar. The builders are pure (no cluster, no kubernetes import):

- :func:`build_train_job`: ``trainer.kubeflow.org/v1alpha1`` TrainJob whose ``runtimeRef`` names
  a ClusterTrainingRuntime (``torch-distributed``, installed with Kubeflow Trainer). The Trainer
  gives every node the torchrun settings (``PET_NNODES``, ``PET_NPROC_PER_NODE``,
  ``PET_NODE_RANK``, ``PET_MASTER_ADDR``, ``PET_MASTER_PORT``); the pod-level settings go in as a
  ``runtimePatches`` entry (Trainer v2.2 and later).
- :func:`build_pytorch_job`: ``kubeflow.org/v1`` PyTorchJob, one ``Master`` and
  ``num_nodes - 1`` ``Worker`` replicas; the operator sets the same ``PET_`` variables.

:func:`run_training_job` creates the job (or adopts the one a previous attempt created), waits
until it succeeds or fails, and recreates a failed job once per call: the new pods resume from
``<output>/checkpoints/last.pt``, because the training output location is part of the arguments
and stays the same.
"""
from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from kubeseg import images
from kubeseg.config import DEFAULT_RUNTIME, OPERATORS, PYTORCHJOB, TRAINER_V2
from kubeseg.deploy import cluster, placement
from kubeseg.errors import ConfigError, TrainingJobError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobKind:
    """Where a kind of job lives in the API and how its status says it is done."""

    group: str
    version: str
    plural: str
    kind: str
    succeeded: str  # the condition type that means success
    what_to_install: str

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}"


KINDS = {
    TRAINER_V2: JobKind("trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob", "Complete",
                        "Kubeflow Trainer v2 with the torch-distributed ClusterTrainingRuntime"),
    PYTORCHJOB: JobKind("kubeflow.org", "v1", "pytorchjobs", "PyTorchJob", "Succeeded",
                        "the Kubeflow Training Operator 1.9"),
}
CONTAINER_NAMES = {TRAINER_V2: "node", PYTORCHJOB: "pytorch"}  # what each operator looks for

_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


@dataclass(frozen=True)
class TrainingJobSpec:
    """What a distributed training job runs and where; the same for both job kinds."""

    name: str
    train_args: Tuple[str, ...]
    namespace: str = "kubeflow-user"
    image: Optional[str] = None  # default: the configured trainer image (kubeseg.images)
    num_nodes: int = 1
    gpus_per_node: int = 1
    cpu: str = "8"
    memory: str = "32Gi"
    shm_size: str = placement.DEFAULT_SHM_SIZE
    storage_secret: Optional[str] = placement.STORAGE_SECRET
    service_account: Optional[str] = None
    node_selector: Optional[Mapping[str, str]] = None
    tolerations: Optional[Sequence[Mapping[str, Any]]] = None
    labels: Mapping[str, str] = field(default_factory=dict)

    def check(self) -> None:
        problems = []
        if not _DNS_LABEL.match(self.name or "") or len(self.name) > 63:
            problems.append(f"name={self.name!r}: must be a DNS label of at most 63 characters")
        if not isinstance(self.num_nodes, int) or self.num_nodes < 1:
            problems.append(f"num_nodes={self.num_nodes!r}: must be an integer >= 1")
        if not isinstance(self.gpus_per_node, int) or self.gpus_per_node < 0:
            problems.append(f"gpus_per_node={self.gpus_per_node!r}: must be an integer >= 0")
        if "--output" not in self.train_args:
            problems.append("train_args must contain --output (the checkpoint location)")
        if problems:
            raise ConfigError(problems, what="training job setting")

    @property
    def trainer_image(self) -> str:
        return self.image or images.configured().trainer

    @property
    def procs_per_node(self) -> int:
        return max(1, self.gpus_per_node)

    def train_command(self) -> List[str]:
        """torchrun running ``kubeseg train``; the operator's ``PET_`` variables fill in the
        rendezvous, the sizes are named for clarity in logs. With GPUs requested, training is
        told to use CUDA, so a node whose GPU is unusable fails at once instead of training on
        CPU while it holds the GPU."""
        args = list(map(str, self.train_args))
        if self.gpus_per_node and "--device" not in args:
            args += ["--device", "cuda"]
        return ["python3", "-m", "torch.distributed.run", f"--nnodes={self.num_nodes}",
                f"--nproc-per-node={self.procs_per_node}", "-m", "kubeseg", "train", *args]

    def resources(self) -> Dict[str, Dict[str, str]]:
        return {"requests": {"cpu": str(self.cpu), "memory": str(self.memory)},
                "limits": {"cpu": str(self.cpu), "memory": str(self.memory)}}

    def pod_labels(self) -> Dict[str, str]:
        return {"app.kubernetes.io/name": "kubeseg", "app.kubernetes.io/component": "trainer",
                **dict(self.labels)}


def build_train_job(spec: TrainingJobSpec, *, runtime: str = DEFAULT_RUNTIME,
                    active_deadline_s: Optional[int] = None) -> Dict[str, Any]:
    """The Kubeflow Trainer v2 TrainJob (a dict) for ``spec``.

    ``runtime``: the ClusterTrainingRuntime to use. ``active_deadline_s``: fail the job when it
    has not finished this long after it started (pods waiting for a node count too).
    """
    spec.check()
    kind = KINDS[TRAINER_V2]
    resources = spec.resources()
    pod: Dict[str, Any] = {}
    placement.place(pod, resources, spec.gpus_per_node, node_selector=spec.node_selector,
                    tolerations=spec.tolerations)
    container_patch = {"name": CONTAINER_NAMES[TRAINER_V2],
                       "volumeMounts": [placement.shm_mount()]}
    pod.update({"containers": [container_patch],
                "volumes": [placement.shm_volume(spec.shm_size)]})
    if spec.service_account:
        pod["serviceAccountName"] = spec.service_account
    env = [{"name": "PYTHONUNBUFFERED", "value": "1"}]
    if spec.storage_secret:
        env += placement.storage_env(spec.storage_secret)
    trainer = {"image": spec.trainer_image, "command": spec.train_command(), "env": env,
               "numNodes": spec.num_nodes, "numProcPerNode": spec.procs_per_node,
               "resourcesPerNode": resources}
    patch = {"manager": "kubeseg", "trainingRuntimeSpec": {"template": {"spec": {
        "replicatedJobs": [{"name": CONTAINER_NAMES[TRAINER_V2], "template": {"spec": {
            "template": {"metadata": {"labels": spec.pod_labels(),
                                      "annotations": dict(placement.NO_ISTIO_SIDECAR)},
                         "spec": pod}}}}]}}}}
    job_spec: Dict[str, Any] = {
        "runtimeRef": {"apiGroup": kind.group, "kind": "ClusterTrainingRuntime",
                       "name": runtime},
        "trainer": trainer,
        "runtimePatches": [patch],
    }
    if active_deadline_s:
        job_spec["activeDeadlineSeconds"] = int(active_deadline_s)
    return {"apiVersion": kind.api_version, "kind": kind.kind,
            "metadata": {"name": spec.name, "namespace": spec.namespace,
                         "labels": spec.pod_labels()},
            "spec": job_spec}


def build_pytorch_job(spec: TrainingJobSpec, *, backoff_limit: int = 3) -> Dict[str, Any]:
    """The Training Operator 1.9 PyTorchJob (a dict) for ``spec``."""
    spec.check()
    kind = KINDS[PYTORCHJOB]
    resources = spec.resources()
    env = [{"name": "PYTHONUNBUFFERED", "value": "1"}]
    if spec.storage_secret:
        env += placement.storage_env(spec.storage_secret)
    container: Dict[str, Any] = {
        "name": CONTAINER_NAMES[PYTORCHJOB],
        "image": spec.trainer_image,
        "imagePullPolicy": images.pull_policy(spec.trainer_image),
        "command": spec.train_command(),
        "env": env,
        "resources": resources,
        "volumeMounts": [placement.shm_mount()],
    }
    pod_spec: Dict[str, Any] = {"containers": [container],
                                "volumes": [placement.shm_volume(spec.shm_size)]}
    placement.place(pod_spec, resources, spec.gpus_per_node, node_selector=spec.node_selector,
                    tolerations=spec.tolerations)
    if spec.service_account:
        pod_spec["serviceAccountName"] = spec.service_account

    def replica(count: int) -> Dict[str, Any]:
        return {"replicas": count, "restartPolicy": "OnFailure",
                "template": {"metadata": {"labels": spec.pod_labels(),
                                          "annotations": dict(placement.NO_ISTIO_SIDECAR)},
                             "spec": pod_spec}}

    replicas = {"Master": replica(1)}
    if spec.num_nodes > 1:
        replicas["Worker"] = replica(spec.num_nodes - 1)
    return {
        "apiVersion": kind.api_version,
        "kind": kind.kind,
        "metadata": {"name": spec.name, "namespace": spec.namespace,
                     "labels": spec.pod_labels()},
        "spec": {
            "nprocPerNode": str(spec.procs_per_node),
            "pytorchReplicaSpecs": replicas,
            "runPolicy": {"backoffLimit": int(backoff_limit), "cleanPodPolicy": "Running"},
        },
    }


SINGLE, DISTRIBUTED = "single", "distributed"


def training_plan(num_nodes: int, gpus_per_node: int) -> str:
    """``"single"`` (one GPU, in the pipeline step's own pod) or ``"distributed"`` (a job of
    ``num_nodes`` pods with ``gpus_per_node`` GPUs each, launched by a CPU-only step)."""
    problems = []
    if not isinstance(num_nodes, int) or num_nodes < 1:
        problems.append(f"num_nodes={num_nodes!r}: must be an integer >= 1")
    if not isinstance(gpus_per_node, int) or gpus_per_node < 0:
        problems.append(f"gpus_per_node={gpus_per_node!r}: must be an integer >= 0")
    if problems:
        raise ConfigError(problems, what="pipeline parameter")
    return DISTRIBUTED if num_nodes > 1 or gpus_per_node > 1 else SINGLE


def build_training_job(spec: TrainingJobSpec, operator: str = TRAINER_V2,
                       runtime: str = DEFAULT_RUNTIME) -> Dict[str, Any]:
    """The job for ``operator``: ``trainer-v2`` (TrainJob) or ``pytorchjob``."""
    if operator == TRAINER_V2:
        return build_train_job(spec, runtime=runtime)
    if operator == PYTORCHJOB:
        return build_pytorch_job(spec)
    raise ConfigError([f"training_operator={operator!r}: one of {', '.join(OPERATORS)} "
                       "(pytorchjob only for clusters still on Training Operator 1.9)"],
                      what="option")


def job_name(prefix: str, run_id: str) -> str:
    """A DNS-label job name that is the same for every attempt of one pipeline run."""
    suffix = re.sub(r"[^a-z0-9]", "", str(run_id).lower())[:12] or "local"
    base = re.sub(r"[^a-z0-9-]", "-", prefix.lower()).strip("-")[:40] or "kubeseg-train"
    return f"{base}-{suffix}"


def kind_of(obj: Mapping[str, Any]) -> JobKind:
    for kind in KINDS.values():
        if obj.get("apiVersion") == kind.api_version and obj.get("kind") == kind.kind:
            return kind
    raise ConfigError([f"{obj.get('apiVersion')}/{obj.get('kind')}: not a training job kubeseg "
                       "runs (TrainJob or PyTorchJob)"], what="object")


def job_state(obj: Mapping[str, Any]) -> Optional[str]:
    """``"Succeeded"``, ``"Failed"``, or the newest other true condition (``"Running"``,
    ``"Created"``, ...), or None. A TrainJob's ``Complete`` counts as ``Succeeded``."""
    conditions = (obj.get("status") or {}).get("conditions") or []
    succeeded = {"Succeeded", "Complete"}

    def true(c):
        return str(c.get("status")) == "True"

    if any(c.get("type") in succeeded and true(c) for c in conditions):
        return "Succeeded"
    if any(c.get("type") == "Failed" and true(c) for c in conditions):
        return "Failed"
    current = [c for c in conditions if true(c)]
    return current[-1].get("type") if current else None


def _failure_message(obj: Mapping[str, Any]) -> str:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == "Failed":
            return c.get("message") or c.get("reason") or "no message"
    return "no message"


def _custom_objects_api():
    from kubernetes import client

    return client.CustomObjectsApi(cluster.api_client("create the training job in"))


class _JobClient:
    """get / create / delete of one training job through the custom-objects API."""

    def __init__(self, obj: Mapping[str, Any], api):
        self.obj, self.api, self.kind = dict(obj), api, kind_of(obj)
        self.name = obj["metadata"]["name"]
        self.namespace = obj["metadata"].get("namespace", "default")
        self.where = f"{self.kind.kind} {self.namespace}/{self.name}"

    def _args(self):
        return self.kind.group, self.kind.version, self.namespace, self.kind.plural

    def get(self) -> Optional[Mapping[str, Any]]:
        from kubernetes.client.exceptions import ApiException

        try:
            return self.api.get_namespaced_custom_object(*self._args(), self.name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise TrainingJobError(f"{self.where}: cannot read it ({exc.status} "
                                   f"{exc.reason})") from None

    def create(self) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            self.api.create_namespaced_custom_object(*self._args(), self.obj)
        except ApiException as exc:
            raise TrainingJobError(
                f"{self.where}: cannot create it ({exc.status} {exc.reason}); check that "
                f"{self.kind.what_to_install} is installed and that the pipeline's service "
                f"account may create {self.kind.plural}.{self.kind.group} (kubectl apply -k "
                f"manifests/overlays/kfp-multi-user or kfp-standalone)") from None
        logger.info("%s created", self.where)

    def delete(self, poll_s: float) -> None:
        self.api.delete_namespaced_custom_object(*self._args(), self.name)
        while self.get() is not None:
            time.sleep(poll_s)


def run_training_job(obj: Mapping[str, Any], *, timeout_s: float = 7 * 24 * 3600,
                     poll_s: float = 30.0, recreate_failed: bool = True, api=None) -> str:
    """Create ``obj`` (a TrainJob or PyTorchJob; or adopt the job of that name left by an
    earlier attempt), wait for it, and return ``"Succeeded"``. A job found Failed is deleted
    and created again (once), so a retried pipeline step resumes training from the last
    checkpoint. Raises :class:`TrainingJobError` when the job fails or ``timeout_s`` passes.
    """
    job = _JobClient(obj, api or _custom_objects_api())
    existing = job.get()
    if existing is None:
        job.create()
    elif job_state(existing) == "Failed" and recreate_failed:
        logger.warning("%s failed earlier (%s); recreating it to resume from the checkpoint",
                       job.where, _failure_message(existing))
        job.delete(min(poll_s, 5.0))
        job.create()
    else:
        logger.info("%s exists (state %s); waiting for it", job.where, job_state(existing))
    deadline = time.monotonic() + timeout_s
    last = None
    while True:
        current = job.get()
        state = job_state(current) if current else None
        if state != last:
            logger.info("%s: %s", job.where, state or "pending")
            last = state
        if state == "Succeeded":
            return state
        if state == "Failed":
            raise TrainingJobError(f"{job.where} failed: {_failure_message(current)}; the "
                                   "checkpoint is kept, a retry resumes from it")
        if time.monotonic() > deadline:
            raise TrainingJobError(f"{job.where} did not finish within {timeout_s:.0f} s; "
                                   "if its pods are Pending, check that GPU nodes carry the "
                                   "label kubeseg.io/node-pool=gpu")
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


__all__ = ["TrainingJobSpec", "build_train_job", "build_pytorch_job", "build_training_job",
           "run_training_job", "train_arguments", "job_name", "job_state",
           "TrainingJobError", "training_plan", "SINGLE",
           "DISTRIBUTED"]
