"""The Kubernetes API client every cluster operation uses (InferenceService, training jobs,
Katib Experiments): the pod's service account inside a cluster, else the kubeconfig."""
from __future__ import annotations

from kubeseg.errors import ClusterError


def api_client(action: str, hint: str = ""):
    """A ``kubernetes.client.ApiClient`` for ``action`` (e.g. "create the Experiment in"); with
    neither a service account nor a kubeconfig, a ClusterError says what to set (and ``hint``)."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        try:
            config.load_kube_config()
        except (config.ConfigException, OSError) as exc:
            raise ClusterError(f"no Kubernetes cluster to {action} ({exc}); set KUBECONFIG"
                               + (f", {hint}" if hint else "")) from None
    return client.ApiClient()
