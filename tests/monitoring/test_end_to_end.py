"""The loop closed on one machine: the real server, a real Prometheus scraping it with the
drift rules loaded, a real Alertmanager, the retraining webhook and, at the KFP boundary (no
KFP server can run here), the stand-in of the KFP API that records what the real kfp.Client
sends (tests/kfp_api.py).

Images like the validation images first: the drift gauges fill, no alert fires, nothing is
submitted. Then overexposed images (a camera whose exposure failed): the class shift alert
fires, Alertmanager delivers it, and the webhook submits exactly one retraining run, with the
champion gate, however often the alert is evaluated and notified afterwards.

The model is a small random-weight FCN; its baseline is what the training baseline records,
counted the way validation counts it (the model's predicted classes and confidences on the
validation-like images; the random model's "training labels" are its own predictions). Short
intervals: a window of 4 images, scrapes and evaluations every second, ``for: 2s``, and a
class shift threshold of 0.1 for this model (the default thresholds are the promtool tests')."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml

from kubeseg.monitoring import alerts, drift

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kfp_api import KfpApiStandIn  # noqa: E402
from testkit import random_fcn, stop_process  # noqa: E402

PROMETHEUS = shutil.which("prometheus")
ALERTMANAGER = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    PROMETHEUS is None or ALERTMANAGER is None,
    reason="needs Debian's prometheus and prometheus-alertmanager (apt-get install prometheus "
           "prometheus-alertmanager)")]
WINDOW = 4
THRESHOLDS = drift.DriftThresholds(class_shift=0.1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(what: str, condition, timeout_s: float = 90.0, every_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"timed out waiting for {what}")


@contextmanager
def _process(command, log: Path, env=None):
    """A process in its own session, stopped by its PID (SIGTERM, then SIGKILL)."""
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True, env=env)
    try:
        yield process
    finally:
        stop_process(process, timeout_s=15)


def _http_up(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2).read()
        return True
    except OSError:
        return False


def _images(seed: int, count: int):
    from kubeseg.data.synthetic import make_sample

    rng = np.random.default_rng(seed)
    return [make_sample(rng, 48, 3)[0] for _ in range(count)]


def _overexposed(image):
    from PIL import Image

    return Image.fromarray(np.clip(np.asarray(image, dtype=np.int32) + 150, 0, 255)
                           .astype(np.uint8))


def _jpeg(image) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


@pytest.fixture(scope="module")
def model_with_baseline(tmp_path_factory):
    from kubeseg.artifact import ClassInfo, save_artifact
    from kubeseg.serving.predictor import Runtime, SegmentationPredictor

    model, hp = random_fcn(["background", "disc", "square"], crop_size=48)
    folder = tmp_path_factory.mktemp("e2e")
    plain = str(folder / "plain")
    save_artifact(plain, model=model, hyperparameters=hp,
                  classes=ClassInfo(names=["background", "disc", "square"]))
    predictor = SegmentationPredictor(plain, runtime=Runtime(device="cpu")).load()
    totals = drift.OutputCounts.empty(3)
    for image in _images(seed=100, count=8):
        pixels = np.asarray(image)
        logits = predictor.predict(predictor.preprocess(pixels)[None])
        counts = predictor.postprocess(logits, pixels.shape[:2], counts=True).counts
        totals.add(counts.class_pixels, counts.confidence_pixels)
    baseline = drift.TrainingBaseline(
        class_pixels=tuple(float(v) for v in totals.class_pixels), train_images=8,
        confidence_pixels=tuple(totals.confidence_pixels.tolist()),
        predicted_pixels=tuple(totals.class_pixels.tolist()), validation_images=8)
    uri = str(folder / "model")
    save_artifact(uri, model=model, hyperparameters=hp,
                  classes=ClassInfo(names=["background", "disc", "square"]),
                  baseline=baseline.to_dict())
    return uri


def _configs(folder: Path, server: int, receiver: int, alertmanager: int) -> None:
    (folder / "rules.yaml").write_text(alerts.rule_file(THRESHOLDS, for_="2s"))
    (folder / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(folder / "rules.yaml")],
        "alerting": {"alertmanagers": [{"static_configs": [
            {"targets": [f"127.0.0.1:{alertmanager}"]}]}]},
        "scrape_configs": [{"job_name": "kubeseg", "static_configs": [
            {"targets": [f"127.0.0.1:{server}"]}]}]}))
    (folder / "alertmanager.yml").write_text(yaml.safe_dump({
        "route": {"receiver": "drop", "group_by": ["model"], "group_wait": "1s",
                  "group_interval": "2s", "repeat_interval": "1h",
                  "routes": [{"matchers": [f'{alerts.DRIFT_LABEL}="true"'],
                              "receiver": "kubeseg-retrain-on-alert"}]},
        "receivers": [{"name": "drop"}, {
            "name": "kubeseg-retrain-on-alert",
            "webhook_configs": [{"url": f"http://127.0.0.1:{receiver}/alerts",
                                 "send_resolved": False}]}]}))
    (folder / "parameters.yaml").write_text(
        "num_classes: 3\nnum_training_samples: 8\nchampion_uri: s3://kubeseg/models/champion\n"
        "min_miou: 0.5\n")


def _firing(prometheus: str) -> list:
    body = requests.get(prometheus + "/api/v1/alerts", timeout=10).json()
    return [a for a in body["data"]["alerts"] if a["labels"].get("alertname")
            in alerts.DRIFT_ALERTS]


def _query(prometheus: str, metric: str) -> float:
    body = requests.get(prometheus + "/api/v1/query", params={"query": metric},
                        timeout=10).json()
    result = body["data"]["result"]
    return float(result[0]["value"][1]) if result else float("nan")


def _send(server: str, images) -> None:
    for image in images:
        response = requests.post(server + "/invocations", data=_jpeg(image), timeout=60,
                                 headers={"Content-Type": "image/jpeg"})
        assert response.status_code == 200, response.text


def test_drift_alert_starts_exactly_one_retraining_run(model_with_baseline, tmp_path):
    ports = {name: _free_port() for name in ("server", "receiver", "prometheus", "alertmanager")}
    _configs(tmp_path, ports["server"], ports["receiver"], ports["alertmanager"])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    server = f"http://127.0.0.1:{ports['server']}"
    prometheus = f"http://127.0.0.1:{ports['prometheus']}"
    with KfpApiStandIn() as kfp_api, \
            _process([sys.executable, "-m", "kubeseg", "serve", model_with_baseline, "--port",
                      str(ports["server"]), "--model-name", "shapes", "--threads", "1",
                      "--drift-window", str(WINDOW)], tmp_path / "server.log", env), \
            _process([sys.executable, "-m", "kubeseg", "retrain-on-alert", "--host",
                      kfp_api.url, "--parameters", str(tmp_path / "parameters.yaml"),
                      "--port", str(ports["receiver"])], tmp_path / "receiver.log", env), \
            _process([ALERTMANAGER, f"--config.file={tmp_path / 'alertmanager.yml'}",
                      f"--storage.path={tmp_path / 'am'}", "--cluster.listen-address=",
                      f"--web.listen-address=127.0.0.1:{ports['alertmanager']}"],
                     tmp_path / "alertmanager.log"), \
            _process([PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}",
                      f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                      f"--web.listen-address=127.0.0.1:{ports['prometheus']}"],
                     tmp_path / "prometheus.log"):
        for url in (server + "/ping", f"http://127.0.0.1:{ports['receiver']}/healthz",
                    f"http://127.0.0.1:{ports['alertmanager']}/-/ready",
                    prometheus + "/-/ready"):
            _wait_for(url, lambda url=url: _http_up(url), timeout_s=180)
        _validation_images_do_not_alarm(server, prometheus, kfp_api)
        _shifted_images_start_one_run(server, prometheus, kfp_api)
    (run,) = kfp_api.runs()
    parameters = run.body["runtime_config"]["parameters"]
    assert parameters["champion_uri"] == "s3://kubeseg/models/champion"
    assert run.body["display_name"].startswith("kubeseg-drift-")
    log = (tmp_path / "receiver.log").read_text()
    assert "submitted (KubesegClassShift firing" in log


def _validation_images_do_not_alarm(server: str, prometheus: str, kfp_api) -> None:
    _send(server, _images(seed=200, count=2 * WINDOW))
    shift = f'{alerts.DRIFT_CLASS_SHIFT}{{model="shapes"}}'
    _wait_for("the full window scraped", lambda: _query(
        prometheus, f'{alerts.DRIFT_WINDOW_IMAGES}{{model="shapes"}}') == WINDOW
        and np.isfinite(_query(prometheus, shift)))
    assert _query(prometheus, shift) < THRESHOLDS.class_shift
    time.sleep(5)  # several evaluations past the rule's for: 2s
    assert _firing(prometheus) == [] and kfp_api.runs() == []


def _shifted_images_start_one_run(server: str, prometheus: str, kfp_api) -> None:
    shifted = [_overexposed(image) for image in _images(seed=300, count=WINDOW)]

    def firing() -> bool:
        _send(server, shifted[:1])  # the stream goes on while the alert builds up
        return any(a["state"] == "firing" for a in _firing(prometheus))

    _send(server, shifted)
    _wait_for("the class shift alert firing", firing, every_s=1.0)
    _wait_for("a run at the KFP boundary", lambda: len(kfp_api.runs()) == 1)
    for _ in range(5):  # more evaluations and notifications of the same episode
        _send(server, shifted[:2])
        time.sleep(1)
    assert len(kfp_api.runs()) == 1, json.dumps([r.body.get("display_name")
                                                 for r in kfp_api.runs()])
