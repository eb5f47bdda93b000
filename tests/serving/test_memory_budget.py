"""The server under a 2 GiB memory limit (``prlimit --data``) and a bounded storm of large
images: admission by the memory budget keeps it alive, with no 5xx but 503 (with Retry-After)."""
from __future__ import annotations

import io
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from PIL import Image

from serving_support import free_port

LIMIT_BYTES = 2 * 2**30
SIDE = 4600            # 21 MP per image, about 260 MiB to answer each by the server's estimate
REQUESTS = 30
CONCURRENCY = 10
BUDGET_MIB = 600
MAX_QUEUED = 3
RETRIES = 30


def _large_png(side: int, seed: int) -> bytes:
    """A smooth greyscale picture: large when decoded, small on the wire."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(small, mode="L").resize((side, side), Image.BILINEAR).save(buf, "PNG")
    return buf.getvalue()


def _status_bytes(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"{field} missing from /proc/{pid}/status")


def _peak_rss_bytes(pid: int) -> int:
    return _status_bytes(pid, "VmHWM")


def _rss_bytes(pid: int) -> int:
    return _status_bytes(pid, "VmRSS")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_storm_of_large_images_under_a_memory_limit(model_uri, tmp_path):
    from kubeseg.serving.process import ServerProcess

    prlimit = shutil.which("prlimit")
    if prlimit is None:
        pytest.skip("prlimit (util-linux) is not installed")
    port = free_port()
    log = tmp_path / "server.log"
    command = [prlimit, f"--data={LIMIT_BYTES}", "--", sys.executable, "-m", "kubeseg", "serve",
               model_uri, "--host", "127.0.0.1", "--port", str(port), "--model-name", "shapes",
               "--max-pixels", str(64 * 64), "--tile-size", "48", "--threads", "1",
               "--workers", "8", "--max-image-pixels", str(5000 * 5000),
               "--max-request-bytes", str(16 * 2**20), "--memory-budget-mib", str(BUDGET_MIB),
               "--max-queued-requests", str(MAX_QUEUED)]
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_ARENA_MAX="2")
    bodies = [_large_png(SIDE, seed) for seed in range(3)]
    with ServerProcess(command, f"http://127.0.0.1:{port}", log_path=log, env=env) as server:
        with open(f"/proc/{server.process.pid}/limits") as limits:
            assert str(LIMIT_BYTES) in next(l for l in limits if l.startswith("Max data size"))

        idle_rss = _rss_bytes(server.process.pid)

        def send_once(index):
            body = bodies[index % len(bodies)]
            if index % 5 == 4:  # some as v2 requests with the same picture
                head = (b'{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], '
                        b'"parameters": {"binary_data_size": %d}}], "outputs": [{"name": '
                        b'"mask", "parameters": {"binary_data": true}}]}' % (len(body) + 4))
                response = requests.post(
                    server.url + "/v2/models/shapes/infer",
                    data=head + len(body).to_bytes(4, "little") + body, timeout=300,
                    headers={"Inference-Header-Content-Length": str(len(head))})
            else:
                response = requests.post(server.url + "/invocations", data=body, timeout=300,
                                         headers={"Content-Type": "image/png"})
            return response

        def send(index):
            """Send, honouring Retry-After a bounded number of times, as a client would."""
            refused = []
            for _ in range(RETRIES):
                response = send_once(index)
                if response.status_code != 503:
                    return response, refused
                refused.append(response)
                time.sleep(int(response.headers["Retry-After"]))
            return response, refused

        with ThreadPoolExecutor(CONCURRENCY) as pool:
            sent = list(pool.map(send, range(REQUESTS)))
        responses = [r for r, _ in sent]
        refusals = [r for _, refused in sent for r in refused]
        statuses = [r.status_code for r in responses]
        alive = server.process.poll() is None
        peak = _peak_rss_bytes(server.process.pid) if alive else None
        metrics = requests.get(server.url + "/metrics", timeout=30).text if alive else ""
    answered, busy = statuses.count(200), len(refusals)
    print(f"memory storm: {REQUESTS} requests of {SIDE}x{SIDE} pixels, {CONCURRENCY} at a time, "
          f"limit {LIMIT_BYTES // 2**20} MiB: {answered} answered, {busy} x 503 (retried), "
          f"idle RSS {idle_rss / 2**20:.0f} MiB, peak RSS {(peak or 0) / 2**20:.0f} MiB")
    assert alive, "the server died (killed for memory?); see " + str(log)
    assert [s for s in statuses if s not in (200, 503)] == [], statuses
    assert answered >= REQUESTS * 2 // 3
    for response in responses + refusals:
        if response.status_code == 503:
            assert int(response.headers["Retry-After"]) >= 1
            assert "--max-queued-requests" in response.json()["error"]
        elif response.headers["content-type"] == "image/png":
            assert Image.open(io.BytesIO(response.content)).size == (SIDE, SIDE)
    assert peak < LIMIT_BYTES
    assert 'status="500"' not in metrics


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_an_image_at_the_default_pixel_limit_is_answered_under_the_default_budget(tmp_path):
    """Every memory default as shipped (--max-image-pixels, --memory-budget-mib, --max-pixels,
    --max-request-bytes), a model with as many classes as the defaults are sized for: the
    largest image the server admits is answered, one pixel row more is refused with 413.
    (--tile-size 0 only spares the machine the overlap of the sliding window.)"""
    import math

    import torch

    from kubeseg.artifact import ClassInfo, save_artifact
    from kubeseg.config import Hyperparameters
    from kubeseg.models import build_model
    from kubeseg.serving import defaults
    from kubeseg.serving.process import model_server

    side = math.isqrt(defaults.DEFAULT_MAX_IMAGE_PIXELS)
    assert side * side == defaults.DEFAULT_MAX_IMAGE_PIXELS
    classes = defaults.SIZED_FOR_CLASSES
    hp = Hyperparameters.from_dict(dict(algorithm="fcn", backbone="resnet-18",
                                        num_classes=classes, num_training_samples=8))
    torch.manual_seed(0)
    model = build_model(algorithm="fcn", backbone="resnet-18", num_classes=classes).eval()
    uri = str(tmp_path / "model")
    save_artifact(uri, model=model, hyperparameters=hp,
                  classes=ClassInfo(names=[f"class_{i}" for i in range(classes)]))
    at_limit, beyond = _large_png(side, seed=1), _large_png_of(side, side + 1)
    port = free_port()
    with model_server(uri, port, log_path=tmp_path / "server.log",
                      env=dict(os.environ, OMP_NUM_THREADS="2"),
                      args=["--tile-size", "0", "--threads", "2"]) as server:
        answered = requests.post(server.url + "/invocations", data=at_limit, timeout=600,
                                 headers={"Content-Type": "image/png"})
        refused = requests.post(server.url + "/invocations", data=beyond, timeout=60,
                                headers={"Content-Type": "image/png"})
    assert answered.status_code == 200, answered.text[:500]
    assert Image.open(io.BytesIO(answered.content)).size == (side, side)
    assert refused.status_code == 413 and "--max-image-pixels" in refused.json()["error"]


def _large_png_of(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (width, height), 128).save(buf, "PNG")
    return buf.getvalue()
