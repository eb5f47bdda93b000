"""Model artifact: round trip (local and S3), plain-PyTorch loading, atomicity, incremental checks."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import kubeseg
from kubeseg import storage
from kubeseg.artifact import MARKER_FILE, load_model, read_info, save_artifact
from kubeseg.config import Hyperparameters
from kubeseg.engine.train import check_incremental
from kubeseg.errors import ConfigError, DataError
from kubeseg.models import build_model

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.2, 0.2)


def _hp(**changes) -> Hyperparameters:
    values = dict(algorithm="psp", backbone="resnet-18", num_classes=3, num_training_samples=8,
                  crop_size=60)
    values.update(changes)
    return Hyperparameters.from_dict(values)


def _model(hp: Hyperparameters, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(algorithm=hp.algorithm, backbone=hp.backbone, num_classes=hp.num_classes)
    model.train()
    model(torch.randn(2, 3, 32, 32))  # move BatchNorm running statistics off their defaults
    return model.eval()


def _assert_same_outputs(a, b):
    x = torch.randn(1, 3, 41, 37)
    with torch.no_grad():
        assert torch.equal(a(x)["out"], b(x)["out"])


@pytest.mark.parametrize("where", ["local", "s3"])
def test_round_trip(tmp_path, where, request):
    base = request.getfixturevalue("bucket") if where == "s3" else str(tmp_path)
    uri = storage.join(base, "run", "model")
    hp = _hp()
    model = _model(hp)
    save_artifact(uri, model=model, hyperparameters=hp, class_names=["bg", "disc", "square"],
                  label_map={"scale": 1}, metrics={"mIOU": 0.75, "per_class_iou": [1.0, float("nan"), 0.5]},
                  epoch=3, mean=MEAN, std=STD)
    loaded, info = kubeseg.load_model(uri)
    assert not loaded.training
    _assert_same_outputs(model, loaded)
    assert info.hyperparameters == hp
    assert info.class_names == ["bg", "disc", "square"] and info.num_classes == 3
    assert info.mean == MEAN and info.std == STD
    assert info.label_map == {"scale": 1}
    assert info.metrics["mIOU"] == 0.75 and info.metrics["per_class_iou"][1] is None
    assert info.format_version == 1 and info.epoch == 3 and info.crop_size == 64
    assert (info.algorithm, info.backbone) == ("psp", "resnet-18")


def test_loadable_with_plain_pytorch(tmp_path):
    hp = _hp(algorithm="deeplab")
    model = _model(hp)
    save_artifact(str(tmp_path / "m"), model=model, hyperparameters=hp, class_names=None,
                  mean=MEAN, std=STD)
    meta = json.loads((tmp_path / "m" / "kubeseg.json").read_text())
    assert meta["class_names"] == ["class_0", "class_1", "class_2"]
    rebuilt = build_model(algorithm=meta["algorithm"], backbone=meta["backbone"],
                          num_classes=meta["num_classes"], aux_loss=meta["aux_head"])
    state = torch.load(tmp_path / "m" / "model.pt", map_location="cpu", weights_only=True)
    rebuilt.load_state_dict(state)
    _assert_same_outputs(model, rebuilt.eval())
    assert json.loads((tmp_path / "m" / "hyperparams.json").read_text())["algorithm"] == "deeplab"


def test_default_normalisation_is_the_transforms(tmp_path):
    from kubeseg.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    hp = _hp()
    save_artifact(str(tmp_path / "m"), model=_model(hp), hyperparameters=hp, class_names=None)
    info = read_info(str(tmp_path / "m"))
    assert info.mean == tuple(IMAGENET_MEAN) and info.std == tuple(IMAGENET_STD)


def test_overwrite_replaces_whole_folder_and_leaves_no_temporaries(tmp_path):
    hp = _hp()
    uri = str(tmp_path / "m")
    save_artifact(uri, model=_model(hp, seed=0), hyperparameters=hp, class_names=None,
                  mean=MEAN, std=STD, epoch=1)
    second = _model(hp, seed=1)
    save_artifact(uri, model=second, hyperparameters=hp, class_names=None, mean=MEAN, std=STD,
                  epoch=2)
    loaded, info = load_model(uri)
    assert info.epoch == 2
    _assert_same_outputs(second, loaded)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_incomplete_or_corrupt_artifacts_are_refused(tmp_path):
    hp = _hp()
    uri = str(tmp_path / "m")
    save_artifact(uri, model=_model(hp), hyperparameters=hp, class_names=None, mean=MEAN, std=STD)
    weights = Path(uri, "model.pt")
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(DataError, match="sha256"):
        load_model(uri)
    Path(uri, MARKER_FILE).unlink()
    with pytest.raises(DataError, match="incomplete"):
        load_model(uri)
    with pytest.raises(DataError, match="not a kubeseg model artifact"):
        load_model(str(tmp_path))


def test_incremental_training_requires_matching_model(tmp_path):
    hp = _hp()
    save_artifact(str(tmp_path / "m"), model=_model(hp), hyperparameters=hp, class_names=None,
                  mean=MEAN, std=STD)
    info = read_info(str(tmp_path / "m"))
    check_incremental(_hp(crop_size=64, epochs=3, learning_rate=0.01), info, "m")  # 60 -> 64
    with pytest.raises(ConfigError) as err:
        check_incremental(_hp(algorithm="fcn", num_classes=4, crop_size=96), info, "s3://b/m")
    text = str(err.value)
    assert "algorithm=fcn but the model channel s3://b/m was trained with algorithm=psp" in text
    assert "num_classes=4" in text and "crop_size=96" in text
    assert "backbone" not in text
