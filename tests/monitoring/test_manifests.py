"""The monitoring components: the serving overlays render with components/monitoring and the
retrain overlay with components/retrain-on-alert; the prometheus-operator objects fit the full
upstream CRDs, core objects pass kubernetes-validate --strict; the rule is the Python module's;
the pieces point at each other (pods, ports, the webhook's URL, the parameters)."""
import shutil
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
MONITORING_CRDS = {"PrometheusRule": "monitoring.coreos.com_prometheusrules.yaml",
                   "PodMonitor": "monitoring.coreos.com_podmonitors.yaml",
                   "AlertmanagerConfig": "monitoring.coreos.com_alertmanagerconfigs.yaml"}

pytestmark = pytest.mark.skipif(not Path(KUBECTL).exists(), reason=f"{KUBECTL} not found")


@pytest.fixture(scope="module")
def with_components(tmp_path_factory):
    """A copy of manifests/ whose serving overlays include components/monitoring and whose
    retrain overlay includes components/retrain-on-alert, as docs/monitoring.md says to."""
    root = tmp_path_factory.mktemp("manifests") / "manifests"
    shutil.copytree(MANIFESTS, root)
    for overlay, component in (("serving-cpu", "monitoring"), ("serving-gpu", "monitoring"),
                               ("retrain", "retrain-on-alert")):
        path = root / "overlays" / overlay / "kustomization.yaml"
        values = yaml.safe_load(path.read_text())
        values["components"] = [f"../../components/{component}", *values["components"]]
        path.write_text(yaml.safe_dump(values))
    return root


def render(root: Path, overlay: str):
    result = subprocess.run([KUBECTL, "kustomize", str(root / "overlays" / overlay)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"kubectl kustomize {overlay}:\n{result.stderr}"
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def one(objects, kind):
    (found,) = [o for o in objects if o["kind"] == kind]
    return found


@pytest.mark.parametrize("overlay", ["serving-cpu", "serving-gpu", "retrain"])
def test_overlays_render_with_the_components_and_validate(with_components, overlay):
    import kubernetes_validate

    objects = render(with_components, overlay)
    kinds = {o["kind"] for o in objects}
    expected = {"PodMonitor", "PrometheusRule", "AlertmanagerConfig"} if overlay != "retrain" \
        else {"Deployment", "Service", "Job", "ConfigMap"}
    assert expected <= kinds, kinds
    for obj in objects:
        where = f"{overlay}: {obj['kind']} {obj['metadata']['name']}"
        assert obj["metadata"]["namespace"] == "kubeflow-user", where
        if obj["kind"] in MONITORING_CRDS:
            crd_schema.validate(obj, crd_schema.upstream(MONITORING_CRDS[obj["kind"]]))
        elif obj["kind"] == "InferenceService":
            crd_schema.validate(obj, "inferenceservice.yaml")
        else:
            try:
                kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
            except kubernetes_validate.ValidationError as exc:
                raise AssertionError(f"{where}: {exc.message} at {list(exc.absolute_path)}") \
                    from None


def test_the_rule_in_the_manifests_is_the_python_modules():
    from kubeseg.monitoring import alerts

    text = (MANIFESTS / "components" / "monitoring" / "prometheusrule.yaml").read_text()
    assert yaml.safe_load(text) == alerts.prometheus_rule(), \
        "regenerate it: python -m kubeseg.monitoring.alerts > " \
        "manifests/components/monitoring/prometheusrule.yaml"
    assert text == alerts.prometheus_rule_yaml()


def test_the_pod_monitor_scrapes_the_predictor_container(with_components):
    objects = render(with_components, "serving-cpu")
    isvc, monitor = one(objects, "InferenceService"), one(objects, "PodMonitor")
    assert monitor["spec"]["selector"]["matchLabels"] == {
        "serving.kserve.io/inferenceservice": isvc["metadata"]["name"]}
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    container = isvc["spec"]["predictor"]["containers"][0]
    assert endpoint["portNumber"] == container["ports"][0]["containerPort"]
    assert endpoint["path"] == "/metrics"


def test_alertmanager_sends_the_drift_alerts_to_the_receiver(with_components):
    from kubeseg.monitoring import alerts
    from kubeseg.monitoring.receiver import ALERTS_PATH

    route = one(render(with_components, "serving-cpu"), "AlertmanagerConfig")["spec"]
    receiving = render(with_components, "retrain")
    service, deployment = one(receiving, "Service"), one(receiving, "Deployment")
    assert route["route"]["matchers"] == [{"name": alerts.DRIFT_LABEL, "value": "true"}]
    for group in alerts.rule_groups():
        for rule in group["rules"]:
            drift = rule["alert"] in alerts.DRIFT_ALERTS
            assert (rule["labels"].get(alerts.DRIFT_LABEL) == "true") == drift, rule["alert"]
    assert route["route"]["groupBy"] == ["model"]
    (webhook,) = route["receivers"][0]["webhookConfigs"]
    port = service["spec"]["ports"][0]["port"]
    assert webhook["url"] == (f"http://{service['metadata']['name']}."
                              f"{service['metadata']['namespace']}.svc:{port}{ALERTS_PATH}")
    template = deployment["spec"]["template"]
    assert service["spec"]["selector"].items() <= template["metadata"]["labels"].items()
    container = template["spec"]["containers"][0]
    assert container["ports"][0]["name"] == service["spec"]["ports"][0]["targetPort"]


def test_the_receiver_submits_the_retrain_overlays_parameters(with_components):
    from kubeseg.cli import build_parser

    objects = render(with_components, "retrain")
    config, deployment = one(objects, "ConfigMap"), one(objects, "Deployment")
    job = one(objects, "Job")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["image"] == job["spec"]["template"]["spec"]["containers"][0]["image"]
    assert container["image"].startswith("ghcr.io/kubeseg/trainer:")  # components/images
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["parameters"]["configMap"]["name"] == config["metadata"]["name"]
    args = build_parser().parse_args(container["args"])
    assert args.verb == "retrain-on-alert" and args.bind == "0.0.0.0"
    mount = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}["parameters"]
    assert args.parameters == f"{mount}/parameters.yaml"
    assert args.port == container["ports"][0]["containerPort"]
    assert args.namespace == deployment["metadata"]["namespace"]
    assert args.state.startswith("s3://")
    assert {"secretRef": {"name": "kubeseg-storage"}} in container["envFrom"]
    assert pod["serviceAccountName"] == job["spec"]["template"]["spec"]["serviceAccountName"]
    from kubeseg.deploy.placement import NO_ISTIO_SIDECAR

    assert deployment["spec"]["template"]["metadata"]["annotations"] == NO_ISTIO_SIDECAR
    from kubeseg_platform.pipelines.submit import gated_parameters

    path = with_components / "parameters.yaml"
    path.write_text(config["data"]["parameters.yaml"])
    assert gated_parameters(str(path))["champion_uri"]
