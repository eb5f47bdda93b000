"""Where and how kubeseg's pods run: GPU resources, the node pool, shared memory, the storage
Secret and the Istio sidecar.

One home for these rules: the pipeline's steps (pipelines/segmentation.py), the training jobs
(TrainJob, PyTorchJob), the InferenceService and the Katib trials all take them from here, so
they land on the same GPU node pool (nodes labelled kubeseg.io/node-pool=gpu, tainted
nvidia.com/gpu) and see the same credentials.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence

GPU_RESOURCE = "nvidia.com/gpu"
DEFAULT_GPU_NODE_SELECTOR = {"kubeseg.io/node-pool": "gpu"}
DEFAULT_GPU_TOLERATIONS = ({"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"},)

# Pods get 64 MiB of /dev/shm unless a memory emptyDir is mounted there; DataLoader workers
# hand batches to the trainer through it (batch 16 at crop 240 is far beyond 64 MiB).
SHM_VOLUME = "dshm"
SHM_MOUNT_PATH = "/dev/shm"
DEFAULT_SHM_SIZE = "8Gi"

# The object-store credentials: a Secret the user creates (README, "Run on a cluster"), whose
# keys become the environment variables kubeseg.storage reads.
STORAGE_SECRET = "kubeseg-storage"
STORAGE_SECRET_KEYS = ("KUBESEG_S3_ENDPOINT", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")

# Batch pods that must finish (training, trials) run without the Istio sidecar: it never exits,
# so the pod would never complete (Kubeflow's documented requirement for training jobs).
NO_ISTIO_SIDECAR = {"sidecar.istio.io/inject": "false"}


def shm_volume(size: str = DEFAULT_SHM_SIZE) -> Dict[str, Any]:
    """The memory-backed emptyDir for /dev/shm (a pod ``volumes`` entry)."""
    return {"name": SHM_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": size}}


def shm_mount() -> Dict[str, Any]:
    """Its ``volumeMounts`` entry."""
    return {"name": SHM_VOLUME, "mountPath": SHM_MOUNT_PATH}


def storage_env(secret: str = STORAGE_SECRET) -> List[Dict[str, Any]]:
    """``env`` entries taking every storage key from ``secret``."""
    return [{"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}
            for key in STORAGE_SECRET_KEYS]


def place(pod_spec: Dict[str, Any], resources: Dict[str, Dict[str, str]], gpus: int, *,
          node_selector: Optional[Mapping[str, str]] = None,
          tolerations: Optional[Sequence[Mapping[str, Any]]] = None) -> None:
    """Add GPU requests/limits to ``resources`` and scheduling fields to ``pod_spec``.

    With GPUs the pod goes to the GPU node pool (the defaults above unless a node selector or
    tolerations are given); without GPUs only what is given explicitly is set.
    """
    if gpus:
        resources["requests"][GPU_RESOURCE] = str(gpus)
        resources["limits"][GPU_RESOURCE] = str(gpus)
        if node_selector is None:
            node_selector = DEFAULT_GPU_NODE_SELECTOR
        if tolerations is None:
            tolerations = DEFAULT_GPU_TOLERATIONS
    if node_selector:
        pod_spec["nodeSelector"] = dict(node_selector)
    if tolerations:
        pod_spec["tolerations"] = [dict(t) for t in tolerations]
