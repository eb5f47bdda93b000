"""The images, built with podman and run: every pipeline step inside the trainer image
(kfp.local's DockerRunner over podman's Docker API), the model served from the predictor
image, all of it as the images' non-root user, with data in the local S3 server.

Run by ``make test-containers`` (which prepares podman and a local base image first); skipped
by the plain test run, and where podman cannot run containers.
"""
from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
REGISTRY = "localhost/kubeseg"
TAG = "test"
BASE_IMAGE = os.environ.get("KUBESEG_TEST_BASE_IMAGE", "localhost/kubeseg-base:bookworm")
# PyTorch's CPU index may be out of reach (only PyPI and its mirrors are): the CPU predictor
# is then built with PyPI's torch, which runs on CPU as well.
CPU_TORCH_INDEX = os.environ.get("KUBESEG_TEST_CPU_TORCH_INDEX", "https://pypi.org/simple")
NON_ROOT_UID = 1000

pytestmark = [pytest.mark.containers, pytest.mark.slow]


def _podman_unusable() -> str:
    if os.environ.get("KUBESEG_CONTAINER_TESTS") != "1":
        return "container tests run with `make test-containers` (builds the images with podman)"
    if not shutil.which("podman"):
        return "podman is not installed (images/setup-podman.sh installs it, as root)"
    probe = subprocess.run(["podman", "run", "--rm", BASE_IMAGE, "true"], capture_output=True,
                           text=True)
    if probe.returncode != 0:
        return f"podman cannot run {BASE_IMAGE}: {probe.stderr.strip()[-300:]}"
    return ""


def _name(role: str) -> str:
    from kubeseg.images import ImageSet

    return ImageSet(REGISTRY, TAG).name(role)


@pytest.fixture(scope="module")
def images():
    reason = _podman_unusable()
    if reason:
        pytest.skip(reason)
    from kubeseg.images import ROLES

    subprocess.run(
        [sys.executable, str(REPO / "images" / "build.py"), "--engine", "podman",
         "--host-pip", "--registry", REGISTRY, "--tag", TAG, "--base-image", BASE_IMAGE,
         "--cpu-torch-index", CPU_TORCH_INDEX], check=True, timeout=3000)
    return {role: _name(role) for role in ROLES}


@pytest.fixture(scope="module")
def docker_host(images, tmp_path_factory):
    """podman's Docker-compatible API on a socket of its own, for the docker SDK."""
    socket_path = tmp_path_factory.mktemp("podman") / "podman.sock"
    service = subprocess.Popen(["podman", "system", "service", "--time=0",
                                f"unix://{socket_path}"], start_new_session=True)
    import time

    deadline = time.monotonic() + 30
    while not socket_path.exists():
        assert service.poll() is None and time.monotonic() < deadline, \
            "podman system service did not start"
        time.sleep(0.2)
    yield f"unix://{socket_path}"
    service.terminate()
    service.wait(timeout=30)


@pytest.fixture(scope="module")
def pipeline_run(images, docker_host, s3_server, tmp_path_factory):
    """``kubeseg run --runner docker``: the whole pipeline in the images, then a prediction
    from the predictor container."""
    workdir = tmp_path_factory.mktemp("run") / "work"
    env = {**os.environ, **s3_server.env(), "DOCKER_HOST": docker_host}
    result = subprocess.run(
        [sys.executable, "-m", "kubeseg", "run", "--runner", "docker", "--registry", REGISTRY,
         "--tag", TAG, "--workdir", str(workdir), "--s3-endpoint", s3_server.endpoint,
         "--bucket", "container-run", "--images", "12", "--validation-images", "3",
         "--epochs", "3", "--min-miou", "0.0"],
        capture_output=True, text=True, timeout=1800, env=env)
    assert result.returncode == 0, result.stderr[-4000:] + result.stdout[-4000:]
    return workdir, result.stdout + (workdir / "pipeline.log").read_text()


