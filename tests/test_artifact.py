"""Model artifact: round trip (local and S3), plain-PyTorch loading, atomicity, incremental checks."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import kubeseg
from kubeseg import storage
from kubeseg.artifact import ClassInfo, MARKER_FILE, load_model, read_info, save_artifact
from kubeseg.config import Hyperparameters
from kubeseg.engine.train import check_incremental
from kubeseg.errors import ConfigError, DataError
from kubeseg.models import build_model
from testkit import random_model

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.2, 0.2)


def _hp(**changes) -> Hyperparameters:
    values = dict(algorithm="psp", backbone="resnet-18", num_classes=3, num_training_samples=8,
                  crop_size=60)
    values.update(changes)
    return Hyperparameters.from_dict(values)


def _assert_same_outputs(a, b):
    x = torch.randn(1, 3, 41, 37)
    with torch.no_grad():
        assert torch.equal(a(x)["out"], b(x)["out"])


@pytest.mark.parametrize("where", ["local", "s3"])
def test_round_trip(tmp_path, where, request):
    base = request.getfixturevalue("bucket") if where == "s3" else str(tmp_path)
    uri = storage.join(base, "run", "model")
    hp = _hp()
    model = random_model(hp)
    save_artifact(uri, model=model, hyperparameters=hp,
                  classes=ClassInfo(names=["bg", "disc", "square"], label_map={"scale": 1}),
                  metrics={"mIOU": 0.75, "per_class_iou": [1.0, float("nan"), 0.5]},
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
    model = random_model(hp)
    save_artifact(str(tmp_path / "m"), model=model, hyperparameters=hp,
                  mean=MEAN, std=STD)
    version = json.loads((tmp_path / "m" / MARKER_FILE).read_text())["version"]
    meta = json.loads((tmp_path / "m" / version / "kubeseg.json").read_text())
    assert meta["class_names"] == ["class_0", "class_1", "class_2"]
    rebuilt = build_model(algorithm=meta["algorithm"], backbone=meta["backbone"],
                          num_classes=meta["num_classes"], aux_loss=meta["aux_head"])
    state = torch.load(tmp_path / "m" / version / "model.pt", map_location="cpu",
                       weights_only=True)
    rebuilt.load_state_dict(state)
    _assert_same_outputs(model, rebuilt.eval())
    assert json.loads((tmp_path / "m" / version / "hyperparams.json").read_text())[
        "algorithm"] == "deeplab"
    # the copy at the top names the version, for tools that read the metrics
    assert json.loads((tmp_path / "m" / "kubeseg.json").read_text())["version"] == version


def test_default_normalisation_is_the_transforms(tmp_path):
    from kubeseg.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    hp = _hp()
    save_artifact(str(tmp_path / "m"), model=random_model(hp), hyperparameters=hp)
    info = read_info(str(tmp_path / "m"))
    assert info.mean == tuple(IMAGENET_MEAN) and info.std == tuple(IMAGENET_STD)


def test_overwrite_replaces_whole_folder_and_leaves_no_temporaries(tmp_path):
    hp = _hp()
    uri = str(tmp_path / "m")
    save_artifact(uri, model=random_model(hp, seed=0), hyperparameters=hp,
                  mean=MEAN, std=STD, epoch=1)
    second = random_model(hp, seed=1)
    save_artifact(uri, model=second, hyperparameters=hp, mean=MEAN, std=STD,
                  epoch=2)
    loaded, info = load_model(uri)
    assert info.epoch == 2
    _assert_same_outputs(second, loaded)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_load_model_gets_each_file_of_the_version_once_from_object_storage(bucket,
                                                                          monkeypatch):
    hp = _hp()
    uri = storage.join(bucket, "run", "model")
    model = random_model(hp)
    save_artifact(uri, model=model, hyperparameters=hp, mean=MEAN, std=STD)
    gets = []
    real_read_bytes = storage.read_bytes

    def counting_read_bytes(target, settings=None):  # the real GET, counted
        gets.append(target)
        return real_read_bytes(target, settings)

    monkeypatch.setattr(storage, "read_bytes", counting_read_bytes)
    loaded, info = load_model(uri)
    names = sorted(target[len(uri):].lstrip("/").split("/")[-1] for target in gets)
    assert names == [MARKER_FILE, "hyperparams.json", "kubeseg.json", "model.pt"], gets
    assert all(target.startswith(info.files_uri) for target in gets
               if not target.endswith(MARKER_FILE))
    _assert_same_outputs(model, loaded)


def test_local_version_honours_the_umask_and_never_changes_it(tmp_path, monkeypatch):
    import os
    import stat

    hp = _hp()
    model = random_model(hp)
    calls = []
    real_umask = os.umask

    def recording_umask(mask):  # the real call, recorded
        calls.append(mask)
        return real_umask(mask)

    previous = real_umask(0o027)
    try:
        monkeypatch.setattr(os, "umask", recording_umask)
        uri = str(tmp_path / "m")
        save_artifact(uri, model=model, hyperparameters=hp, mean=MEAN,
                      std=STD)
    finally:
        real_umask(previous)
    assert calls == [], "save_artifact changed the process umask"
    version = json.loads(Path(uri, MARKER_FILE).read_text())["version"]
    assert stat.S_IMODE(Path(uri, version).stat().st_mode) == 0o750
    for name in ("model.pt", "hyperparams.json", "kubeseg.json"):
        assert stat.S_IMODE(Path(uri, version, name).stat().st_mode) == 0o640, name


@pytest.mark.parametrize("key,value", [("num_classes", 4), ("algorithm", "fcn"),
                                       ("backbone", "resnet-50"), ("crop_size", 48)])
def test_metadata_that_contradicts_the_hyperparameters_is_refused(tmp_path, key, value):
    hp = _hp()
    uri = str(tmp_path / "m")
    save_artifact(uri, model=random_model(hp), hyperparameters=hp, mean=MEAN,
                  std=STD)
    info = read_info(uri)
    assert (info.num_classes, info.algorithm, info.backbone, info.crop_size) == (
        hp.num_classes, hp.algorithm, hp.backbone, hp.effective_crop_size)
    version = json.loads(Path(uri, MARKER_FILE).read_text())["version"]
    meta_path = Path(uri, version, "kubeseg.json")
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), key: value}))
    with pytest.raises(DataError, match=f"kubeseg.json says {key}={value!r} but "
                                        f"hyperparams.json says"):
        read_info(uri)


def test_incomplete_or_corrupt_artifacts_are_refused(tmp_path):
    hp = _hp()
    uri = str(tmp_path / "m")
    save_artifact(uri, model=random_model(hp), hyperparameters=hp, mean=MEAN, std=STD)
    version = json.loads(Path(uri, MARKER_FILE).read_text())["version"]
    weights = Path(uri, version, "model.pt")
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
    save_artifact(str(tmp_path / "m"), model=random_model(hp), hyperparameters=hp,
                  mean=MEAN, std=STD)
    info = read_info(str(tmp_path / "m"))
    check_incremental(_hp(crop_size=64, epochs=3, learning_rate=0.01), info, "m")  # 60 -> 64
    with pytest.raises(ConfigError) as err:
        check_incremental(_hp(algorithm="fcn", num_classes=4, crop_size=96), info, "s3://b/m")
    text = str(err.value)
    assert "algorithm=fcn but the model channel s3://b/m was trained with algorithm=psp" in text
    assert "num_classes=4" in text and "crop_size=96" in text
    assert "backbone" not in text


# --------------------------------------------------------------------------------------------
# A writer killed at every step: a reader always loads the previous model or the new one

_KILLED_WRITER = r"""
import os, shutil, signal, sys
import torch
from kubeseg import storage
from kubeseg.artifact import save_artifact
from kubeseg.config import Hyperparameters
from kubeseg.models import build_model

