"""The batch prediction pipeline: compiled YAML current, cluster settings, and the component run
with kfp.local on a real model and images."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[2]
CHECKED_IN = REPO / "pipelines" / "batch_predict.yaml"


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    from kubeseg_platform.pipelines.batch_predict import compile_pipeline

    path = tmp_path_factory.mktemp("compiled") / "batch_predict.yaml"
    compile_pipeline(str(path))
    return path


def test_checked_in_yaml_is_current(compiled):
    assert CHECKED_IN.is_file(), "pipelines/batch_predict.yaml is missing: run 'kubeseg compile'"
    assert compiled.read_text() == CHECKED_IN.read_text(), (
        "pipelines/batch_predict.yaml is stale: run 'kubeseg compile' and commit the result")


def test_kubeseg_compile_writes_both_pipelines(tmp_path, capsys):
    from kubeseg.cli import main

    assert main(["compile", "--output", str(tmp_path / "segmentation.yaml")]) == 0
    assert (tmp_path / "segmentation.yaml").read_text() == \
        (REPO / "pipelines" / "segmentation.yaml").read_text()
    assert (tmp_path / "batch_predict.yaml").read_text() == CHECKED_IN.read_text()


def test_step_runs_in_the_trainer_image_on_the_gpu_pool_with_the_storage_secret(compiled):
    from kubeseg.images import configured
    from kubeseg.deploy.placement import STORAGE_SECRET, STORAGE_SECRET_KEYS

    spec, platform = list(yaml.safe_load_all(compiled.read_text()))
    assert set(spec["root"]["inputDefinitions"]["parameters"]) == {
        "model_uri", "input_uri", "output_uri", "accept", "manifest", "batch_size"}
    container = spec["deploymentSpec"]["executors"]["exec-batch-predict"]["container"]
    assert container["image"] == configured().trainer
    assert container["resources"]["accelerator"]["resourceType"] == "nvidia.com/gpu"
    # no packages installed at run time (offline clusters): the image has kubeseg
    assert "pip install" not in json.dumps(container["command"])
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"][
        "exec-batch-predict"]
    assert k8s["nodeSelector"]["labels"] == {"kubeseg.io/node-pool": "gpu"}
    secret = k8s["secretAsEnv"][0]
    assert secret["secretName"] == STORAGE_SECRET
    assert {e["secretKey"]: e["envVar"] for e in secret["keyToEnv"]} == {
        key: key for key in STORAGE_SECRET_KEYS}
    task = spec["root"]["dag"]["tasks"]["batch-predict"]
    assert task["retryPolicy"]["maxRetryCount"] >= 1  # a retry resumes


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from kubeseg.artifact import save_artifact
    from kubeseg.config import Hyperparameters
    from kubeseg.models import build_model

    hp = Hyperparameters.from_dict(dict(algorithm="fcn", backbone="resnet-18", num_classes=3,
                                        num_training_samples=4, crop_size=32))
    torch.manual_seed(1)
    model = build_model(algorithm="fcn", backbone="resnet-18", num_classes=3)
    uri = str(tmp_path_factory.mktemp("model") / "model")
    save_artifact(uri, model=model.eval(), hyperparameters=hp)
    return uri


def test_component_scores_a_folder_with_kfp_local(tiny_model, tmp_path):
    from kfp import local

    from kubeseg_platform.components.batch_predict import batch_predict
    from kubeseg.data.synthetic import make_shapes_dataset
    from kubeseg.serving import codecs

    local.init(runner=local.SubprocessRunner(use_venv=False),
               pipeline_root=str(tmp_path / "root"))
    images = Path(make_shapes_dataset(tmp_path / "data", n_train=5, n_val=0, size=32)["train"])
    (images / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    out = tmp_path / "out"
    task = batch_predict(model_uri=tiny_model, input_uri=str(images), output_uri=str(out),
                         accept="image/png", manifest=False, batch_size=4)
    summary = json.loads(task.outputs["Output"])
    assert (summary["scored"], summary["failed"]) == (5, 1)
    assert summary["failures"][0]["key"] == "corrupt.jpg"
    for path in sorted(images.glob("train_*.jpg")):
        mask = codecs.decode_png_mask((out / (path.stem + ".png")).read_bytes())
        assert mask.shape == (32, 32) and mask.dtype == np.uint8 and mask.max() < 3
    assert json.loads((out / "_batch_summary.json").read_text())["scored"] == 5
    metrics = task.outputs["metrics"].metadata
    assert (metrics["scored"], metrics["failed"]) == (5, 1)
    assert metrics["summary_uri"] == str(out / "_batch_summary.json")
