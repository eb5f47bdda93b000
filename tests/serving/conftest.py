"""Serving fixtures: a tiny model artifact and the real server in a subprocess on 127.0.0.1."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from serving_support import (CLASS_NAMES, MAX_IMAGE_PIXELS, MAX_PIXELS,  # noqa: E402
                             MAX_REQUEST_BYTES, MEAN, STD, TILE_SIZE, free_port)


@pytest.fixture(scope="session")
def model_uri(tmp_path_factory):
    """A randomly initialised FCN / ResNet-18 artifact with 3 classes."""
    from kubeseg.artifact import save_artifact
    from kubeseg.config import Hyperparameters
    from kubeseg.models import build_model

    hp = Hyperparameters.from_dict(dict(algorithm="fcn", backbone="resnet-18", num_classes=3,
                                        num_training_samples=8, crop_size=64))
    torch.manual_seed(0)
    model = build_model(algorithm="fcn", backbone="resnet-18", num_classes=3)
    model.train()
    model(torch.randn(2, 3, 32, 32))  # BatchNorm statistics off their defaults
    uri = str(tmp_path_factory.mktemp("serving") / "model")
    save_artifact(uri, model=model.eval(), hyperparameters=hp, class_names=CLASS_NAMES,
                  mean=MEAN, std=STD)
    return uri


@pytest.fixture(scope="session")
def reference(model_uri):
    """The model as the artifact loads it, for expected answers."""
    import kubeseg

    model, info = kubeseg.load_model(model_uri)
    return model, info


@dataclass
class RunningServer:
    url: str
    port: int
    process: subprocess.Popen
    log: Path

    def alive(self) -> bool:
        return self.process.poll() is None


def _wait_ready(url: str, process: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url + "/v2/health/ready", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server not ready within {timeout} s:\n{log.read_text()}")


@pytest.fixture(scope="session")
def server(model_uri, tmp_path_factory):
    """``kubeseg serve`` in a subprocess on 127.0.0.1 with small limits; stopped by its PID."""
    port = free_port()
    log = tmp_path_factory.mktemp("server-log") / "server.log"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "kubeseg", "serve", model_uri, "--host", "127.0.0.1",
             "--port", str(port), "--model-name", "shapes",
             "--max-pixels", str(MAX_PIXELS), "--tile-size", str(TILE_SIZE),
             "--max-image-pixels", str(MAX_IMAGE_PIXELS),
             "--max-request-bytes", str(MAX_REQUEST_BYTES), "--threads", "1",
             "--workers", "4"],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, process, log)
        yield RunningServer(url, port, process, log)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