def test_images_run_as_a_non_root_user(images):
    for role, name in images.items():
        user = subprocess.run(["podman", "image", "inspect", "--format", "{{.Config.User}}",
                               name], capture_output=True, text=True, check=True).stdout.strip()
        assert user == str(NON_ROOT_UID), f"{name}: USER is {user!r}"
        uid = subprocess.run(["podman", "run", "--rm", "--entrypoint", "id", name, "-u"],
                             capture_output=True, text=True, check=True).stdout.strip()
        assert uid == str(NON_ROOT_UID), f"{name} runs as uid {uid}"


def test_each_image_holds_what_its_role_needs(images):
    checks = {
        "trainer": "import kfp, kfp.kubernetes, kubernetes, torch, torchvision, importlib.util, "
                   "kubeseg_platform.components, kubeseg_platform.pipelines; "
                   "from kubeseg.engine.train import train; "
                   "assert importlib.util.find_spec('pipelines') is None, 'a top-level pipelines'",
        "predictor": "import kserve, torch, onnxruntime; import kubeseg.serving.server",
        "predictor-gpu": "import kserve, torch, onnxruntime; import kubeseg.serving.server; "
                         "assert torch.version.cuda, 'a CPU-only torch'",
    }
    for role, code in checks.items():
        result = subprocess.run(["podman", "run", "--rm", "--entrypoint", "python3",
                                 images[role], "-c", code], capture_output=True, text=True)
        assert result.returncode == 0, f"{images[role]}: {result.stderr[-2000:]}"


def test_every_step_ran_in_the_trainer_image(pipeline_run):
    workdir, output = pipeline_run
    # kfp.local's DockerRunner names the image of every task it starts.
    tasks = ("validate-dataset", "ingest-manifest", "train", "evaluate", "deploy", "promote")
    assert output.count(f"Found image '{_name('trainer')}'") == len(tasks), output[-3000:]
    (run_dir,) = (workdir / "pipeline").glob("kubeseg-segmentation-*")
    for task in tasks:
        # one-GPU training: the tasks after training are those of that branch (name-N)
        (executor_output,) = [p for p in run_dir.glob(f"{task}*/executor_output.json")
                              if p.parent.name.rstrip("-0123456789") == task]
        # written from inside the container, by the image's non-root user
        assert executor_output.stat().st_uid == NON_ROOT_UID, task
    assert (run_dir / "train" / "model" / "kubeseg.json").is_file()
    (rendered,) = run_dir.glob("deploy*/inference_service")
    assert f"image: {REGISTRY}/predictor:{TAG}" in rendered.read_text()


def test_the_predictor_image_serves_the_models_own_answer(pipeline_run, docker_host,
                                                          monkeypatch):
    from kubeseg.serving.predictor import Runtime, SegmentationPredictor
    from kubeseg_platform.pipelines.container_engine import ContainerServer
    from kubeseg_platform.pipelines.local_run import free_port

    workdir, output = pipeline_run
    assert f"served by               container {_name('predictor')}" in output
    (run_dir,) = (workdir / "pipeline").glob("kubeseg-segmentation-*")
    model_dir = run_dir / "train" / "model"
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 80, 3), np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")

    monkeypatch.setenv("DOCKER_HOST", docker_host)
    with ContainerServer(_name("predictor"), model_dir, free_port(),
                         log_path=workdir / "predictor.log") as server:
        with urllib.request.urlopen(server.url + "/v2/health/ready", timeout=10) as ready:
            assert ready.status == 200
        request = urllib.request.Request(
            server.url + "/invocations", data=buffer.getvalue(), method="POST",
            headers={"Content-Type": "image/png", "Accept": "image/png"})
        with urllib.request.urlopen(request, timeout=120) as response:
            served = np.asarray(Image.open(io.BytesIO(response.read())))

    predictor = SegmentationPredictor(str(model_dir), runtime=Runtime(device="cpu")).load()
    (expected,) = predictor([image])
    assert served.shape == (48, 80)
    assert np.array_equal(served, expected.mask), "the container's mask differs from the model"
