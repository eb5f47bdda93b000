"""Every kustomize overlay renders; core objects pass kubernetes-validate --strict; custom
resources fit their CRD schemas; the GitOps pieces fit together."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import crd_schema  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = REPO / "manifests"
KUBECTL = "/usr/bin/kubectl"
K8S_VERSION = "1.32"
# What a user applies; serving/ (the shared InferenceService) and components/ (kustomize
# Components) are parts the overlays include.
PARTS = ("serving", "components/")
KUSTOMIZATIONS = sorted(path for path in (p.parent.relative_to(MANIFESTS).as_posix()
                                          for p in MANIFESTS.rglob("kustomization.yaml"))
                        if not path.startswith(PARTS))
CRD_SCHEMAS = {("serving.kserve.io", "InferenceService"): "inferenceservice.yaml",
               ("kubeflow.org", "PyTorchJob"): "pytorchjob.yaml"}

pytestmark = pytest.mark.skipif(not Path(KUBECTL).exists(), reason=f"{KUBECTL} not found")


def render(path: str):
    result = subprocess.run([KUBECTL, "kustomize", str(MANIFESTS / path)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, f"kubectl kustomize {path} failed:\n{result.stderr}"
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def test_every_layout_is_covered():
    assert {"base", "overlays/minio", "overlays/kfp-multi-user", "overlays/kfp-standalone",
            "overlays/serving-cpu", "overlays/serving-gpu", "overlays/retrain",
            "argocd"} <= set(KUSTOMIZATIONS)


def _declared_namespace(path: str):
    text = (MANIFESTS / path / "kustomization.yaml").read_text()
    return (yaml.safe_load(text) or {}).get("namespace")


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_overlay_renders_and_validates(path):
    import kubernetes_validate

    objects = render(path)
    assert objects, f"{path} renders nothing"
    for obj in objects:
        group = obj["apiVersion"].rpartition("/")[0]
        where = f"{path}: {obj['kind']} {obj['metadata'].get('name')}"
        if (group, obj["kind"]) in CRD_SCHEMAS:
            crd_schema.validate(obj, CRD_SCHEMAS[(group, obj["kind"])])
        elif group == "argoproj.io":
            _check_application(obj)
        else:
            try:
                kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
            except kubernetes_validate.ValidationError as exc:
                raise AssertionError(f"{where}: {exc.message} at {list(exc.absolute_path)}") \
                    from None
        if obj["kind"] != "Application" and _declared_namespace(path):
            assert obj["metadata"].get("namespace") == _declared_namespace(path), where


UPSTREAM_CRDS = {("serving.kserve.io", "InferenceService"):
                 "serving.kserve.io_inferenceservices.yaml",
                 ("argoproj.io", "Application"): "application-crd.yaml"}


def test_custom_resources_fit_the_full_upstream_crds():
    files = {key: crd_schema.upstream(name) for key, name in UPSTREAM_CRDS.items()}
    checked = []
    for path in KUSTOMIZATIONS:
        for obj in render(path):
            key = (obj["apiVersion"].rpartition("/")[0], obj["kind"])
            if key in files:
                crd_schema.validate(obj, files[key])
                checked.append(path)
    assert sorted(checked) == ["argocd", "overlays/serving-cpu", "overlays/serving-gpu"]


def _check_application(obj):
    # Structural checks of the Argo CD Application (its full CRD: the test above).
    assert obj["apiVersion"] == "argoproj.io/v1alpha1" and obj["kind"] == "Application"
    spec = obj["spec"]
    assert set(spec) <= {"project", "source", "destination", "syncPolicy"}
    assert set(spec["source"]) == {"repoURL", "targetRevision", "path"}
    assert (REPO / spec["source"]["path"] / "kustomization.yaml").is_file()
    assert spec["destination"]["namespace"] == "kubeflow-user"
    assert set(spec["syncPolicy"]["automated"]) <= {"prune", "selfHeal", "allowEmpty"}


def test_gpu_serving_requests_a_gpu_on_the_gpu_pool():
    from kubeseg.deploy import placement

    (isvc,) = [o for o in render("overlays/serving-gpu") if o["kind"] == "InferenceService"]
    predictor = isvc["spec"]["predictor"]
    assert predictor["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert predictor["nodeSelector"] == placement.DEFAULT_GPU_NODE_SELECTOR
    assert predictor["tolerations"] == [dict(t) for t in placement.DEFAULT_GPU_TOLERATIONS]
    (cpu,) = [o for o in render("overlays/serving-cpu") if o["kind"] == "InferenceService"]
    assert "nvidia.com/gpu" not in cpu["spec"]["predictor"]["containers"][0]["resources"]["limits"]


def test_serving_probes_name_their_port_and_promote_canaries():
    for overlay in ("overlays/serving-cpu", "overlays/serving-gpu"):
        (isvc,) = [o for o in render(overlay) if o["kind"] == "InferenceService"]
        predictor = isvc["spec"]["predictor"]
        container = predictor["containers"][0]
        port = container["ports"][0]["containerPort"]
        assert container["readinessProbe"]["httpGet"]["port"] == port, overlay
        assert predictor["canaryTrafficPercent"] == 100, overlay


@pytest.mark.parametrize("overlay,namespace,account", [
    ("overlays/kfp-multi-user", "kubeflow-user", "default-editor"),
    ("overlays/kfp-standalone", "kubeflow", "pipeline-runner")])
def test_rbac_binds_the_account_the_step_pods_run_as(overlay, namespace, account):
    objects = render(overlay)
    (role,) = [o for o in objects if o["kind"] == "Role"]
    (binding,) = [o for o in objects if o["kind"] == "RoleBinding"]
    rules = {(g, r): set(rule["verbs"]) for rule in role["rules"]
             for g in rule["apiGroups"] for r in rule["resources"]}
    assert {"create", "patch", "get", "watch"} <= rules[("serving.kserve.io",
                                                         "inferenceservices")]
    assert {"create", "delete", "get"} <= rules[("trainer.kubeflow.org", "trainjobs")]
    assert {"create", "delete", "get"} <= rules[("kubeflow.org", "pytorchjobs")]
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == namespace
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account,
                                    "namespace": namespace}]


def test_no_overlay_carries_a_secret():
    """Credentials are created once by the user; an Argo CD sync must never replace them."""
    for path in KUSTOMIZATIONS:
        kinds = {o["kind"] for o in render(path)}
        assert "Secret" not in kinds, f"{path} renders a Secret"


def test_minio_uses_the_storage_secret_and_takes_sidecar_less_clients():
    from kubeseg.deploy import placement

    objects = render("overlays/minio")
    (deployment,) = [o for o in objects if o["kind"] == "Deployment"]
    template = deployment["spec"]["template"]
    env = template["spec"]["containers"][0]["env"]
    assert {e["valueFrom"]["secretKeyRef"]["name"] for e in env} == {placement.STORAGE_SECRET}
    assert {e["valueFrom"]["secretKeyRef"]["key"] for e in env} <= set(
        placement.STORAGE_SECRET_KEYS)
    assert template["metadata"]["annotations"] == placement.NO_ISTIO_SIDECAR
    assert any(o["kind"] == "Service" and o["metadata"]["name"] == "minio" for o in objects)


def test_retraining_gates_against_the_champion_the_serving_overlays_serve():
    """The GitOps parameters name the champion a successful run promotes to; the gate reads
    <champion_uri>/metrics.json and the serving overlays serve <champion_uri>/model."""
    from kubeseg.engine.promote import MODEL_DIR, champion_metrics_uri
    from kubeseg_platform.pipelines.submit import pipeline_arguments

    (config,) = [o for o in render("overlays/retrain") if o["kind"] == "ConfigMap"]
    arguments = pipeline_arguments(yaml.safe_load(config["data"]["parameters.yaml"]))
    champion = arguments["champion_uri"]
    assert champion and not arguments.get("previous_metrics_uri")
    assert champion_metrics_uri(champion) == champion + "/metrics.json"
    for overlay in ("overlays/serving-cpu", "overlays/serving-gpu"):
        (isvc,) = [o for o in render(overlay) if o["kind"] == "InferenceService"]
        env = {e["name"]: e.get("value") for e in isvc["spec"]["predictor"]["containers"][0]["env"]}
        assert env["STORAGE_URI"] == f"{champion}/{MODEL_DIR}", overlay


def test_every_job_runs_without_the_istio_sidecar():
    """A pod with a classic Istio sidecar never completes (the proxy keeps running), so a Job
    in an injected profile namespace never finishes and the Argo CD Sync hook that is the
    retrain Job stays Running."""
    from kubeseg.deploy import placement

    jobs = [(path, o) for path in KUSTOMIZATIONS for o in render(path) if o["kind"] == "Job"]
    assert [path for path, _ in jobs] == ["overlays/retrain"]
    for path, job in jobs:
        annotations = job["spec"]["template"]["metadata"].get("annotations") or {}
        assert annotations.items() >= placement.NO_ISTIO_SIDECAR.items(), path


def test_retrain_job_submits_the_parameters_from_git(tmp_path):
    from kubeseg.cli import build_parser
    from kubeseg_platform.pipelines.submit import pipeline_arguments

    objects = render("overlays/retrain")
    (config,) = [o for o in objects if o["kind"] == "ConfigMap"]
    (job,) = [o for o in objects if o["kind"] == "Job"]
    assert config["metadata"]["name"].startswith("kubeseg-retrain-parameters-")  # hashed
    volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
    assert volumes["parameters"]["configMap"]["name"] == config["metadata"]["name"]
    assert job["metadata"]["annotations"]["argocd.argoproj.io/hook"] == "Sync"
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["kubeseg"]  # the trainer image has no ENTRYPOINT
    args = build_parser().parse_args(container["args"])
    assert args.verb == "submit"
    mount = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}["parameters"]
    assert args.parameters == f"{mount}/parameters.yaml"
    arguments = pipeline_arguments(yaml.safe_load(config["data"]["parameters.yaml"]))
    assert arguments["num_classes"] == 11
    # a change to parameters.yaml changes the ConfigMap's name, hence the Job
    import shutil

    copy = tmp_path / "manifests"
    shutil.copytree(MANIFESTS, copy)
    parameters = copy / "overlays/retrain/parameters.yaml"
    parameters.write_text(parameters.read_text().replace("epochs: 30", "epochs: 40"))
    changed = subprocess.run([KUBECTL, "kustomize", str(copy / "overlays/retrain")],
                             capture_output=True, text=True, timeout=120, check=True).stdout
    assert config["metadata"]["name"] not in changed


def _mebibytes(quantity: str) -> float:
    units = {"Ki": 2**-10, "Mi": 1, "Gi": 2**10, "Ti": 2**20}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return float(quantity[:-len(suffix)]) * factor
    return float(quantity) / 2**20  # bytes


def test_serving_pods_get_the_memory_the_server_defaults_need():
    """The request and limit of every serving overlay and of 'kubeseg deploy' hold the
    server's memory budget and its runtime (kubeseg.serving.defaults)."""
    from kubeseg.deploy.inference_service import ServingSpec
    from kubeseg.serving import defaults

    need = defaults.DEFAULT_POD_MEMORY_MIB
    assert need >= defaults.DEFAULT_MEMORY_BUDGET_MIB + defaults.RUNTIME_MEMORY_MIB
    for overlay in ("overlays/serving-cpu", "overlays/serving-gpu"):
        (isvc,) = [o for o in render(overlay) if o["kind"] == "InferenceService"]
        resources = isvc["spec"]["predictor"]["containers"][0]["resources"]
        for part in ("requests", "limits"):
            assert resources[part]["memory"] == defaults.SERVING_POD_MEMORY, (overlay, part)
    assert _mebibytes(defaults.SERVING_POD_MEMORY) >= need
    spec = ServingSpec(name="kubeseg", model_uri="s3://m/model")
    assert spec.memory == defaults.SERVING_POD_MEMORY
