"""The training step's DataLoader under a pod's default 64 MiB /dev/shm fails, and under the
memory-backed emptyDir the compiled pipeline mounts there it runs: the setting is what avoids
the failure. /dev/shm is replaced inside a private mount namespace (unshare -m, as root)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
POD_DEFAULT_SHM = 64 * 2 ** 20  # what a container gets without a volume at /dev/shm

# The train step's loaders as a GPU node runs them (batch 16, crop 480, 4 workers; uint8 samples),
# read by a consumer as slow as a training step, so the workers fill their prefetch queue.
LOADER = """
import sys, tempfile, time
from kubeseg.config import Hyperparameters
from kubeseg.data.channels import Channels
from kubeseg.data.synthetic import make_shapes_dataset
from kubeseg.engine import distributed as D
from kubeseg.engine.loaders import build_loaders
channels = Channels(**make_shapes_dataset(tempfile.mkdtemp(), n_train=160, n_val=1, size=64))
hp = Hyperparameters.from_dict({"num_classes": 3, "num_training_samples": 160,
                                "crop_size": 480, "base_size": 520})
loaders = build_loaders(hp, channels, D.init_distributed("cpu"), workers=4)
for batch, _ in loaders.train:
    time.sleep(1.0)
print("batches of", tuple(batch.shape))
"""

_UNITS = {"Ki": 2 ** 10, "Mi": 2 ** 20, "Gi": 2 ** 30, "Ti": 2 ** 40,
          "k": 10 ** 3, "M": 10 ** 6, "G": 10 ** 9, "T": 10 ** 12}


def _bytes(quantity: str) -> int:
    for unit, factor in sorted(_UNITS.items(), key=lambda u: -len(u[0])):
        if quantity.endswith(unit):
            return int(float(quantity[:-len(unit)]) * factor)
    return int(quantity)


def _run_with_shm(size_bytes: int):
    script = (f"mount -t tmpfs -o size={size_bytes} tmpfs /dev/shm && "
              f"exec {sys.executable} -c \"$KUBESEG_LOADER\"")
    return subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True,
                          text=True, timeout=600,
                          env={**os.environ, "KUBESEG_LOADER": LOADER,
                               "PYTHONPATH": str(REPO)})


@pytest.fixture(scope="module")
def namespaces():
    if not shutil.which("unshare"):
        pytest.skip("unshare (util-linux) is not installed")
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs "
                            "/dev/shm"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a private /dev/shm here (needs root): {probe.stderr.strip()}")


def _compiled_shm_size() -> str:
    _, platform = yaml.safe_load_all((REPO / "pipelines" / "segmentation.yaml").read_text())
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    (mount,) = [m for m in executors["exec-train"]["emptyDirMounts"]
                if m["mountPath"] == "/dev/shm"]
    assert mount["medium"] == "Memory"
    return mount["sizeLimit"]


@pytest.mark.slow
def test_the_default_shm_of_a_pod_is_too_small_for_the_training_loader(namespaces):
    result = _run_with_shm(POD_DEFAULT_SHM)
    assert result.returncode != 0, "the loader fit in 64 MiB: this test proves nothing"
    assert "shared memory" in result.stderr and "No space left on device" in result.stderr, \
        result.stderr[-2000:]


@pytest.mark.slow
def test_the_compiled_shm_volume_lets_the_training_loader_run(namespaces):
    size = _compiled_shm_size()
    assert _bytes(size) > POD_DEFAULT_SHM
    result = _run_with_shm(_bytes(size))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "batches of (16, 3, 480, 480)" in result.stdout
