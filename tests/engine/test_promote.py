"""Champion promotion and the gate's champion lookup, locally and on the S3 test server."""
import json
import logging

import pytest
import torch

from kubeseg import storage
from kubeseg.artifact import MARKER_FILE, save_artifact
from kubeseg.config import Hyperparameters
from kubeseg.engine.gate import quality_gate, read_champion_metrics
from kubeseg.engine.promote import champion_metrics_uri, promote
from kubeseg.errors import DataError
from kubeseg.models import build_model


def _artifact(uri, seed=0):
    hp = Hyperparameters.from_dict(dict(algorithm="fcn", backbone="resnet-18", num_classes=3,
                                        num_training_samples=4, crop_size=32))
    torch.manual_seed(seed)
    model = build_model(algorithm=hp.algorithm, backbone=hp.backbone, num_classes=3).eval()
    save_artifact(uri, model=model, hyperparameters=hp)
    return model


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path)
    return request.getfixturevalue("bucket")


def test_promotion_copies_the_model_and_then_its_metrics(root):
    import kubeseg

    model = _artifact(storage.join(root, "runs/r1/model"))
    metrics_uri = storage.join(root, "runs/r1/evaluation/metrics.json")
    storage.write_text(metrics_uri, json.dumps({"mIOU": 0.61}))
    champion = storage.join(root, "models/champion")
    result = promote(storage.join(root, "runs/r1/model"), metrics_uri, champion)

    assert result.model_uri == storage.join(champion, "model")
    assert json.loads(storage.read_text(champion_metrics_uri(champion))) == {"mIOU": 0.61}
    loaded, _ = kubeseg.load_model(result.model_uri)
    x = torch.randn(1, 3, 40, 36)
    with torch.no_grad():
        assert torch.equal(loaded(x)["out"], model(x)["out"])
    assert read_champion_metrics(champion_metrics_uri(champion)) == {"mIOU": 0.61}


def test_a_new_champion_replaces_the_old_one_whole(root):
    import kubeseg

    champion = storage.join(root, "champion")
    for run, miou in (("a", 0.5), ("b", 0.7)):
        _artifact(storage.join(root, run, "model"), seed=len(run) + int(miou * 10))
        storage.write_text(storage.join(root, run, "metrics.json"), json.dumps({"mIOU": miou}))
    promote(storage.join(root, "a/model"), storage.join(root, "a/metrics.json"), champion)
    storage.write_bytes(storage.join(champion, "model", "leftover.bin"), b"old")
    promote(storage.join(root, "b/model"), storage.join(root, "b/metrics.json"), champion)
    assert "leftover.bin" not in storage.list_files(storage.join(champion, "model"))
    assert storage.list_files(storage.join(champion, "model")) == storage.list_files(
        storage.join(root, "b/model"))
    kubeseg.load_model(storage.join(champion, "model"))
    assert read_champion_metrics(champion_metrics_uri(champion))["mIOU"] == 0.7


def test_only_a_complete_artifact_is_promoted(tmp_path):
    _artifact(str(tmp_path / "model"))
    (tmp_path / "model" / MARKER_FILE).unlink()
    (tmp_path / "metrics.json").write_text('{"mIOU": 0.5}')
    with pytest.raises(DataError, match="not a complete model artifact"):
        promote(str(tmp_path / "model"), str(tmp_path / "metrics.json"),
                str(tmp_path / "champion"))
    assert not (tmp_path / "champion").exists()


def test_no_champion_yet_is_a_warning_and_the_gate_uses_the_floor(tmp_path, caplog):
    missing = str(tmp_path / "champion" / "metrics.json")
    with caplog.at_level(logging.WARNING, logger="kubeseg.engine.gate"):
        assert read_champion_metrics(missing) is None
    assert "no champion yet" in caplog.text and missing in caplog.text
    decision = quality_gate({"mIOU": 0.4}, min_miou=0.3, previous_metrics=None)
    assert decision.passed and "previous" not in decision.reason
    assert read_champion_metrics("") is None


def test_a_champion_with_unreadable_metrics_is_still_an_error(tmp_path):
    (tmp_path / "metrics.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        read_champion_metrics(str(tmp_path / "metrics.json"))