uri, kill_at, weights, epoch = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
steps = [0]


def counted(function):
    def step(*args, **kwargs):
        steps[0] += 1
        if steps[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return function(*args, **kwargs)
    return step


# every write, rename and removal the writer makes is a step it can be killed before
for module, name in ((storage, "write_bytes"), (storage, "delete"), (os, "rename"),
                     (os, "replace"), (shutil, "rmtree")):
    setattr(module, name, counted(getattr(module, name)))
hp = Hyperparameters.from_dict(dict(algorithm="psp", backbone="resnet-18", num_classes=3,
                                    num_training_samples=8, crop_size=60))
model = build_model(algorithm="psp", backbone="resnet-18", num_classes=3)
model.load_state_dict(torch.load(weights, weights_only=True))
save_artifact(uri, model=model.eval(), hyperparameters=hp, epoch=epoch)
print("steps", steps[0])
"""


def _first_weight(model) -> torch.Tensor:
    return next(iter(model.state_dict().values())).clone()


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("where", ["local", "s3"])
def test_writer_killed_at_each_step_never_loses_the_model(tmp_path, where, request):
    import os
    import subprocess
    import sys

    base = request.getfixturevalue("bucket") if where == "s3" else str(tmp_path / "out")
    uri = storage.join(base, "model")
    hp = _hp()
    old, new = random_model(hp, seed=0), random_model(hp, seed=1)
    save_artifact(uri, model=old, hyperparameters=hp, epoch=1)
    new_weights = tmp_path / "new.pt"
    torch.save(new.state_dict(), new_weights)
    expected = {1: _first_weight(old), 2: _first_weight(new)}
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    seen, kill_at = [], 1
    while True:
        done = subprocess.run([sys.executable, "-c", _KILLED_WRITER, uri, str(kill_at),
                               str(new_weights), "2"], env=env, capture_output=True, text=True,
                              timeout=300)
        killed = done.returncode == -9
        assert killed or done.returncode == 0, done.stderr[-2000:]
        loaded, info = load_model(uri)  # what a reader sees after the writer stopped here
        assert info.epoch in (1, 2), (kill_at, info.epoch)
        assert torch.equal(_first_weight(loaded), expected[info.epoch]), kill_at
        seen.append(info.epoch)
        if not killed:
            break
        kill_at += 1
    assert kill_at >= 5, "the writer should take several steps"
    assert seen[0] == 1 and seen[-1] == 2 and seen == sorted(seen), seen
    # the last writer removed what the killed ones left: the current and the previous version
    names = storage.list_files(uri)
    versions = {n.split("/")[0] for n in names if "/" in n}
    assert len(versions) <= 2, names
    assert set(n for n in names if "/" not in n) == {MARKER_FILE, "kubeseg.json"}, names
    if where == "local":
        assert sorted(p.name for p in Path(base).iterdir()) == ["model"]
        assert not [p for p in Path(uri).rglob(".*")], "temporary files left behind"
    print(f"{where}: killed at each of {kill_at - 1} steps; a reader loaded epochs {seen}")


def test_empty_and_truncated_checkpoints_get_the_same_clear_error(tmp_path):
    from kubeseg.engine.checkpoint import load_checkpoint, save_checkpoint

    uri = str(tmp_path / "checkpoints" / "last.pt")
    save_checkpoint(uri, {"epoch": 3, "weights": torch.zeros(1000)})
    data = Path(uri).read_bytes()
    for damaged in (data[: len(data) // 2], b""):
        Path(uri).write_bytes(damaged)
        with pytest.raises(DataError, match=r"checkpoint .*last.pt cannot be read .*delete it"):
            load_checkpoint(uri)


def test_checkpoint_writer_removes_temporary_leftovers(tmp_path):
    from kubeseg.engine.checkpoint import load_checkpoint, save_checkpoint

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / ".last.pt.abc123.tmp").write_bytes(b"half a checkpoint")
    (folder / "keep.txt").write_text("not ours")
    save_checkpoint(str(folder / "last.pt"), {"epoch": 1})
    assert sorted(p.name for p in folder.iterdir()) == ["keep.txt", "last.pt"]
    assert load_checkpoint(str(folder / "last.pt"))["epoch"] == 1


def test_flat_layout_of_earlier_versions_loads_and_is_replaced(tmp_path):
    import shutil

    hp = _hp()
    uri = tmp_path / "m"
    old = random_model(hp, seed=0)
    save_artifact(str(uri), model=old, hyperparameters=hp, epoch=1)
    version = json.loads((uri / MARKER_FILE).read_text())["version"]
    for path in (uri / version).iterdir():  # the flat layout: files beside the marker
        shutil.move(str(path), str(uri / path.name))
    (uri / version).rmdir()
    meta = json.loads((uri / "kubeseg.json").read_text())
    (uri / MARKER_FILE).write_text(json.dumps({"format_version": 1,
                                               "weights_sha256": meta["weights_sha256"]}))
    loaded, info = load_model(str(uri))
    assert info.epoch == 1 and info.files_uri == str(uri)
    _assert_same_outputs(old, loaded)
    new = random_model(hp, seed=1)
    save_artifact(str(uri), model=new, hyperparameters=hp, epoch=2)
    loaded, info = load_model(str(uri))
    assert info.epoch == 2
    _assert_same_outputs(new, loaded)
    assert not (uri / "model.pt").exists() and not (uri / "hyperparams.json").exists()


def test_the_pointer_reaches_the_disk_before_and_after_its_rename(tmp_path, monkeypatch):
    """The flushes and renames in order (a power loss cannot be simulated here)."""
    from testkit import record_flushes_and_renames

    events = record_flushes_and_renames(monkeypatch)
    uri = tmp_path / "model"
    hp = _hp()
    save_artifact(str(uri), model=random_model(hp), hyperparameters=hp,
                  classes=ClassInfo(names=["a", "b", "c"]), metrics={}, epoch=1)
    folder = str(uri.resolve())
    marker = str(uri.resolve() / MARKER_FILE)
    switch = next(i for i, e in enumerate(events) if e[0] == "rename" and e[2] == marker)
    temporary = events[switch][1]
    assert events[switch - 2:switch] == [("fsync", temporary), ("fsync", folder)], events
    assert events[switch + 1] == ("fsync", folder), events
    # the version the pointer names is on disk before: its files, its folder, the rename
    version = json.loads((uri / MARKER_FILE).read_text())["version"]
    version_rename = next(i for i, e in enumerate(events)
                          if e[0] == "rename" and e[2] == f"{folder}/{version}")
    hidden = events[version_rename][1]
    assert ("fsync", f"{hidden}/model.pt") in events[:version_rename]
    assert events[version_rename - 1] == ("fsync", hidden)
    assert events[version_rename + 1] == ("fsync", folder)
    assert version_rename < switch
