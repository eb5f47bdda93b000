"""InferenceService objects: CPU, GPU and canary variants fit the KServe CRD schema; the
``kubeseg deploy --dry-run`` output parses and fits it; applying needs a live cluster."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from crd_schema import CRDValidationError, validate  # noqa: E402

from kubeseg.deploy.inference_service import (MODEL_MOUNT, ServingSpec,  # noqa: E402
                                              build_inference_service)
from kubeseg.images import configured  # noqa: E402
from kubeseg.errors import ConfigError  # noqa: E402

SCHEMA = "inferenceservice.yaml"
MODEL = "s3://models/camvid/run-7/model"


def _container(obj):
    (container,) = obj["spec"]["predictor"]["containers"]
    return container


def test_cpu_service_fits_schema():
    obj = build_inference_service(ServingSpec(
        "camvid", MODEL, namespace="team-a", service_account="s3-reader",
        storage_secret="minio-creds", cpu="4", memory="6Gi", min_replicas=1, max_replicas=3))
    validate(obj, SCHEMA)
    predictor = obj["spec"]["predictor"]
    container = _container(obj)
    assert obj["metadata"] == {"name": "camvid", "namespace": "team-a",
                               "labels": {"app.kubernetes.io/name": "kubeseg",
                                          "app.kubernetes.io/component": "predictor"}}
    assert container["image"] == configured().predictor
    assert container["imagePullPolicy"] == "Always"  # a tag can be pushed again
    assert {"name": "STORAGE_URI", "value": MODEL} in container["env"]
    assert container["args"][:2] == ["serve", MODEL_MOUNT]
    assert container["envFrom"] == [{"secretRef": {"name": "minio-creds"}}]
    assert container["resources"]["limits"] == {"cpu": "4", "memory": "6Gi"}
    assert "nvidia.com/gpu" not in container["resources"]["requests"]
    assert (predictor["minReplicas"], predictor["maxReplicas"]) == (1, 3)
    assert predictor["serviceAccountName"] == "s3-reader"
    assert "nodeSelector" not in predictor and "tolerations" not in predictor
    # Always set: a merge patch keeps an omitted field, so 100 is what promotes a canary.
    assert predictor["canaryTrafficPercent"] == 100
    # A probe port: KServe's RawDeployment mode copies the probe into a Deployment.
    assert container["readinessProbe"]["httpGet"]["port"] == container["ports"][0][
        "containerPort"]


def test_gpu_service_targets_gpu_node_pool():
    obj = build_inference_service(ServingSpec("camvid-gpu", MODEL, gpus=1))
    validate(obj, SCHEMA)
    predictor = obj["spec"]["predictor"]
    assert _container(obj)["image"] == configured().predictor_gpu  # CUDA PyTorch
    assert _container(obj)["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert predictor["nodeSelector"] == {"kubeseg.io/node-pool": "gpu"}
    assert predictor["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists",
                                         "effect": "NoSchedule"}]
    custom = build_inference_service(ServingSpec(
        "camvid-gpu", MODEL, gpus=2,
        node_selector={"cloud.google.com/gke-accelerator": "nvidia-l4"},
        tolerations=[{"key": "gpu", "operator": "Equal", "value": "true", "effect": "NoSchedule"}]))
    validate(custom, SCHEMA)
    assert custom["spec"]["predictor"]["nodeSelector"] == {
        "cloud.google.com/gke-accelerator": "nvidia-l4"}


def test_canary_service_fits_schema():
    obj = build_inference_service(ServingSpec("camvid", MODEL, canary_traffic_percent=10,
                                              max_pixels=4_000_000))
    validate(obj, SCHEMA)
    assert obj["spec"]["predictor"]["canaryTrafficPercent"] == 10
    assert _container(obj)["args"][-2:] == ["--max-pixels", "4000000"]


@pytest.mark.parametrize("gpus,canary", [(0, 100), (1, 10)])
def test_service_fits_the_full_upstream_crd(gpus, canary):
    from crd_schema import upstream

    obj = build_inference_service(ServingSpec(
        "camvid", MODEL, gpus=gpus, canary_traffic_percent=canary,
        service_account="s3-reader", storage_secret="minio-creds"))
    validate(obj, upstream("serving.kserve.io_inferenceservices.yaml"))


def test_schema_catches_mistakes():
    """The schema check is not vacuous: wrong types and unknown fields fail."""
    good = build_inference_service(ServingSpec("camvid", MODEL, canary_traffic_percent=10))
    bad = copy.deepcopy(good)
    bad["spec"]["predictor"]["canaryTrafficPercent"] = "ten"
    with pytest.raises(CRDValidationError, match="canaryTrafficPercent"):
        validate(bad, SCHEMA)
    bad = copy.deepcopy(good)
    bad["spec"]["predictor"]["minReplica"] = 1
    with pytest.raises(CRDValidationError, match="minReplica"):
        validate(bad, SCHEMA)
    bad = copy.deepcopy(good)
    _container(bad)["resources"]["limits"]["memory"] = "lots"
    with pytest.raises(CRDValidationError, match="memory"):
        validate(bad, SCHEMA)
    bad = copy.deepcopy(good)
    del _container(bad)["name"]
    with pytest.raises(CRDValidationError, match="name"):
        validate(bad, SCHEMA)
    bad = copy.deepcopy(good)
    bad["apiVersion"] = "serving.kubeflow.org/v1alpha2"
    with pytest.raises(CRDValidationError, match="serving.kserve.io"):
        validate(bad, SCHEMA)


@pytest.mark.parametrize("changes, key", [
    (dict(name="Camvid_1"), "name="), (dict(gpus=-1), "gpus="), (dict(cpu="two"), "cpu="),
    (dict(min_replicas=3, max_replicas=2), "max_replicas="),
    (dict(canary_traffic_percent=150), "canary_traffic_percent="),
])
def test_bad_arguments_name_the_parameter(changes, key):
    kwargs = dict(name="camvid", model_uri=MODEL)
    kwargs.update(changes)
    with pytest.raises(ConfigError, match=key):
        build_inference_service(ServingSpec(**kwargs))


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "kubeseg", "deploy", *args],
                          capture_output=True, text=True, timeout=120)


def test_dry_run_prints_valid_yaml():
    result = _cli(MODEL, "--name", "camvid", "--namespace", "team-a", "--gpus", "1",
                  "--toleration", "nvidia.com/gpu:NoSchedule", "--node-selector", "pool=gpu-l4",
                  "--canary-traffic-percent", "25", "--max-replicas", "4", "--dry-run")
    assert result.returncode == 0, result.stderr
    obj = yaml.safe_load(result.stdout)
    validate(obj, SCHEMA)
    predictor = obj["spec"]["predictor"]
    assert predictor["nodeSelector"] == {"pool": "gpu-l4"}
    assert predictor["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists",
                                         "effect": "NoSchedule"}]
    assert predictor["canaryTrafficPercent"] == 25 and predictor["maxReplicas"] == 4


def test_dry_run_reports_bad_option():
    result = _cli(MODEL, "--name", "camvid", "--canary-traffic-percent", "101", "--dry-run")
    assert result.returncode == 1
    assert "canary_traffic_percent=101" in result.stderr


@pytest.mark.cluster
@pytest.mark.skipif(not os.environ.get("KUBECONFIG"),
                    reason="needs a Kubernetes cluster with KServe: set KUBECONFIG (and "
                           "KUBESEG_TEST_MODEL_URI to a model artifact the cluster can read)")
def test_apply_to_live_cluster():
    from kubeseg.deploy.inference_service import apply_inference_service

    model = os.environ.get("KUBESEG_TEST_MODEL_URI", MODEL)
    obj = build_inference_service(ServingSpec(
        "kubeseg-test", model, namespace=os.environ.get("KUBESEG_TEST_NAMESPACE", "default"),
        cpu="1", memory="2Gi"))
    url = apply_inference_service(obj, timeout_s=900)
    assert url.startswith("http")


# -- what the released controllers do with it ---------------------------------------------------
def test_redeploying_a_gpu_model_on_cpu_leaves_the_gpu_node_pool():
    """Applying is a JSON merge patch (RFC 7386, what patch_namespaced_custom_object sends):
    a field the patch leaves out is kept, so the update names the absent ones with null."""
    from kubeseg.deploy.inference_service import merge_patch_body
    from upstream_rules import merge_patch

    gpu = build_inference_service(ServingSpec("camvid", MODEL, gpus=1))
    live = copy.deepcopy(gpu)  # as stored, with what the cluster adds
    live["metadata"].update(generation=3, resourceVersion="812")
    live["status"] = {"url": "http://camvid.team-a.example.com"}
    cpu = build_inference_service(ServingSpec("camvid", MODEL + "-v2"))
    updated = merge_patch(live, merge_patch_body(cpu))
    predictor = updated["spec"]["predictor"]
    assert "nodeSelector" not in predictor and "tolerations" not in predictor
    assert predictor["containers"] == cpu["spec"]["predictor"]["containers"]
    assert "nvidia.com/gpu" not in predictor["containers"][0]["resources"]["limits"]
    assert updated["spec"] == cpu["spec"]
    assert updated["status"] == live["status"]  # the patch touches only what kubeseg owns
    validate(updated, SCHEMA)
    # the object alone as the patch (what was sent before) keeps the GPU placement
    kept = merge_patch(live, cpu)["spec"]["predictor"]
    assert kept["nodeSelector"] == {"kubeseg.io/node-pool": "gpu"} and kept["tolerations"]
    # and an account dropped on redeploy goes too
    no_account = build_inference_service(ServingSpec("camvid", MODEL, service_account=None))
    assert "serviceAccountName" not in merge_patch(live, merge_patch_body(no_account))[
        "spec"]["predictor"]


def test_deploy_uses_the_pipelines_predictor_account_by_default():
    from kubeseg.config import PipelineParameters

    account = PipelineParameters().predictor_service_account
    assert account == "kubeseg-predictor"  # manifests/base/predictor-serviceaccount.yaml
    obj = build_inference_service(ServingSpec("camvid", MODEL))
    assert obj["spec"]["predictor"]["serviceAccountName"] == account
    result = _cli(MODEL, "--name", "camvid", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["spec"]["predictor"]["serviceAccountName"] == account
    result = _cli(MODEL, "--name", "camvid", "--service-account", "", "--dry-run")
    assert "serviceAccountName" not in yaml.safe_load(result.stdout)["spec"]["predictor"]


def test_gpu_serving_in_serverless_mode_names_the_knative_flags_it_needs():
    """knative/serving config/core/configmaps/features.yaml at knative-v1.15.2 to v1.22.0:
    kubernetes.podspec-nodeselector and kubernetes.podspec-tolerations, both "disabled"."""
    from kubeseg.deploy.inference_service import knative_flags_command, serving_notes
    from upstream_rules import merge_patch

    flags = ("kubernetes.podspec-nodeselector", "kubernetes.podspec-tolerations")
    for spec in (ServingSpec("camvid", MODEL, gpus=1),
                 ServingSpec("camvid", MODEL, gpus=1, deployment_mode="Knative"),
                 ServingSpec("camvid", MODEL, node_selector={"pool": "big"})):
        (note,) = serving_notes(spec)
        assert all(flag in note for flag in flags) and knative_flags_command() in note
    assert serving_notes(ServingSpec("camvid", MODEL)) == []
    assert serving_notes(ServingSpec("camvid", MODEL, gpus=1,
                                     deployment_mode="RawDeployment")) == []
    # the command's patch, applied to the released ConfigMap's data, enables both
    command = knative_flags_command()
    assert command.startswith("kubectl patch configmap config-features -n knative-serving "
                              "--type merge -p ")
    patch = json.loads(command.split(" -p ", 1)[1].strip("'"))
    released = {"data": {flag: "disabled" for flag in flags}}
    assert merge_patch(released, patch) == {"data": {flag: "enabled" for flag in flags}}
    result = _cli(MODEL, "--name", "camvid", "--gpus", "1", "--dry-run")
    assert result.returncode == 0 and "kubernetes.podspec-tolerations" in result.stderr
    assert "kubernetes.podspec" not in _cli(MODEL, "--name", "camvid", "--dry-run").stderr


def test_a_canary_in_raw_deployment_mode_is_refused_naming_the_mode():
    """kserve/kserve v0.15.0..v0.20.0: only the Knative reconciler reads canaryTrafficPercent."""
    from kubeseg.deploy.inference_service import canary_problem, live_mode

    for mode in ("RawDeployment", "Standard"):
        with pytest.raises(ConfigError) as info:
            build_inference_service(ServingSpec("camvid", MODEL, canary_traffic_percent=10,
                                                deployment_mode=mode))
        assert f"in {mode} mode" in str(info.value) and "Serverless" in str(info.value)
    raw = build_inference_service(ServingSpec("camvid", MODEL, deployment_mode="Standard"))
    assert raw["metadata"]["annotations"] == {"serving.kserve.io/deploymentMode":
                                              "RawDeployment"}
    validate(raw, SCHEMA)
    canary = build_inference_service(ServingSpec("camvid", MODEL, canary_traffic_percent=10,
                                                 deployment_mode="Knative"))
    assert canary["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Serverless"
    assert "annotations" not in build_inference_service(ServingSpec("camvid", MODEL))["metadata"]
    # an existing InferenceService, as KServe's defaulting webhook (annotation) and 0.16+'s
    # controller (status.deploymentMode) record its mode, decides a redeployment
    standard = {"metadata": {"annotations": {"serving.kserve.io/deploymentMode": "Standard"}}}
    legacy = {"metadata": {}, "status": {"deploymentMode": "RawDeployment"}}
    knative = {"metadata": {"annotations": {"serving.kserve.io/deploymentMode": "Knative"}}}
    assert live_mode(standard) == live_mode(legacy) == "RawDeployment"
    assert live_mode(knative) == "Serverless" and live_mode({"metadata": {}}) is None
    assert canary_problem(10, live_mode(standard))
    assert canary_problem(100, live_mode(standard)) is None
    assert canary_problem(10, live_mode(knative)) is None
    result = _cli(MODEL, "--name", "camvid", "--canary-traffic-percent", "10",
                  "--deployment-mode", "RawDeployment", "--dry-run")
    assert result.returncode == 1 and "canary_traffic_percent=10" in result.stderr


def _isvc_status(*, ready="True", created=None, serving=None, observed=1, mode=None):
    """status as KServe writes it (inference_service_status.go): duckv1 conditions, the
    Knative Service's or Deployment's observedGeneration, per-component revisions."""
    status = {"observedGeneration": observed,
              "conditions": [{"type": "PredictorReady", "status": ready},
                             {"type": "Ready", "status": ready,
                              **({} if ready == "True" else {"reason": "RevisionMissing"})}],
              "url": "http://camvid.team-a.example.com"}
    if created:
        status["components"] = {"predictor": {"latestCreatedRevision": created,
                                              "latestReadyRevision": serving}}
    if mode:
        status["deploymentMode"] = mode
    return {"metadata": {"name": "camvid", "generation": 7}, "status": status}


def test_readiness_follows_what_kserve_sets_not_the_generation_counter():
    from kubeseg.deploy.inference_service import rollout_pending

    before = _isvc_status(created="camvid-predictor-00002", serving="camvid-predictor-00002",
                          observed=2)
    # a finished rollout: the Knative Service's observedGeneration (3) is not the
    # InferenceService's generation (7), which the old check waited for in vain
    done = _isvc_status(created="camvid-predictor-00003", serving="camvid-predictor-00003",
                        observed=3)
    assert done["status"]["observedGeneration"] < done["metadata"]["generation"]
    assert rollout_pending(done, before) is None
    assert rollout_pending(done) is None  # a first creation
    # status not yet touched by the update: still the previous revision's Ready
    assert "not acted" in rollout_pending(before, before)
    # the new revision exists but is not ready: traffic stays on the old one
    rolling = _isvc_status(created="camvid-predictor-00003", serving="camvid-predictor-00002",
                           observed=3)
    assert "camvid-predictor-00003 is not ready" in rollout_pending(rolling, before)
    failing = _isvc_status(ready="False", created="camvid-predictor-00003",
                           serving="camvid-predictor-00002", observed=3)
    assert "Ready is not True" in rollout_pending(failing, before)
    assert "RevisionMissing" in rollout_pending(failing, before)
    # RawDeployment: no revisions; the Deployment's observedGeneration shows the update landed
    raw_before = _isvc_status(observed=4, mode="Standard")
    raw_done = _isvc_status(observed=5, mode="Standard")
    assert rollout_pending(raw_done, raw_before) is None
    assert rollout_pending(raw_before, raw_before) is not None
