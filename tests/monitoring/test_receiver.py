"""The retraining webhook: what each Alertmanager notification does (one run per drift
episode, a cool-down, nothing for other alerts), its HTTP answers, its state across restarts,
and ``kubeseg retrain-on-alert`` end to end.

Where a run is submitted, the request crosses the KFP boundary through the real ``kfp.Client``
to a stand-in of the KFP API on 127.0.0.1 that records it (tests/kfp_api.py: no KFP server
can run here), or, with ``--dry-run``, is written as the submission it would make."""
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from kubeseg.errors import ConfigError, DataError
from kubeseg.monitoring.alerts import CLASS_SHIFT_ALERT, LOW_CONFIDENCE_ALERT
from kubeseg.monitoring.receiver import (PayloadError, RetrainReceiver, build_server,
                                         parse_request)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kfp_api import KfpApiStandIn  # noqa: E402
from testkit import stop_process  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
GROUP = '{}/{kubeseg_drift="true"}:{model="kubeseg"}'


def alert(name=CLASS_SHIFT_ALERT, status="firing", starts="2026-12-05T06:00:00Z", **labels):
    return {"status": status, "startsAt": starts, "endsAt": "0001-01-01T00:00:00Z",
            "labels": {"alertname": name, "model": "kubeseg", "kubeseg_drift": "true",
                       "namespace": "kubeflow-user", **labels},
            "annotations": {"summary": f"{name} summary"}, "generatorURL": "",
            "fingerprint": name}


def payload(*alerts, group=GROUP, status="firing"):
    return {"version": "4", "groupKey": group, "truncatedAlerts": 0, "status": status,
            "receiver": "kubeseg-retrain-on-alert", "groupLabels": {"model": "kubeseg"},
            "commonLabels": {}, "commonAnnotations": {}, "externalURL": "http://am",
            "alerts": list(alerts)}


class Clock:
    def __init__(self):
        self.now = 1_000_000.0

    def __call__(self):
        return self.now


class Submissions(list):
    """The submitter a test hands the receiver: records each request, answers a run id."""

    fail = False

    def __call__(self, request):
        if self.fail:
            raise RuntimeError("KFP API unreachable")
        self.append(request)
        return f"run-{len(self)}"


def test_a_request_names_the_episode_the_alerts_and_their_shared_labels():
    request = parse_request(payload(alert(starts="2026-12-05T06:10:00Z"),
                                    alert(LOW_CONFIDENCE_ALERT, starts="2026-12-05T06:00:00Z"),
                                    alert("SomethingElse")), now=0)
    assert request.alerts == (CLASS_SHIFT_ALERT, LOW_CONFIDENCE_ALERT)
    assert request.episode == "2026-12-05T06:00:00Z"  # the earliest
    assert request.labels == {"model": "kubeseg", "kubeseg_drift": "true",
                              "namespace": "kubeflow-user"}
    assert request.run_name == "kubeseg-drift-19700101-000000"
    assert "KubesegClassShift summary" in request.reason
    assert parse_request(payload(alert(status="resolved"), alert("Other"))) is None


@pytest.mark.parametrize("body, field", [
    ([], "JSON object"), ({"alerts": []}, "groupKey"), ({"groupKey": "g"}, "alerts"),
    ({"groupKey": "g", "alerts": [{"labels": None}]}, "alerts[0].labels"),
    ({"groupKey": "g", "alerts": [{"status": "firing", "labels": {"alertname":
                                                                    CLASS_SHIFT_ALERT}}]},
     "alerts[0].startsAt")])
def test_a_malformed_notification_is_named(body, field):
    with pytest.raises(PayloadError, match=field.replace("[", r"\[").replace("]", r"\]")):
        parse_request(body)


