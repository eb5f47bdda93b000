"""The checks of the Kubeflow parts, on the upstream objects where they exist (the CRDs, the
torch-distributed runtime, KServe's and Knative's released ConfigMaps, found as
tests/crd_schema.py finds them) and on small objects written here that mirror the upstream
keys, so the logic is tested without those files too."""
import copy
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml

import crd_schema
from kubeseg import versions
from kubeseg.deploy.training_job import PYTORCHJOB, TRAINER_V2
from kubeseg.preflight import platform
from kubeseg.preflight.base import (FAIL, OK, WARN, api_served, crd_served_versions, failed,
                                    found, image_version, parse_version, versions_listing)
from kubeseg.preflight.reads import kfp_healthz
from objects import configmap, deployment, torch_runtime

KSERVE_RELEASES = ("v0.15.0", "v0.20.0")
KNATIVE_RELEASES = ("v1.15.2", "v1.21.1")


def upstream_yaml(filename):
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the full CRDs are large
    return yaml.load(crd_schema.upstream(filename).read_text(), Loader=loader)


def kserve_configmap(data):
    return configmap("kserve", "inferenceservice-config", data)


# -- Kubeflow Pipelines ---------------------------------------------------------------------------
def healthz(tag, multi_user=True):
    # The body KFP's API server writes (kubeflow/pipelines 2.5.0, backend/src/apiserver/main.go).
    return json.loads('{"commit_sha":"0123abc", "tag_name":"%s", "multi_user":%s}'
                      % (tag, "true" if multi_user else "false"))


def test_kfp_at_or_above_the_lowest_supported_backend_is_ok():
    lowest = versions.KFP_BACKEND_LOWEST
    check = platform.check_kfp(found(healthz(lowest)), "http://kfp", "kubeflow-user",
                               direct=True)
    assert check.status == OK and f"Kubeflow Pipelines {lowest} (multi-user)" in check.found


def test_kfp_below_the_lowest_supported_backend_fails_naming_it():
    check = platform.check_kfp(found(healthz("2.13.1")), "http://kfp", "kubeflow-user",
                               direct=True)
    assert check.status == FAIL and "older than 2.14.0" in check.found
    assert "2.14.0 or newer" in check.fix


def test_kfp_without_a_version_and_mode_mismatches_are_warnings():
    unknown = platform.check_kfp(found(healthz("unknown")), "http://kfp", "kubeflow-user",
                                 direct=True)
    assert unknown.status == WARN and "'unknown'" in unknown.found
    standalone = platform.check_kfp(found(healthz("2.15.0", multi_user=False)), "http://kfp",
                                    "kubeflow-user", direct=True)
    assert standalone.status == WARN and "its steps run in kubeflow" in standalone.found
    multi = platform.check_kfp(found(healthz("2.15.0")), "http://kfp", "kubeflow", direct=True)
    assert multi.status == WARN and "a profile namespace" in multi.found


def test_kfp_not_reached():
    refused = platform.check_kfp(failed(401, "Unauthorized"), "http://kfp", "ns", direct=True)
    assert refused.status == FAIL and "--kfp-token" in refused.fix
    down = platform.check_kfp(failed(None, "Connection refused"), "http://kfp", "ns", direct=True)
    assert down.status == FAIL and "port-forward" in down.fix
    proxied = platform.check_kfp(failed(403, "Forbidden"), "the API server", "ns", direct=False)
    assert proxied.status == WARN and "--kfp-host" in proxied.fix


@pytest.fixture
def kfp_server():
    """A loopback HTTP server answering GET /apis/v2beta1/healthz as KFP's API server does."""
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            if self.path != platform.KFP_HEALTHZ_PATH:
                self.send_error(404)
                return
            body = b'{"commit_sha":"abc", "tag_name":"2.14.3", "multi_user":false}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_kfp_healthz_over_http(kfp_server):
    answer = kfp_healthz(kfp_server, token="t")
    check = platform.check_kfp(answer, kfp_server, "kubeflow", direct=True)
    assert check.status == OK and "2.14.3 (standalone)" in check.found
    wrong = kfp_healthz(kfp_server + "/not-the-api", token=None)
    assert wrong.status == 404
    assert platform.check_kfp(wrong, kfp_server, "kubeflow", direct=True).status == FAIL


