"""Small Kubernetes objects as the API returns them, written here with the fields the checks
read (each mirrors the upstream object named in its docstring)."""
from typing import Any, Dict


def configmap(namespace: str, name: str, data: Dict[str, str]) -> Dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": namespace}, "data": data}


def deployment(namespace: str, name: str, image: str) -> Dict[str, Any]:
    """A controller Deployment whose manager container runs ``image``."""
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"template": {"spec": {"containers": [
                {"name": "kube-rbac-proxy", "image": "quay.io/brancz/kube-rbac-proxy"},
                {"name": "manager", "image": image}]}}}}


def crd(plural: str, group: str, kind: str, version: str) -> Dict[str, Any]:
    """An established CustomResourceDefinition serving one version."""
    return {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": f"{plural}.{group}"},
            "spec": {"group": group, "names": {"kind": kind, "plural": plural},
                     "scope": "Namespaced",
                     "versions": [{"name": version, "served": True, "storage": True}]},
            "status": {"conditions": [{"type": "Established", "status": "True"}]}}


def torch_runtime() -> Dict[str, Any]:
    """The shape of Kubeflow Trainer's torch-distributed ClusterTrainingRuntime
    (kubeflow/trainer v2.2.0, manifests/base/runtimes/torch_distributed.yaml), trimmed to the
    fields checked."""
    return {"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "ClusterTrainingRuntime",
            "metadata": {"name": "torch-distributed"},
            "spec": {"mlPolicy": {"numNodes": 1, "torch": {}}, "template": {"spec": {
                "replicatedJobs": [{"name": "node", "template": {
                    "metadata": {"labels": {
                        "trainer.kubeflow.org/trainjob-ancestor-step": "trainer"}},
                    "spec": {"template": {"spec": {"containers": [
                        {"name": "node", "image": "pytorch/pytorch"}]}}}}}]}}}}
