"""``kubeseg preflight`` end to end: the real kubernetes client against a loopback stand-in for
the API server (tests/preflight/api_stub.py) holding the objects a cluster would, the real S3
test server, and the CLI's help and its answer when there is no cluster."""
import base64
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from api_stub import StubApiServer
from objects import configmap, crd, deployment, torch_runtime
from kubeseg.preflight import FAIL, OK, PreflightOptions, format_report, run_preflight
from kubeseg.preflight import rbac
from kubeseg.preflight.reads import ClusterReader

REPO = Path(__file__).resolve().parents[2]
NS = "kubeflow-user"
EDITOR = f"system:serviceaccount:{NS}:default-editor"
kubernetes = pytest.importorskip("kubernetes")


def gpu_node():
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": "gpu-1", "labels": {"kubeseg.io/node-pool": "gpu"}},
            "spec": {"taints": [{"key": "nvidia.com/gpu", "value": "present",
                                 "effect": "NoSchedule"}]},
            "status": {"allocatable": {"nvidia.com/gpu": "2"},
                       "conditions": [{"type": "Ready", "status": "True"}]}}


def storage_secret(s3_env):
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": "kubeseg-storage", "namespace": NS, "annotations": {
                "serving.kserve.io/s3-endpoint": s3_env["KUBESEG_S3_ENDPOINT"][len("http://"):],
                "serving.kserve.io/s3-usehttps": "0"}},
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in s3_env.items()}}


def cluster_objects(s3_env):
    """A cluster set up as the README says: Kubeflow Pipelines 2.15 (multi-user), Trainer
    v2.3 with its runtime, KServe 0.20 in Knative mode with the GPU flags on, Katib 0.18, one
    GPU node, the storage Secret and kubeseg's manifests applied."""
    api = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/"
    account = yaml.safe_load((REPO / "manifests/base/predictor-serviceaccount.yaml").read_text())
    return {
        "/version": {"major": "1", "minor": "33", "gitVersion": "v1.33.1"},
        "/api/v1/namespaces/kubeflow/services/ml-pipeline:8888/proxy/apis/v2beta1/healthz":
            {"commit_sha": "abc", "tag_name": "2.15.0", "multi_user": True},
        api + "trainjobs.trainer.kubeflow.org":
            crd("trainjobs", "trainer.kubeflow.org", "TrainJob", "v1alpha1"),
        api + "inferenceservices.serving.kserve.io":
            crd("inferenceservices", "serving.kserve.io", "InferenceService", "v1beta1"),
        api + "experiments.kubeflow.org":
            yaml.safe_load((REPO / "tests/schemas/katib-experiment.yaml").read_text()),
        "/api/v1/namespaces/kubeflow-system/configmaps/kubeflow-trainer-public":
            configmap("kubeflow-system", "kubeflow-trainer-public",
                      {"kubeflow_trainer_version": "v2.3.0"}),
        "/apis/trainer.kubeflow.org/v1alpha1/clustertrainingruntimes/torch-distributed":
            torch_runtime(),
        "/apis/apps/v1/namespaces/kserve/deployments/kserve-controller-manager":
            deployment("kserve", "kserve-controller-manager", "kserve/kserve-controller:v0.20.0"),
        "/api/v1/namespaces/kserve/configmaps/inferenceservice-config":
            configmap("kserve", "inferenceservice-config", {
                "deploy": '{"defaultDeploymentMode": "Serverless"}',
                "credentials": '{"s3": {"s3AccessKeyIDName": "AWS_ACCESS_KEY_ID", '
                               '"s3SecretAccessKeyName": "AWS_SECRET_ACCESS_KEY"}}'}),
        "/api/v1/namespaces/knative-serving/configmaps/config-features":
            configmap("knative-serving", "config-features",
                      {"kubernetes.podspec-nodeselector": "enabled",
                       "kubernetes.podspec-tolerations": "enabled"}),
        "/apis/apps/v1/namespaces/kubeflow/deployments/katib-controller":
            deployment("kubeflow", "katib-controller",
                       "ghcr.io/kubeflow/katib/katib-controller:v0.18.0"),
        "/api/v1/nodes": {"apiVersion": "v1", "kind": "NodeList", "items": [gpu_node()]},
        f"/api/v1/namespaces/{NS}/secrets/kubeseg-storage": storage_secret(s3_env),
        f"/api/v1/namespaces/{NS}/serviceaccounts/kubeseg-predictor": account,
    }


