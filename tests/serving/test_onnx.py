"""ONNX export, int8 quantization and the choice of backend and precision, on a tiny artifact
and tiny images written here (real export, real ONNX Runtime, real calibration)."""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kubeseg.errors import ConfigError, DataError
from kubeseg.serving import onnx_model
from kubeseg.serving.predictor import (Runtime, SegmentationPredictor, choose_runtime,
                                       native_bfloat16_cpu)
from serving_support import random_image


@pytest.fixture
def artifact(model_uri, tmp_path):
    """A copy of the session's artifact, so files added here stay here."""
    return str(shutil.copytree(model_uri, tmp_path / "model"))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Tiny train and validation channels: images and 3-class annotations of their colour."""
    root = tmp_path_factory.mktemp("dataset")
    for split, count in (("train", 4), ("validation", 3)):
        (root / split).mkdir()
        (root / f"{split}_annotation").mkdir()
        for index in range(count):
            image = random_image(48, 40, seed=100 * len(split) + index)
            image.save(root / split / f"{split}{index}.png")
            mask = (np.asarray(image)[..., 0] // 86).astype(np.uint8)  # classes 0..2
            Image.fromarray(mask, mode="L").save(root / f"{split}_annotation" /
                                                 f"{split}{index}.png")
    return root


def run_kubeseg(*args):
    return subprocess.run([sys.executable, "-m", "kubeseg", *args], capture_output=True,
                          text=True, timeout=600)


def test_export_cli_adds_a_checked_onnx_model_to_the_current_version(artifact, dataset):
    before = (Path(artifact) / "_COMPLETE").read_text()
    result = run_kubeseg("export", artifact, "--format", "onnx", "--check-images",
                     str(dataset / "validation"), "--max-images", "2")
    assert result.returncode == 0, result.stderr
    assert "max abs logit difference" in result.stdout and "argmax agreement" in result.stdout
    assert "real images (2)" in result.stdout
    version = json.loads(before)["version"]
    data = (Path(artifact) / version / onnx_model.ONNX_FILE).read_bytes()
    assert (Path(artifact) / "_COMPLETE").read_text() == before  # same version, more files

    import onnx

    from kubeseg.artifact import load_model

    graph = onnx.load_from_string(data)
    assert {o.domain or "ai.onnx": o.version for o in graph.opset_import}["ai.onnx"] == \
        onnx_model.ONNX_OPSET
    model, _ = load_model(artifact)  # readers of the artifact are unaffected
    runtime = onnx_model.OnnxRuntimeModel(onnx_model.session(data, threads=1))
    x = torch.randn(2, 3, 27, 53)  # another batch and size than the export's sample
    with torch.no_grad():
        expected = model(x)["out"]
    torch.testing.assert_close(runtime(x), expected, atol=1e-4, rtol=1e-4)


def test_added_files_belong_to_their_version_and_core_files_are_refused(artifact):
    from kubeseg.artifact import (ClassInfo, add_files, load_model, read_added_file,
                                  save_artifact)

    with pytest.raises(DataError, match="model.pt"):
        add_files(artifact, {"model.pt": b"x"})
    with pytest.raises(DataError, match="plain names"):
        add_files(artifact, {"../escape": b"x"})
    add_files(artifact, {"extra.bin": b"payload"})
    assert read_added_file(artifact, "extra.bin") == b"payload"
    assert not list(Path(artifact).rglob(".*tmp*"))  # written under a temporary name, moved
    model, info = load_model(artifact)
    save_artifact(artifact, model=model, hyperparameters=info.hyperparameters,
                  classes=ClassInfo(names=info.class_names), mean=info.mean, std=info.std)
    assert read_added_file(artifact, "extra.bin") is None  # the new version has no such file


def test_added_files_on_s3(model_uri, bucket):
    from kubeseg import storage
    from kubeseg.artifact import add_files, read_added_file

    uri = f"{bucket}/model"
    storage.upload_prefix(model_uri, uri)
    add_files(uri, {onnx_model.INT8_REPORT_FILE: b"{}"})
    assert read_added_file(uri, onnx_model.INT8_REPORT_FILE) == b"{}"
    assert read_added_file(uri, onnx_model.INT8_FILE) is None


def test_quantize_records_agreement_and_miou_and_serves_int8(artifact, dataset, reference):
    from kubeseg.data.transforms import to_tensor
    from kubeseg.metrics import ConfusionMatrix

    with pytest.raises(ConfigError, match="kubeseg quantize"):
        SegmentationPredictor(artifact, runtime=Runtime(precision="int8", threads=1)).load()
    result = onnx_model.quantize_artifact(artifact, str(dataset / "train"),
                                          validation=str(dataset), max_images=3, max_side=64,
                                          threads=1)
    report = json.loads(Path(result.folder, onnx_model.INT8_REPORT_FILE).read_text())
    assert report == json.loads(json.dumps(result.report))
    assert report["calibration_images"] == 3 and report["agreement"]["on"] == "validation"
    # how it was made: the default recipe, its float32 layers searched on the other image
    assert (report["weight_range"], report["per_channel"], report["float_logits"],
            report["float_layers_chosen"], report["check_images"]) == (
        "portable", True, True, "searched", 1)
    steps = report["search"]
    reached = [s for s in steps if s["argmax_agreement"] >= report["min_agreement"]]
    chosen = reached[0] if reached else max(steps, key=lambda s: s["argmax_agreement"])
    assert report["float_layers"] == chosen["float_layers"]
    assert report["agreement"]["images"] == 3
    assert 0.5 < report["agreement"]["argmax_agreement"] <= 1.0
    # the float32 mIoU recorded is the PyTorch model's, computed independently here
    model, info = reference
    matrix = ConfusionMatrix(3)
    for index in range(3):
        image = Image.open(dataset / "validation" / f"validation{index}.png").convert("RGB")
        target = np.asarray(Image.open(dataset / "validation_annotation" /
                                       f"validation{index}.png"))
        with torch.no_grad():
            logits = model(to_tensor(image, info.mean, info.std)[None])["out"]
        matrix.update(logits.argmax(1)[0], torch.from_numpy(target.astype(np.int64)))
    assert report["miou_float32"] == pytest.approx(float(matrix.compute()["mIOU"]), abs=1e-3)
    assert report["miou_change_points"] == pytest.approx(
        100 * (report["miou_int8"] - report["miou_float32"]))
    assert Path(result.folder, onnx_model.ONNX_FILE).exists()  # float32 stored beside it

    predictor = SegmentationPredictor(artifact, runtime=Runtime(precision="int8", threads=1),
                                      tile_size=None).load()
    assert (predictor.backend, predictor.precision) == ("onnxruntime", "int8")
    assert predictor.int8_report == report
    (answer,) = predictor([random_image(45, 35, seed=9)])
    assert answer.mask.shape == (35, 45) and answer.mask.max() < 3


def test_onnx_runtime_threads_sleep_between_runs(model_uri):
    """Spinning threads took the cores the server decodes and encodes images on."""
    run = onnx_model.session(onnx_model.float_onnx(model_uri), threads=1)
    assert run.get_session_options().get_session_config_entry(onnx_model.SPINNING_KEY) == "0"


def test_auto_takes_8_bit_weights_only_where_int8_products_cannot_saturate(monkeypatch):
    from kubeseg.serving import predictor

    full = {"agreement": {"argmax_agreement": 0.995}, "weight_range": "full"}
    portable = {**full, "weight_range": "portable"}
    # an x86 CPU without VNNI or AMX: the CPU flags are read from /proc/cpuinfo, so stand in
    monkeypatch.setattr(predictor, "int8_pairs_saturate", lambda: True)
    assert choose_runtime("auto", None, "cpu", full)[0] != "int8"
    assert choose_runtime("auto", None, "cpu", portable) == ("int8", "onnxruntime")
    monkeypatch.setattr(predictor, "int8_pairs_saturate", lambda: False)
    assert choose_runtime("auto", None, "cpu", full) == ("int8", "onnxruntime")


def test_choice_of_backend_and_precision():
    good = {"agreement": {"argmax_agreement": 0.995}}
    poor = {"agreement": {"argmax_agreement": 0.98}}
    assert choose_runtime("auto", None, "cpu", good) == ("int8", "onnxruntime")
    assert choose_runtime("auto", "pytorch", "cpu", good)[0] != "int8"
    expected_fallback = "bfloat16" if native_bfloat16_cpu() else "float32"
    assert choose_runtime("auto", None, "cpu", poor)[0] == expected_fallback
    assert choose_runtime("auto", None, "cpu", None)[0] == expected_fallback
    assert choose_runtime("float32", "onnxruntime", "cpu", None) == ("float32", "onnxruntime")
    assert choose_runtime("float32", None, "cuda", None) == ("float32", "pytorch")
    for precision, backend, device, words in (
            ("int8", "pytorch", "cpu", "--backend onnxruntime"),
            ("int8", None, "cuda", "--device cpu"),
            ("float32", "onnxruntime", "cuda:0", "runs on the CPU"),
            ("float16", "onnxruntime", "cpu", "--backend pytorch")):
        with pytest.raises(ConfigError, match=words):
            choose_runtime(precision, backend, device, good)


@pytest.mark.skipif(native_bfloat16_cpu(), reason="this CPU has native bfloat16")
def test_bfloat16_is_refused_on_a_cpu_without_native_support():
    with pytest.raises(ConfigError, match="no native bfloat16.*AVX512-BF16 or AMX"):
        choose_runtime("bfloat16", None, "cpu", None)


def test_int8_server_answers_and_prints_the_recorded_agreement(artifact, dataset, tmp_path):
    import requests

    from kubeseg.serving.process import model_server
    from serving_support import encode, free_port

    result = run_kubeseg("quantize", artifact, "--calibration", str(dataset / "train"),
                         "--max-images", "2", "--max-side", "32", "--threads", "1")
    assert result.returncode == 0, result.stderr
    assert "argmax agreement with float32" in result.stdout and "2 calibration images" in \
        result.stdout
    log = tmp_path / "server.log"
    with model_server(artifact, free_port(), log_path=log, args=[
            "--precision", "int8", "--threads", "1", "--workers", "2"]) as server:
        answer = requests.post(server.url + "/invocations",
                               data=encode(random_image(37, 29, seed=3)),
                               headers={"Content-Type": "image/jpeg", "Accept": "image/png"},
                               timeout=60)
        assert answer.status_code == 200
        assert Image.open(io.BytesIO(answer.content)).size == (37, 29)
    text = log.read_text()
    assert "int8 model (portable weights, " in text and "argmax agreement with float32" in text
    assert "; onnxruntime, int8)" in text


def test_quantize_cli_takes_the_recipe_and_refuses_bad_values(artifact, dataset):
    calibration = ["--calibration", str(dataset / "train"), "--max-images", "2",
                   "--max-side", "32", "--threads", "1"]
    result = run_kubeseg("quantize", artifact, *calibration, "--weight-range", "full",
                         "--float-layers", "2")
    assert result.returncode == 0, result.stderr
    report = onnx_model.read_int8_report(artifact)
    assert (report["weight_range"], report["float_layers"], report["float_layers_chosen"],
            report["search"]) == ("full", 2, "given", [])
    assert "(full weights, 2 of " in result.stdout
    for option, value, words in (("--float-layers", "some", "--float-layers=some: give a "),
                                 ("--min-agreement", "99", "--min-agreement=99.0: a fraction"),
                                 ("--weight-range", "7bit", "invalid choice: '7bit'")):
        bad = run_kubeseg("quantize", artifact, *calibration, option, value)
        assert bad.returncode != 0 and words in bad.stderr, bad.stderr


def test_quantize_measures_at_the_models_scoring_size(reference, dataset, tmp_path):
    """A model scored at base_size is calibrated and checked at that long side by default."""
    from kubeseg.artifact import ClassInfo, save_artifact

    model, info = reference
    default = str(tmp_path / "default")
    save_artifact(default, model=model, hyperparameters=info.hyperparameters,
                  classes=ClassInfo(names=list(info.class_names)), mean=info.mean, std=info.std)
    at_base = str(tmp_path / "at-base")
    save_artifact(at_base, model=model,
                  hyperparameters=info.hyperparameters.replace(base_size=32,
                                                               inference_size="base_size"),
                  classes=ClassInfo(names=list(info.class_names)), mean=info.mean, std=info.std)
    sides = [onnx_model.quantize_artifact(uri, str(dataset / "train"), max_images=2,
                                          threads=1).report["max_side"]
             for uri in (default, at_base)]
    assert sides == [onnx_model.DEFAULT_MAX_SIDE, 32]


# -- kubeseg predict with the int8 model -------------------------------------------------------
@pytest.fixture(scope="module")
def quantized(model_uri, dataset, tmp_path_factory):
    """A copy of the session's artifact with an int8 model added by quantization."""
    uri = str(shutil.copytree(model_uri, tmp_path_factory.mktemp("quantized") / "model"))
    onnx_model.quantize_artifact(uri, str(dataset / "train"), max_images=3, max_side=64,
                                 threads=1)
    return uri


