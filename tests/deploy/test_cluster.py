"""The one Kubernetes client of the deploy, training-job and Katib paths. Each case runs in a
fresh process: the kubernetes package reads KUBECONFIG when it is imported."""
import os
import subprocess
import sys

CALL = ("import sys\nfrom kubeseg.deploy import cluster\nfrom kubeseg.errors import ClusterError\n"
        "try:\n    print(cluster.api_client(*sys.argv[1:]).configuration.host)\n"
        "except ClusterError as exc:\n    print('ClusterError:', exc)\n")


def _api_client(kubeconfig, *args) -> str:
    env = {k: v for k, v in os.environ.items() if k != "KUBERNETES_SERVICE_HOST"}  # not a pod
    env["KUBECONFIG"] = str(kubeconfig)
    return subprocess.run([sys.executable, "-c", CALL, *args], env=env, capture_output=True,
                          text=True, check=True).stdout.strip()


def test_no_cluster_is_a_clear_error_naming_what_to_set(tmp_path):
    missing = tmp_path / "missing-kubeconfig"
    out = _api_client(missing, "create the Experiment in", "or use --dry-run")
    assert out.startswith("ClusterError: no Kubernetes cluster to create the Experiment in (")
    assert out.endswith("); set KUBECONFIG, or use --dry-run")
    assert _api_client(missing, "deploy the InferenceService to").endswith("); set KUBECONFIG")


def test_a_kubeconfig_gives_a_client_for_its_server(tmp_path):
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        "clusters: [{name: k, cluster: {server: 'https://127.0.0.1:6443'}}]\n"
        "users: [{name: u, user: {token: t}}]\n"
        "contexts: [{name: c, context: {cluster: k, user: u}}]\n")
    assert _api_client(kubeconfig, "deploy to") == "https://127.0.0.1:6443"