def shipped_rules():
    """The rules kubeseg's Role grants the step account once its manifests are applied."""
    return [rule for role in rbac.roles(REPO / "manifests") for rule in role["rules"]]


def preflight(stub, tmp_path, **options):
    from kubernetes import config

    api_client = config.new_client_from_config(config_file=str(stub.kubeconfig(
        tmp_path / "kubeconfig")))
    return run_preflight(PreflightOptions(**options), ClusterReader.connect(api_client))


def test_a_ready_cluster_passes_every_check_reading_only(tmp_path, s3_server, bucket):
    from kubeseg.config import PipelineParameters

    params = PipelineParameters(output_root=f"{bucket}/runs", serving_gpus=1)
    with StubApiServer(cluster_objects(s3_server.env()), rules={EDITOR: shipped_rules()}) as stub:
        checks = preflight(stub, tmp_path, parameters=params)
    report = format_report(checks)
    assert [c.status for c in checks] == [OK] * len(checks), report
    assert [c.name for c in checks] == [
        "KFP API", "training jobs", "training runtime", "KServe", "KServe mode", "Knative flags",
        "Katib", "GPU nodes", "storage Secret", "KServe S3 access", "predictor account",
        "S3 access", "step permissions"]
    assert "Kubeflow Trainer 2.3.0" in report and "KServe 0.20.0" in report
    methods = {(method, path) for method, path, _ in stub.requests if method != "GET"}
    assert methods == {("POST", "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews")}
    reviews = [h for m, _, h in stub.requests if m == "POST"]
    assert len(reviews) == len(rbac.required_access(REPO / "manifests"))
    assert {h.get("Impersonate-User") for h in reviews} == {EDITOR}


def test_a_cluster_that_would_refuse_kubeseg_fails_naming_each_fix(tmp_path, s3_server, bucket):
    from kubeseg.config import PipelineParameters

    objects = cluster_objects({**s3_server.env(), "AWS_SECRET_ACCESS_KEY": "wrong"})
    objects["/api/v1/namespaces/knative-serving/configmaps/config-features"]["data"] = {}
    rules = [r for r in shipped_rules() if "trainjobs" not in r["resources"]]
    params = PipelineParameters(output_root=f"{bucket}/runs", serving_gpus=1, num_nodes=2,
                                gpus_per_node=2)
    with StubApiServer(objects, rules={EDITOR: rules}) as stub:
        checks = {c.name: c for c in preflight(stub, tmp_path, parameters=params)}
    assert checks["Knative flags"].status == FAIL
    assert checks["S3 access"].status == FAIL and "SignatureDoesNotMatch" in \
        checks["S3 access"].found
    permissions = checks["step permissions"]
    assert permissions.status == FAIL
    assert "may not: get/list/watch/create/delete trainjobs.trainer.kubeflow.org" in \
        permissions.found
    assert checks["GPU nodes"].status == FAIL  # one node of 2 GPUs: one training pod of 2
    assert "too few for distributed training: 2 pod(s) of 2" in checks["GPU nodes"].found
    assert {c.status for n, c in checks.items()
            if n not in ("Knative flags", "S3 access", "step permissions", "GPU nodes")} == {OK}


def test_forbidden_reads_are_said_not_guessed(tmp_path):
    objects = {"/version": {"gitVersion": "v1.33.1"}}
    forbidden = ["/api/v1/nodes", f"/api/v1/namespaces/{NS}/secrets/kubeseg-storage",
                 "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/"
                 "inferenceservices.serving.kserve.io", "/apis/serving.kserve.io"]
    with StubApiServer(objects, forbidden=forbidden, impersonation=False) as stub:
        checks = {c.name: c for c in preflight(stub, tmp_path, namespace=NS)}
    assert checks["GPU nodes"].status == "warn" and "403" in checks["GPU nodes"].found
    assert checks["storage Secret"].status == "warn"
    assert checks["KServe"].status == "warn" and "cannot tell" in checks["KServe"].found
    assert checks["step permissions"].status == "warn"
    assert "impersonate" in checks["step permissions"].found


def token_file(path, claims):
    """A service account token as a pod gets it: a JWT whose payload names the account."""
    import json

    def part(data):
        return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")

    path.write_text(".".join([part({"alg": "RS256"}), part(claims), "signature"]))
    return str(path)