def _predict(model, dataset, output, *extra):
    return run_kubeseg("predict", str(model), "--input", str(dataset / "validation"),
                       "--output", str(output), "--threads", "1", "--no-progress", *extra)


def _masks(folder: Path):
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))}


def test_predict_int8_writes_masks_that_agree_with_float32(quantized, dataset, tmp_path):
    int8 = _predict(quantized, dataset, tmp_path / "int8", "--precision", "int8")
    assert int8.returncode == 0, int8.stderr
    assert "; onnxruntime, int8)" in int8.stderr  # the int8 model answered, not PyTorch
    assert json.loads(int8.stdout)["scored"] == 3
    float32 = _predict(quantized, dataset, tmp_path / "float32", "--device", "cpu")
    assert float32.returncode == 0, float32.stderr
    assert "; pytorch, float32)" in float32.stderr
    masks, expected = _masks(tmp_path / "int8"), _masks(tmp_path / "float32")
    assert sorted(masks) == sorted(expected) == [f"validation{i}.png" for i in range(3)]
    for name, mask in masks.items():
        assert Image.open(tmp_path / "int8" / name).mode == "L"
        assert mask.shape == (40, 48) and mask.dtype == np.uint8, name
        assert mask.max() < 3, name
    same = sum(int((masks[n] == expected[n]).sum()) for n in masks)
    assert same / sum(m.size for m in masks.values()) >= 0.9

    # auto takes the int8 model when its recorded agreement is high enough
    from kubeseg.artifact import add_files

    report = onnx_model.read_int8_report(quantized)
    report["agreement"]["argmax_agreement"] = onnx_model.MIN_INT8_AGREEMENT
    add_files(quantized, {onnx_model.INT8_REPORT_FILE: json.dumps(report).encode()})
    auto = _predict(quantized, dataset, tmp_path / "auto", "--precision", "auto", "--device",
                    "cpu")
    assert auto.returncode == 0, auto.stderr
    assert "; onnxruntime, int8)" in auto.stderr
    assert {n: m.tolist() for n, m in _masks(tmp_path / "auto").items()} == \
        {n: m.tolist() for n, m in masks.items()}


def test_predict_int8_without_an_int8_model_names_kubeseg_quantize(artifact, dataset, tmp_path):
    result = _predict(artifact, dataset, tmp_path / "out", "--precision", "int8")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert f"{artifact} holds no int8 model" in result.stderr
    assert f"'kubeseg quantize {artifact} --calibration" in result.stderr
    assert not (tmp_path / "out").exists()


def test_predict_int8_runs_on_the_cpu_where_a_gpu_is_available(quantized, dataset, tmp_path,
                                                               monkeypatch, capsys):
    from kubeseg import cli

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    args = ["predict", quantized, "--input", str(dataset / "validation"), "--threads", "1",
            "--no-progress", "--precision", "int8"]
    assert cli.main([*args, "--output", str(tmp_path / "out")]) == 0
    assert json.loads(capsys.readouterr().out)["device"] == "cpu"
    assert len(_masks(tmp_path / "out")) == 3
    assert cli.main([*args, "--output", str(tmp_path / "gpu"), "--device", "cuda"]) == 1
    error = capsys.readouterr().err
    assert "--precision int8" in error and "use --device cpu" in error
    assert "--backend" not in error  # kubeseg predict has no such option
    assert not (tmp_path / "gpu").exists()
