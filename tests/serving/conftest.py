"""Serving fixtures: a tiny model artifact and the real server in a subprocess on 127.0.0.1."""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from serving_support import (CLASS_NAMES, MAX_IMAGE_PIXELS, MAX_PIXELS,  # noqa: E402
                             MAX_REQUEST_BYTES, MEAN, STD, TILE_SIZE, free_port)


@pytest.fixture(scope="session")
def model_uri(tmp_path_factory):
    """A randomly initialised FCN / ResNet-18 artifact with 3 classes."""
    from kubeseg.artifact import ClassInfo, save_artifact
    from testkit import random_fcn

    model, hp = random_fcn(CLASS_NAMES, crop_size=64)
    uri = str(tmp_path_factory.mktemp("serving") / "model")
    save_artifact(uri, model=model, hyperparameters=hp, classes=ClassInfo(names=CLASS_NAMES),
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
    backend: str

    def alive(self) -> bool:
        return self.process.poll() is None


@pytest.fixture(scope="session", params=["pytorch", "onnxruntime"])
def server(request, model_uri, tmp_path_factory):
    """``kubeseg serve`` in a subprocess on 127.0.0.1 with small limits, once per backend (the
    same HTTP tests run against both); stopped by its PID. The artifact holds no model.onnx,
    so the onnxruntime server exports the model at start."""
    from kubeseg.serving.process import model_server

    port = free_port()
    log = tmp_path_factory.mktemp(f"server-log-{request.param}") / "server.log"
    running = model_server(
        model_uri, port, log_path=log, env=dict(os.environ, OMP_NUM_THREADS="1"),
        args=["--backend", request.param, "--model-name", "shapes",
              "--max-pixels", str(MAX_PIXELS), "--tile-size", str(TILE_SIZE),
              "--max-image-pixels", str(MAX_IMAGE_PIXELS),
              "--max-request-bytes", str(MAX_REQUEST_BYTES), "--threads", "1", "--workers", "4"])
    with running:
        yield RunningServer(running.url, port, running.process, log, request.param)
