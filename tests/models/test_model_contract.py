"""The models beyond the reference's families through the whole contract, each on tiny data:
training in channels-last with a checkpoint and exact resume, mixed precision, incremental
training, ``kubeseg evaluate`` with a sliding window and test-time augmentation, ONNX export
with its agreement check, int8 quantization, both serving backends over HTTP, and batch
prediction. (Distributed training: tests/engine/test_distributed.py; the Katib search space:
tests/tuning; the compiled pipeline: tests/pipeline/test_compile.py.)"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from kubeseg.artifact import load_model
from kubeseg.config import Hyperparameters
from kubeseg.data.channels import Channels
from kubeseg.data.synthetic import make_shapes_dataset
from kubeseg.data.transforms import to_tensor
from kubeseg.engine.train import TrainOptions, train

# a training per model, servers and exports: tens of seconds on 2 cores
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
IN_PROCESS = TrainOptions(workers=0)
# (algorithm, backbone, output_stride): one pair per new backbone, each new decoder covered
MODELS = [
    ("deeplabv3plus", "efficientnet-lite0", 16),
    ("lraspp", "mobilenet-v3-large", 8),
    ("deeplabv3plus", "convnext-tiny", 16),
]
IDS = ["deeplabv3plus-efficientnet-lite0", "lraspp-mobilenet-v3-large", "convnext-tiny"]


def _hp(model, **changes) -> Hyperparameters:
    algorithm, backbone, output_stride = model
    values = dict(algorithm=algorithm, backbone=backbone, output_stride=output_stride,
                  num_classes=3, num_training_samples=8, crop_size=32, base_size=40, epochs=2,
                  mini_batch_size=4, validation_mini_batch_size=1, use_pretrained_model=False,
                  optimizer="adam", learning_rate=0.003, channels_last=True,
                  # a schedule that does not depend on the number of epochs, so a 1-epoch run
                  # resumed to 2 epochs is the same run as a 2-epoch one stopped after 1
                  lr_scheduler="step", lr_scheduler_step="5")
    values.update(changes)
    return Hyperparameters.from_dict(values)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    make_shapes_dataset(root, n_train=8, n_val=2, size=32, num_classes=3, seed=1)
    return root


@pytest.fixture(scope="module", params=MODELS, ids=IDS)
def trained(request, data, tmp_path_factory):
    """(model triple, output folder of a 2-epoch channels-last training)."""
    out = tmp_path_factory.mktemp("trained") / "run"
    result = train(_hp(request.param), Channels.from_root(str(data)), str(out),
                   options=IN_PROCESS)
    assert len(result.history) == 2
    return request.param, out, result


def test_checkpoint_resume_is_exact_and_incremental_training_starts_from_the_model(
        trained, data, tmp_path):
    model, straight, result = trained
    channels = Channels.from_root(str(data))
    train(_hp(model, epochs=1), channels, str(tmp_path / "resumed"), options=IN_PROCESS)
    resumed = train(_hp(model), channels, str(tmp_path / "resumed"), options=IN_PROCESS)
    assert [r["epoch"] for r in resumed.history] == [1, 2]
    want = result.model.state_dict()
    for key, value in resumed.model.state_dict().items():
        assert torch.equal(value, want[key]), key
    # incremental: a new run from the artifact, at a learning rate too small to move it
    earlier, info = load_model(str(straight / "model"))
    assert info.hyperparameters.output_stride == model[2]
    later = train(_hp(model, epochs=1, optimizer="sgd", learning_rate=1e-9, momentum=0.1,
                      weight_decay=1e-12), channels, str(tmp_path / "incremental"),
                  options=IN_PROCESS, initial_model_uri=str(straight / "model")).model
    moved = {k: v for k, v in later.state_dict().items() if v.dim() == 4}
    for key, value in earlier.state_dict().items():
        if key in moved:
            assert torch.allclose(moved[key].cpu(), value, atol=1e-6), key


def test_mixed_precision_training_runs(trained, data, tmp_path):
    model = trained[0]
    result = train(_hp(model, epochs=1, precision_dtype="bfloat16"),
                   Channels.from_root(str(data)), str(tmp_path / "bf16"), options=IN_PROCESS)
    assert np.isfinite(result.history[0]["train:loss"])


def test_evaluate_scores_as_validation_did_and_with_sliding_window_and_tta(trained, data,
                                                                           tmp_path):
    from kubeseg.engine.evaluate import EvalOptions, Scoring, evaluate

    model, out, result = trained
    channels = Channels.from_root(str(data))
    plain = evaluate(str(out / "model"), channels, str(tmp_path / "plain"), device="cpu",
                     scoring=Scoring(tile_size=None),
                     options=EvalOptions(num_overlays=0, workers=0)).metrics
    best = result.history[result.best_epoch - 1]["validation:mIOU"]
    assert plain["mIOU"] == pytest.approx(best, abs=0.02)
    tta = evaluate(str(out / "model"), channels, str(tmp_path / "tta"), device="cpu",
                   scoring=Scoring(tile_size=24, scales=(0.75, 1.0), flip=True),
                   options=EvalOptions(num_overlays=0, workers=0)).metrics
    assert tta["settings"]["tile_size"] == 24 and tta["settings"]["flip"] is True
    assert 0.0 <= tta["mIOU"] <= 1.0 and tta["pixels"] == plain["pixels"]


def _expected_masks(model_uri, folder):
    model, info = load_model(model_uri)
    masks = {}
    for path in sorted(Path(folder).glob("*")):
        image = Image.open(path).convert("RGB")
        with torch.no_grad():
            logits = model(to_tensor(image, info.mean, info.std)[None])["out"]
        masks[path.name] = logits.argmax(1)[0].numpy()
    return masks


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape
    return float((a == b).mean())


def test_onnx_export_and_int8_quantization_agree_with_pytorch(trained, data, tmp_path):
    import shutil

    from kubeseg.serving import onnx_model

    artifact = str(shutil.copytree(trained[1] / "model", tmp_path / "model"))
    exported = onnx_model.export_artifact(artifact, check_images=str(data / "validation"))
    assert exported.random.max_abs_logit_difference < 1e-3
    assert exported.real.argmax_agreement > 0.999
    result = onnx_model.quantize_artifact(artifact, str(data / "train"), validation=str(data),
                                          max_images=4, threads=1)
    report = result.report
    assert report["agreement"]["on"] == "validation" and report["agreement"]["images"] == 2
    assert 0.5 < report["agreement"]["argmax_agreement"] <= 1.0
    assert Path(result.folder, onnx_model.INT8_FILE).is_file()


@pytest.mark.parametrize("backend", ["pytorch", "onnxruntime"])
def test_both_serving_backends_answer_with_the_models_masks(trained, data, backend,
                                                            tmp_path):
    from s3server import free_port

    from kubeseg.serving import codecs
    from kubeseg.serving.process import model_server

    model_uri = str(trained[1] / "model")
    expected = _expected_masks(model_uri, data / "validation")
    port = free_port()
    with model_server(model_uri, port, log_path=tmp_path / "server.log",
                      env=dict(os.environ, OMP_NUM_THREADS="1"),
                      args=["--backend", backend, "--threads", "1", "--workers", "1"]) as server:
        for name, want in expected.items():
            body = (data / "validation" / name).read_bytes()
            response = requests.post(server.url + "/invocations", data=body, timeout=120,
                                     headers={"Content-Type": "image/jpeg",
                                              "Accept": "image/png"})
            assert response.status_code == 200, response.text
            mask = codecs.decode_png_mask(response.content)
            assert _agreement(mask, want) > (0.999 if backend == "pytorch" else 0.99), name


def test_batch_prediction_writes_the_models_masks(trained, data, tmp_path):
    model_uri = str(trained[1] / "model")
    out = tmp_path / "masks"
    proc = subprocess.run(
        [sys.executable, "-m", "kubeseg", "predict", model_uri, "--input",
         str(data / "validation"), "--output", str(out), "--device", "cpu", "--threads", "1",
         "--no-progress"], capture_output=True, text=True, timeout=600,
        env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["scored"] == 2
    for name, want in _expected_masks(model_uri, data / "validation").items():
        mask = np.asarray(Image.open(out / Path(name).with_suffix(".png")))
        assert _agreement(mask, want) > 0.999, name