# -- CRDs -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("filename,api", [
    ("trainer.kubeflow.org_trainjobs.yaml", platform.TRAINJOB_API),
    ("kubeflow.org_pytorchjobs.yaml", platform.PYTORCHJOB_API),
    ("serving.kserve.io_inferenceservices.yaml", platform.INFERENCE_SERVICE_API)])
def test_the_upstream_crds_serve_the_versions_kubeseg_writes(filename, api):
    crd = upstream_yaml(filename)
    assert crd["metadata"]["name"] == api.crd_name
    assert api.version in crd_served_versions(crd)
    assert api_served(api, found(crd)) == (True, f"{api} served")
    stopped = copy.deepcopy(crd)
    for version in stopped["spec"]["versions"]:
        version["served"] = False
    served, text = api_served(api, found(stopped))
    assert served is False and f"not {api.version}" in text


def test_the_katib_experiment_crd_serves_v1beta1():
    crd = yaml.safe_load((crd_schema.SCHEMAS / "katib-experiment.yaml").read_text())
    assert api_served(platform.EXPERIMENT_API, found(crd))[0] is True


def test_a_crd_that_is_not_established_serves_nothing():
    crd = {"spec": {"versions": [{"name": "v1", "served": True}]},
           "status": {"conditions": [{"type": "Established", "status": "False"}]}}
    assert crd_served_versions(crd) == []


def test_api_discovery_decides_when_the_crd_cannot_be_read():
    api, forbidden = platform.PYTORCHJOB_API, failed(403, "Forbidden")
    listings = {"v1": {"kind": "APIResourceList", "groupVersion": "kubeflow.org/v1",
                       "resources": [{"name": "pytorchjobs"}, {"name": "pytorchjobs/status"}]},
                "v1beta1": {"kind": "APIResourceList", "resources": [{"name": "experiments"}]}}
    assert versions_listing("pytorchjobs", listings) == ["v1"]
    assert api_served(api, forbidden, versions_listing("pytorchjobs", listings))[0] is True
    assert api_served(api, forbidden, [])[0] is False
    assert api_served(api, forbidden, None)[0] is None
    assert api_served(api, failed(404, "Not Found"), None) == (False,
                                                               "no CRD pytorchjobs.kubeflow.org")


# -- distributed training -----------------------------------------------------------------------
SERVED = (True, "served")
MISSING = (False, "no CRD")


def trainer_public(version):
    # What the Trainer's kustomization generates (kubeflow/trainer v2.3.0,
    # manifests/overlays/manager/kustomization.yaml, configMapGenerator).
    return found(configmap("kubeflow-system", "kubeflow-trainer-public",
                           {"kubeflow_trainer_version": version}))


def test_training_operator_absent_fails_only_for_distributed_training():
    served = {TRAINER_V2: MISSING, PYTORCHJOB: MISSING}
    single = platform.check_training(TRAINER_V2, False, served, failed(404))
    assert single.status == WARN and "num_nodes > 1" in single.found
    distributed = platform.check_training(TRAINER_V2, True, served, failed(404))
    assert distributed.status == FAIL and "Kubeflow Trainer v2" in distributed.fix


def test_a_missing_trainer_points_to_the_training_operator_when_that_is_installed():
    check = platform.check_training(TRAINER_V2, True, {TRAINER_V2: MISSING, PYTORCHJOB: SERVED},
                                    failed(404))
    assert check.status == FAIL and "training_operator=pytorchjob" in check.fix
    check = platform.check_training(PYTORCHJOB, True, {TRAINER_V2: SERVED, PYTORCHJOB: SERVED},
                                    failed(404))
    assert check.status == OK and "1.9" in check.found