def test_in_a_pod_running_as_the_step_account_the_reviews_are_its_own(tmp_path):
    from kubernetes import config

    from kubeseg.preflight.reads import pod_user

    token = token_file(tmp_path / "token", {"sub": EDITOR, "iss": "kubernetes"})
    assert pod_user(token) == EDITOR and pod_user(str(tmp_path / "none")) is None
    accesses = rbac.required_access(REPO / "manifests")
    with StubApiServer({"/version": {}}, rules={None: shipped_rules()}) as stub:
        api_client = config.new_client_from_config(config_file=str(stub.kubeconfig(
            tmp_path / "kubeconfig")))
        reader = ClusterReader.connect(api_client)
        reader.pod_token = token
        results, _ = reader.access_reviews(accesses, NS, EDITOR)
    assert all(allowed for _, allowed in results)
    assert not [h for m, _, h in stub.requests if m == "POST" and "Impersonate-User" in h]


# -- the CLI -------------------------------------------------------------------------------------
def kubeseg(*args, env=None):
    return subprocess.run([sys.executable, "-m", "kubeseg", *args], capture_output=True,
                          text=True, timeout=120, env=env)


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "KUBERNETES_SERVICE_HOST"}  # not a pod
    env.update(extra)
    return env


def test_help_says_what_it_reads_and_how_to_reach_the_services():
    result = kubeseg("preflight", "--help")
    assert result.returncode == 0, result.stderr
    for option in ("--namespace", "--kfp-host", "--s3-endpoint", "--parameters",
                   "--step-account", "--manifests"):
        assert option in result.stdout
    assert "it changes nothing" in result.stdout and "exits 1" in result.stdout


def test_no_kubeconfig_is_a_clear_error(tmp_path):
    result = kubeseg("preflight", env=clean_env(KUBECONFIG=str(tmp_path / "none")))
    assert result.returncode == 1
    assert result.stderr.startswith("kubeseg preflight: error: no Kubernetes cluster to check (")
    assert "set KUBECONFIG" in result.stderr and "Traceback" not in result.stderr


def test_an_api_server_that_does_not_answer_is_a_clear_error(tmp_path):
    from s3server import free_port

    config = tmp_path / "kubeconfig"
    config.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        f"clusters: [{{name: k, cluster: {{server: 'http://127.0.0.1:{free_port()}'}}}}]\n"
        "users: [{name: u, user: {token: t}}]\n"
        "contexts: [{name: c, context: {cluster: k, user: u}}]\n")
    result = kubeseg("preflight", env=clean_env(KUBECONFIG=str(config)))
    assert result.returncode == 1
    assert "did not answer GET /version" in result.stderr and "Traceback" not in result.stderr


def test_the_cli_prints_one_line_per_check_and_exits_1_on_a_failure(tmp_path, s3_server):
    objects = cluster_objects(s3_server.env())
    del objects[f"/api/v1/namespaces/{NS}/secrets/kubeseg-storage"]
    with StubApiServer(objects, rules={EDITOR: shipped_rules()}) as stub:
        env = clean_env(KUBECONFIG=str(stub.kubeconfig(tmp_path / "kubeconfig")))
        result = kubeseg("preflight", "--namespace", NS, env=env)
    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"kubeseg preflight: cluster {stub.url}, namespace {NS}"
    assert any(line.startswith("FAIL  storage Secret") for line in lines)
    assert any("kubectl create secret generic kubeseg-storage -n kubeflow-user" in line
               for line in lines)
    assert lines[-1].endswith("1 FAIL")


@pytest.mark.cluster
@pytest.mark.skipif(not os.environ.get("KUBECONFIG"),
                    reason="needs a Kubernetes cluster with Kubeflow: set KUBECONFIG (and "
                           "KUBESEG_PREFLIGHT_ARGS, e.g. '--namespace kubeflow-user "
                           "--kfp-host http://localhost:8080')")
def test_preflight_on_a_live_cluster():
    args = os.environ.get("KUBESEG_PREFLIGHT_ARGS", "").split()
    result = kubeseg("preflight", *args, env=dict(os.environ))
    assert result.returncode in (0, 1), result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("kubeseg preflight: cluster ")
    for name in ("KFP API", "KServe", "GPU nodes", "storage Secret", "step permissions"):
        assert any(name in line for line in lines), result.stdout