def test_one_run_per_episode_then_a_cool_down():
    clock, runs = Clock(), Submissions()
    receiver = RetrainReceiver(runs, cooldown_s=3600, clock=clock)
    first = receiver.handle(payload(alert()))
    assert (first.action, first.run) == ("submitted", "run-1") and len(runs) == 1
    # Alertmanager repeats the notification, and again when another drift alert joins
    clock.now += 600
    assert receiver.handle(payload(alert())).action == "duplicate"
    assert receiver.handle(payload(alert(), alert(LOW_CONFIDENCE_ALERT,
                                                  starts="2026-12-05T07:00:00Z"))).action \
        == "duplicate"
    # another model's group fires within the cool-down: logged, no run
    other = payload(alert(model="other"), group="other-group")
    cooling = receiver.handle(other)
    assert cooling.action == "cooling-down" and "may start in 3000 s" in cooling.reason
    # the drift resolved and came back within the cool-down: still one run
    assert receiver.handle(payload(alert(starts="2026-12-05T08:00:00Z"))).action == \
        "cooling-down"
    clock.now += 3600
    assert receiver.handle(other).action == "submitted" and len(runs) == 2
    assert receiver.handle(payload(alert("NodeDown"))).action == "ignored"
    assert len(runs) == 2


def test_a_failed_submission_is_answered_503_and_retried(tmp_path):
    runs = Submissions()
    runs.fail = True
    receiver = RetrainReceiver(runs, cooldown_s=3600, clock=Clock())
    server = build_server(receiver, "127.0.0.1", 0)
    import threading

    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        status, body = _post(url + "/alerts", payload(alert()))
        assert status == 503 and "KFP API unreachable" in body["reason"]
        runs.fail = False  # Alertmanager sends it again
        status, body = _post(url + "/alerts", payload(alert()))
        assert (status, body["action"], body["run"]) == (200, "submitted", "run-1")
        assert _post(url + "/alerts", payload(alert()))[1]["action"] == "duplicate"
        assert _post(url + "/alerts", b"{", raw=True)[0] == 400
        status, body = _post(url + "/alerts", {"alerts": []})
        assert status == 400 and "groupKey" in body["error"]
        assert _post(url + "/alerts", payload(alert()), kind="text/plain")[0] == 415
        assert _post(url + "/nowhere", payload(alert()))[0] == 404
        assert _post(url + "/alerts", b"x" * (2 << 20), raw=True)[0] == 413
        with urllib.request.urlopen(url + "/healthz", timeout=10) as response:
            assert json.loads(response.read()) == {"status": "ok"}
    finally:
        server.shutdown()
        server.server_close()
    assert len(runs) == 1


def _post(url, body, raw=False, kind="application/json"):
    data = body if raw else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="POST",
                                     headers={"Content-Type": kind})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def test_the_state_survives_a_restart(tmp_path):
    state = tmp_path / "state.json"
    clock, runs = Clock(), Submissions()
    RetrainReceiver(runs, cooldown_s=60, state_uri=str(state), clock=clock).handle(
        payload(alert()))
    again = RetrainReceiver(runs, cooldown_s=60, state_uri=str(state), clock=clock)
    assert again.handle(payload(alert())).action == "duplicate"
    assert again.handle(payload(alert(model="b"), group="b")).action == "cooling-down"
    assert len(runs) == 1
    state.write_text("{not json")
    with pytest.raises(DataError, match="state.json is not a state this receiver wrote"):
        RetrainReceiver(runs, state_uri=str(state))


def test_retraining_keeps_the_champion_gate(tmp_path):
    from kubeseg_platform.pipelines.submit import gated_parameters

    params = tmp_path / "params.yaml"
    params.write_text("num_classes: 3\nnum_training_samples: 4\nchampion_uri: ''\n")
    with pytest.raises(ConfigError, match="needs the champion gate"):
        gated_parameters(str(params))
    params.write_text("num_classes: 3\nnum_training_samples: 4\nchampion_uri: ''\n"
                      "previous_metrics_uri: s3://m/metrics.json\n")
    assert gated_parameters(str(params))["previous_metrics_uri"] == "s3://m/metrics.json"
    params.write_text("num_classes: 3\nnum_training_samples: 4\n")  # the declared default
    assert "champion_uri" not in gated_parameters(str(params))