@pytest.mark.parametrize("version,status", [("v2.2.0", OK), ("v2.3.0", OK), ("v2.1.0", FAIL),
                                            ("v2.4.0", WARN)])
def test_trainer_version_from_its_public_configmap(version, status):
    served = {TRAINER_V2: SERVED, PYTORCHJOB: MISSING}
    check = platform.check_training(TRAINER_V2, True, served, trainer_public(version))
    assert check.status == status
    assert f"Kubeflow Trainer {version[1:]}" in check.found


def test_trainer_version_not_visible_is_said():
    check = platform.check_training(TRAINER_V2, True, {TRAINER_V2: SERVED, PYTORCHJOB: MISSING},
                                    failed(403, "Forbidden"))
    assert check.status == OK and "version not visible" in check.found


def test_the_upstream_torch_distributed_runtime_fits_kubeseg_trainjob():
    runtime = upstream_yaml("torch_distributed.yaml")
    assert platform.runtime_problems(runtime) == []
    assert platform.check_runtime("torch-distributed", found(runtime), True).status == OK


def test_a_runtime_kubeseg_trainjob_cannot_use_fails_saying_why():
    assert platform.runtime_problems(torch_runtime()) == []
    no_torch = torch_runtime()
    del no_torch["spec"]["mlPolicy"]["torch"]
    renamed = torch_runtime()
    renamed["spec"]["template"]["spec"]["replicatedJobs"][0]["name"] = "trainer"
    relabelled = torch_runtime()
    relabelled["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["metadata"] = {}
    assert "no torch policy" in platform.runtime_problems(no_torch)[0]
    assert "no replicated job 'node'" in platform.runtime_problems(renamed)[0]
    assert "not the trainer step" in platform.runtime_problems(relabelled)[0]
    check = platform.check_runtime("torch-distributed", found(renamed), True)
    assert check.status == FAIL and "training_runtime" in check.fix


def test_a_missingtorch_runtime():
    assert platform.check_runtime("torch-distributed", failed(404), True).status == FAIL
    assert platform.check_runtime("torch-distributed", failed(404), False).status == WARN
    unreadable = platform.check_runtime("torch-distributed", failed(403, "Forbidden"), True)
    assert unreadable.status == WARN and "403" in unreadable.found


# -- KServe and Knative --------------------------------------------------------------------------
@pytest.mark.parametrize("release", KSERVE_RELEASES)
def test_the_released_kserve_configmap_defaults_to_knative_mode(release):
    config = upstream_yaml(f"kserve-inferenceservice-config-{release}.yaml")
    assert config["metadata"]["name"] == platform.KSERVE_CONFIGMAP
    assert platform.deployment_mode(config) == (platform.KNATIVE,
                                                "default deployment mode Knative (Serverless)")
    check, mode = platform.check_kserve_mode(found(config))
    assert check.status == OK and mode == platform.KNATIVE


@pytest.mark.parametrize("written,mode", [("Serverless", platform.KNATIVE),
                                          ("Knative", platform.KNATIVE),
                                          ("RawDeployment", platform.STANDARD),
                                          ("Standard", platform.STANDARD),
                                          ("ModelMesh", platform.MODELMESH)])
def test_deployment_modes_old_and_new_names(written, mode):
    # The `deploy` key as KServe's ConfigMap writes it: {"defaultDeploymentMode": ...}.
    config = kserve_configmap({"deploy": json.dumps({"defaultDeploymentMode": written})})
    assert platform.deployment_mode(config)[0] == mode


def test_a_deploy_key_kserve_refuses_fails():
    for deploy in ('{"defaultDeploymentMode": "Raw"}', "not json"):
        check, mode = platform.check_kserve_mode(found(kserve_configmap({"deploy": deploy})))
        assert check.status == FAIL and mode is None
    check, mode = platform.check_kserve_mode(failed(403, "Forbidden"))
    assert check.status == WARN and mode is None and "kubectl get configmap" in check.fix


@pytest.mark.parametrize("release", KNATIVE_RELEASES)
def test_the_released_knative_features_disable_what_gpu_serving_needs(release):
    features = upstream_yaml(f"knative-config-features-{release}.yaml")
    assert features["metadata"]["name"] == platform.KNATIVE_FEATURES
    for flag in platform.GPU_SERVING_FLAGS:
        assert platform.knative_flag(features["data"], flag) == ("disabled", False)
        assert f'{flag}: "disabled"' in features["data"]["_example"]  # the documented default
    gpu = platform.check_knative_flags(platform.KNATIVE, found(features), gpu_serving=True)
    assert gpu.status == FAIL and "never becomes Ready" in gpu.found
    assert "kubernetes.podspec-nodeselector\":\"enabled" in gpu.fix
    cpu = platform.check_knative_flags(platform.KNATIVE, found(features), gpu_serving=False)
    assert cpu.status == WARN


def features(**flags):
    # config-features with the keys of knative/serving's config/core/configmaps/features.yaml.
    return found(configmap("knative-serving", "config-features",
                           {f"kubernetes.podspec-{k}": v for k, v in flags.items()}))


def test_knative_flags_enabled_or_allowed_in_any_case_are_ok():
    check = platform.check_knative_flags(platform.KNATIVE,
                                         features(nodeselector="Enabled", tolerations="allowed"),
                                         gpu_serving=True)
    assert check.status == OK
    assert check.found == ("kubernetes.podspec-nodeselector enabled, "
                           "kubernetes.podspec-tolerations allowed")


def test_an_unknown_flag_value_leaves_knative_default():
    check = platform.check_knative_flags(platform.KNATIVE,
                                         features(nodeselector="on", tolerations="enabled"),
                                         gpu_serving=True)
    assert check.status == FAIL and "nodeselector disabled (default)" in check.found


def test_knative_flags_do_not_matter_in_standard_mode_and_knative_must_exist_in_knative_mode():
    standard = platform.check_knative_flags(platform.STANDARD, failed(404), gpu_serving=True)
    assert standard.status == OK and "Standard" in standard.found
    missing = platform.check_knative_flags(platform.KNATIVE, failed(404), gpu_serving=False)
    assert missing.status == FAIL and "Knative Serving is not installed" in missing.found
    hidden = platform.check_knative_flags(platform.KNATIVE, failed(403, "Forbidden"), True)
    assert hidden.status == WARN


def test_controller_versions_from_image_tags():
    def version(image):
        return image_version(deployment("kubeflow", "controller", image))

    assert version("kserve/kserve-controller:v0.20.0") == (0, 20, 0)
    assert version("registry:5000/katib-controller:v0.18.0@sha256:ab") == (0, 18, 0)
    assert version("registry:5000/katib-controller") is None
    assert parse_version("v2.3.0-rc.1") == (2, 3, 0) and parse_version("latest") is None


def controller(image):
    return found(deployment("kubeflow", "controller", image))


def test_kserve_and_katib():
    kserve = platform.check_kserve(SERVED, controller("kserve/kserve-controller:v0.20.0"))
    assert kserve.status == OK and kserve.found.startswith("KServe 0.20.0")
    old = platform.check_kserve(SERVED, controller("kserve/kserve-controller:v0.14.1"))
    assert old.status == WARN and "0.15-0.20" in old.found
    assert platform.check_kserve(MISSING, failed(404)).status == FAIL
    katib = platform.check_katib(MISSING, failed(404))
    assert katib.status == WARN and "kubeseg tune" in katib.found
    katib = platform.check_katib(SERVED, controller("ghcr.io/kubeflow/katib/katib-controller:"
                                                    "v0.16.0"))
    assert katib.status == WARN and "0.17-0.18" in katib.found
