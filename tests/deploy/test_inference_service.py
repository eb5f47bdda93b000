"""InferenceService objects: CPU, GPU and canary variants fit the KServe CRD schema; the
``kubeseg deploy --dry-run`` output parses and fits it; applying needs a live cluster."""
from __future__ import annotations

import copy
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