# -- the CLI, end to end -------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_receiver(tmp_path, *args):
    port = _free_port()
    log = open(tmp_path / "receiver.log", "w")
    process = subprocess.Popen([sys.executable, "-m", "kubeseg", "retrain-on-alert",
                                "--port", str(port), *args], stdout=log,
                               stderr=subprocess.STDOUT, cwd=tmp_path)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url + "/healthz", timeout=2).read()
            return process, url
        except OSError:
            if process.poll() is not None:
                break
            time.sleep(0.2)
    process.kill()
    raise AssertionError((tmp_path / "receiver.log").read_text())


def test_cli_submits_one_run_with_the_champion_gate_through_the_kfp_client(tmp_path):
    """The real kfp.Client sends the run to the KFP API stand-in, which records it."""
    params = tmp_path / "params.yaml"
    params.write_text("num_classes: 11\nnum_training_samples: 367\nmin_miou: 0.55\n"
                      "champion_uri: s3://kubeseg/models/champion\n")
    with KfpApiStandIn() as kfp_api:
        process, url = _start_receiver(tmp_path, "--host", kfp_api.url, "--parameters",
                                       str(params), "--namespace", "kubeflow-user",
                                       "--state", str(tmp_path / "state.json"))
        try:
            status, body = _post(url + "/alerts", payload(alert()))
            assert (status, body["action"]) == (200, "submitted"), body
            assert _post(url + "/alerts", payload(alert()))[1]["action"] == "duplicate"
        finally:
            stop_process(process)
        (run,) = kfp_api.runs()
    assert run.body["display_name"].startswith("kubeseg-drift-")
    assert run.body["experiment_id"] == "experiment-1"
    parameters = run.body["runtime_config"]["parameters"]
    assert parameters["champion_uri"] == "s3://kubeseg/models/champion"
    assert parameters["num_classes"] == 11 and parameters["min_miou"] == 0.55
    assert run.body["pipeline_spec"]["pipeline_spec"]["pipelineInfo"]["name"] == \
        "kubeseg-segmentation"
    experiments = [r for r in kfp_api.requests if r.path == "/apis/v2beta1/experiments"
                   and r.method == "POST"]
    assert experiments[0].body == {"display_name": "kubeseg-drift",
                                   "namespace": "kubeflow-user"}
    log = (tmp_path / "receiver.log").read_text()
    assert "submitted (KubesegClassShift firing" in log and "duplicate" in log


def test_cli_dry_run_writes_the_submission_and_refuses_bad_parameters(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("num_classes: 11\nnum_training_samples: 367\n")
    process, url = _start_receiver(tmp_path, "--dry-run", str(tmp_path / "runs"),
                                   "--parameters", str(params), "--cooldown", "1h")
    try:
        status, body = _post(url + "/alerts", payload(alert(LOW_CONFIDENCE_ALERT)))
        assert (status, body["action"]) == (200, "submitted"), body
    finally:
        stop_process(process)
    (written,) = (tmp_path / "runs").glob("kubeseg-drift-*.json")
    record = json.loads(written.read_text())
    assert record["arguments"] == {"num_classes": 11, "num_training_samples": 367}
    assert record["alerts"] == [LOW_CONFIDENCE_ALERT] and record["group_key"] == GROUP
    assert record["experiment"] == "kubeseg-drift"
    params.write_text("num_classes: 300\nnum_training_samples: 367\nchampion_uri: ''\n")
    result = subprocess.run([sys.executable, "-m", "kubeseg", "retrain-on-alert",
                             "--parameters", str(params), "--dry-run", str(tmp_path / "x"),
                             "--cooldown", "soon"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1 and "--cooldown 'soon'" in result.stderr
    result = subprocess.run([sys.executable, "-m", "kubeseg", "retrain-on-alert",
                             "--parameters", str(params)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1 and "--host is required" in result.stderr
    result = subprocess.run([sys.executable, "-m", "kubeseg", "retrain-on-alert",
                             "--parameters", str(params), "--dry-run", str(tmp_path / "x")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "num_classes=300" in result.stderr
    assert yaml.safe_load(params.read_text())["champion_uri"] == ""
