"""Where kubeseg's pods run: GPU resources, node pool selection and tolerations.

Shared by the InferenceService (serving) and the PyTorchJob (distributed training), so that both
land on the same GPU node pool the manifests' gpu-node-pool overlay describes.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence

GPU_RESOURCE = "nvidia.com/gpu"
DEFAULT_GPU_NODE_SELECTOR = {"kubeseg.io/node-pool": "gpu"}
DEFAULT_GPU_TOLERATIONS = ({"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"},)


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
