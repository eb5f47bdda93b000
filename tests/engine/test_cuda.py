"""Training, evaluation and serving on a CUDA device, checked against the CPU.

These need a GPU and are skipped without one (CI has none); ``bench/gpu_checks.sh`` runs them on
a GPU machine together with the GPU benchmarks.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kubeseg.artifact import load_model
from kubeseg.config import Hyperparameters
from kubeseg.data.channels import Channels
from kubeseg.data.synthetic import make_shapes_dataset
from kubeseg.engine.evaluate import EvalOptions, evaluate
from kubeseg.engine.train import TrainOptions, train

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes96")
    make_shapes_dataset(root, n_train=16, n_val=4, size=96, num_classes=3, seed=0)
    return root


@pytest.fixture(scope="module")
def cuda_model(shapes, tmp_path_factory):
    """An artifact trained on the GPU for 3 epochs (the model the CPU comparisons score)."""
    result = train(_hp(epochs=3), Channels.from_root(str(shapes)),
                   str(tmp_path_factory.mktemp("cuda-model")), device="cuda",
                   options=TrainOptions(workers=0, log_every=100))
    return result.artifact_uri


def _hp(**changes) -> Hyperparameters:
    values = dict(backbone="resnet-18", algorithm="fcn", num_classes=3, num_training_samples=16,
                  crop_size=96, base_size=96, epochs=8, mini_batch_size=4,
                  validation_mini_batch_size=1, use_pretrained_model=False, optimizer="adam",
                  learning_rate=0.003)
    values.update(changes)
    return Hyperparameters.from_dict(values)


@pytest.mark.parametrize("precision", ["float32", "bfloat16", "float16"])
def test_training_on_cuda_learns_in_every_precision(shapes, tmp_path, precision):
    result = train(_hp(precision_dtype=precision), Channels.from_root(str(shapes)),
                   str(tmp_path / "out"), device="cuda",
                   options=TrainOptions(workers=2, log_every=100))
    losses = [record["train:loss"] for record in result.history]
    assert all(np.isfinite(losses)), losses
    assert losses[-1] < 0.7 * losses[0], losses
    # the artifact is device-free: it loads and runs on a machine without a GPU
    model, info = load_model(result.artifact_uri, device="cpu")
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert info.hyperparameters.precision_dtype == precision
    with torch.no_grad():
        assert model(torch.randn(1, 3, 50, 70))["out"].shape == (1, 3, 50, 70)


def test_a_cuda_step_autotunes_its_convolutions_and_leaves_the_setting_as_it_was():
    from kubeseg.engine.step import build_parts, train_step
    from kubeseg.models import build_model

    hp = _hp()
    parts = build_parts(build_model(algorithm="fcn", backbone="resnet-18", num_classes=3), hp,
                        torch.device("cuda"), iters_per_epoch=4)
    assert parts.autotune_convolutions
    torch.backends.cudnn.benchmark = False
    images = torch.randn(2, 3, 64, 64, device="cuda")
    masks = torch.randint(0, 3, (2, 64, 64), device="cuda")
    assert torch.isfinite(train_step(parts, images, masks))
    assert torch.backends.cudnn.benchmark is False


@pytest.mark.parametrize("algorithm", ["fcn", "deeplab"])
def test_compiled_training_on_cuda_matches_the_eager_loss_curve(shapes, tmp_path, algorithm):
    runs = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        result = train(_hp(algorithm=algorithm, epochs=2, compile=compiled, seed=3),
                       Channels.from_root(str(shapes)), str(tmp_path / f"c{compiled}"),
                       device="cuda", options=TrainOptions(workers=0, log_every=100))
        runs[compiled] = [record["train:loss"] for record in result.history]
    # same seed, same data order: compiled kernels differ only in rounding
    assert runs[True] == pytest.approx(runs[False], rel=0.05), runs


def test_evaluation_on_cuda_matches_the_cpu(shapes, cuda_model, tmp_path):
    scores = {}
    for device in ("cpu", "cuda"):
        scores[device] = evaluate(cuda_model, Channels.from_root(str(shapes)),
                                  str(tmp_path / f"eval-{device}"), device=device,
                                  options=EvalOptions(workers=0)).metrics
    assert scores["cuda"]["mIOU"] == pytest.approx(scores["cpu"]["mIOU"], abs=0.01)
    assert scores["cuda"]["pixel_accuracy"] == pytest.approx(scores["cpu"]["pixel_accuracy"],
                                                             abs=0.01)


@pytest.mark.parametrize("precision,agreement", [("float32", 0.999), ("bfloat16", 0.98)])
def test_serving_on_cuda_agrees_with_the_cpu(shapes, cuda_model, precision, agreement):
    from PIL import Image

    from kubeseg.serving.predictor import Runtime, SegmentationPredictor

    images = [np.asarray(Image.open(path).convert("RGB"))
              for path in sorted((shapes / "validation").iterdir())]
    cpu = SegmentationPredictor(cuda_model, runtime=Runtime(device="cpu")).load()
    gpu = SegmentationPredictor(cuda_model,
                                runtime=Runtime(device="cuda", precision=precision)).load()
    assert gpu.device.type == "cuda" and gpu.precision == precision
    for image in images:
        expected, got = cpu([image])[0], gpu([image])[0]
        assert got.mask.shape == expected.mask.shape == image.shape[:2]
        assert np.mean(np.asarray(got.mask) == np.asarray(expected.mask)) >= agreement
