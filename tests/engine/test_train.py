"""Training engine: learning, resume after a kill, CLI end to end, schedules, early stopping."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kubeseg import storage
from kubeseg.artifact import load_model
from kubeseg.config import Hyperparameters
from kubeseg.data.synthetic import make_shapes_dataset
from kubeseg.engine import checkpoint as ckpt
from kubeseg.engine.optim import build_optimizer, lr_factor
from kubeseg.engine.step import build_loss
from kubeseg.engine.train import TrainOptions, train
from kubeseg.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
IN_PROCESS = TrainOptions(workers=0)  # data loaded in the test process


def _channels(root):
    from kubeseg.data.channels import Channels

    return Channels.from_root(str(root))


def _hp(**changes) -> Hyperparameters:
    values = dict(backbone="resnet-18", algorithm="fcn", num_classes=3, num_training_samples=8,
                  crop_size=32, base_size=40, epochs=1, mini_batch_size=4,
                  validation_mini_batch_size=2, use_pretrained_model=False, optimizer="adam",
                  learning_rate=0.003)
    values.update(changes)
    return Hyperparameters.from_dict(values)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes32")
    make_shapes_dataset(root, n_train=8, n_val=2, size=32, num_classes=3, seed=1)
    return root


# -- learning ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_learns_coloured_shapes_to_high_miou(tmp_path):
    # 96 px: at output stride 8 the shapes' outlines can be resolved to mIoU ~0.94.
    make_shapes_dataset(tmp_path / "data", n_train=16, n_val=8, size=96, num_classes=3, seed=0)
    hp = _hp(num_training_samples=16, crop_size=96, base_size=96, epochs=14,
             validation_mini_batch_size=1)
    result = train(hp, _channels(tmp_path / "data"), str(tmp_path / "out"),
                   options=TrainOptions(workers=0, log_every=100))
    losses = [r["train:loss"] for r in result.history]
    assert losses[-1] < 0.6 * losses[0]
    assert result.best_miou > 0.8, result.history
    lines = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == list(range(1, 15))
    model, info = load_model(result.artifact_uri)
    assert info.epoch == result.best_epoch
    assert info.metrics["mIOU"] == pytest.approx(result.best_miou)


# -- CLI end to end, kill and resume -------------------------------------------------------
def _cli(data, output, *extra):
    return [sys.executable, "-m", "kubeseg", "train", "--data-root", str(data), "--output",
            str(output), "--workers", "0", "--log-every", "1", "--device", "cpu", *extra]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    return env


def _final_weights(output):
    return ckpt.load_checkpoint(ckpt.checkpoint_uri(str(output)))


@pytest.mark.slow
def test_cli_end_to_end_and_killed_run_resumes_to_identical_weights(tiny, tmp_path):
    hp_file = tmp_path / "hp.json"
    # SageMaker-style: every value a string; --set overrides the file.
    hp_file.write_text(json.dumps({
        "backbone": "resnet-18", "algorithm": "psp", "num_classes": "3",
        "num_training_samples": "8", "crop_size": "32", "base_size": "40", "epochs": "9",
        "mini_batch_size": "2", "validation_mini_batch_size": "2",
        "use_pretrained_model": "False", "optimizer": "sgd", "learning_rate": "0.01",
        "seed": "7"}))
    args = ["--hyperparameters", str(hp_file), "--set", "epochs=3", "--class-names", "bg,a,b"]

    full = tmp_path / "full"
    proc = subprocess.run(_cli(tiny, full, *args), env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "epoch 2/3 iter 4/4 loss" in proc.stderr  # progress lines
    assert "train:loss" in proc.stderr
    records = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    for r in records:
        assert {"train:loss", "validation:mIOU", "validation:pixel_accuracy", "throughput",
                "lr"} <= set(r)
    model, info = load_model(str(full / "model"))
    assert info.class_names == ["bg", "a", "b"] and info.hyperparameters.epochs == 3
    assert info.hyperparameters.algorithm == "psp" and info.hyperparameters.seed == 7
    with torch.no_grad():
        assert model(torch.randn(1, 3, 37, 29))["out"].shape == (1, 3, 37, 29)

    # The same training, killed (SIGKILL, no clean-up) once its epoch-2 checkpoint is written.
    resumed = tmp_path / "resumed"
    victim = subprocess.Popen(_cli(tiny, resumed, *args), env=_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = resumed / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and victim.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=60)
    assert _final_weights(resumed)["epoch"] == 2, "the run was not stopped after epoch 2"

    proc = subprocess.run(_cli(tiny, resumed, *args), env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from" in proc.stderr and "after epoch 2" in proc.stderr
    a, b = _final_weights(full), _final_weights(resumed)
    assert a["epoch"] == b["epoch"] == 3
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    strip = ("throughput", "time_s")
    assert ([{k: v for k, v in r.items() if k not in strip} for r in a["history"]]
            == [{k: v for k, v in r.items() if k not in strip} for r in b["history"]])
    assert [json.loads(line)["epoch"] for line in metrics.read_text().splitlines()] == [1, 2, 3]

    # A restart of a finished run does nothing more and keeps the results.
    proc = subprocess.run(_cli(tiny, resumed, *args), env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and _final_weights(resumed)["epoch"] == 3


def test_cli_reports_bad_hyperparameters_before_work(tiny, tmp_path):
    proc = subprocess.run(_cli(tiny, tmp_path / "o", "--set", "num_classes=3", "--set",
                               "num_training_samples=8", "--set", "learning_rate=5",
                               "--set", "optimiser=adam"),
                          env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "learning_rate='5'" in proc.stderr and "(0, 1]" in proc.stderr
    assert "did you mean 'optimizer'" in proc.stderr
    assert not (tmp_path / "o").exists()


# -- engine options ------------------------------------------------------------------------
def test_early_stopping_and_bfloat16_on_cpu(tiny, tmp_path):
    # tolerance 1.0 = an epoch must double the mIoU to count as an improvement
    hp = _hp(epochs=6, early_stopping=True, early_stopping_min_epochs=2,
             early_stopping_patience=1, early_stopping_tolerance=1.0,
             precision_dtype="bfloat16", lr_scheduler="step", lr_scheduler_step="1",
             optimizer="rmsprop", learning_rate=0.001)
    result = train(hp, _channels(tiny), str(tmp_path / "out"), options=IN_PROCESS)
    assert result.stopped_early
    assert 2 <= len(result.history) < 6
    assert result.history[1]["lr"] == pytest.approx(0.0001)  # step after epoch 1
    assert all(math.isfinite(r["train:loss"]) for r in result.history)


def test_incremental_training_starts_from_the_artifact(tiny, tmp_path):
    first = train(_hp(), _channels(tiny), str(tmp_path / "a"), options=IN_PROCESS)
    earlier, _ = load_model(first.artifact_uri)
    hp = _hp(optimizer="sgd", learning_rate=1e-9, momentum=0.1, weight_decay=1e-12)
    second = train(hp, _channels(tiny), str(tmp_path / "b"), options=IN_PROCESS,
                   initial_model_uri=first.artifact_uri)
    later = second.model.state_dict()
    for key, value in earlier.state_dict().items():
        if key.endswith("weight") and "bn" not in key and value.dim() == 4:
            assert torch.allclose(later[key].cpu(), value, atol=1e-6), key
    with pytest.raises(ConfigError, match="num_classes=4 but the model channel"):
        train(_hp(num_classes=4), _channels(tiny), str(tmp_path / "c"), options=IN_PROCESS,
              initial_model_uri=first.artifact_uri)
    assert not (tmp_path / "c" / "model").exists()


def test_resume_refuses_a_different_model(tiny, tmp_path):
    train(_hp(), _channels(tiny), str(tmp_path / "out"), options=IN_PROCESS)
    with pytest.raises(ConfigError, match="algorithm=deeplab differs from the checkpoint"):
        train(_hp(algorithm="deeplab", epochs=2), _channels(tiny), str(tmp_path / "out"),
              options=IN_PROCESS)


def test_outputs_on_s3(tiny, bucket):
    output = f"{bucket}/runs/one"
    result = train(_hp(), _channels(tiny), output, options=IN_PROCESS)
    assert storage.exists(f"{output}/metrics.jsonl")
    assert storage.exists(f"{output}/checkpoints/last.pt")
    model, info = load_model(result.artifact_uri)
    assert info.epoch == 1


def test_pretrained_backbone_uri_is_used(tiny, tmp_path):
    import torchvision

    torch.manual_seed(3)
    reference = torchvision.models.resnet18(weights=None)
    torch.save(reference.state_dict(), tmp_path / "r18.pth")
    hp = _hp(use_pretrained_model=True, optimizer="sgd", learning_rate=1e-9, momentum=0.1,
             weight_decay=1e-12)
    result = train(hp, _channels(tiny), str(tmp_path / "out"), options=IN_PROCESS,
                   pretrained_uri=str(tmp_path / "r18.pth"))
    assert torch.allclose(result.model.backbone.body.conv1.weight, reference.conv1.weight,
                          atol=1e-6)


# -- schedules, optimizers, loss -----------------------------------------------------------
def test_learning_rate_schedules():
    poly = _hp(epochs=2, lr_scheduler="poly")
    assert lr_factor(poly, 0, 10) == 1.0
    assert lr_factor(poly, 10, 10) == pytest.approx(0.5 ** 0.9)
    assert lr_factor(poly, 20, 10) == 0.0
    cosine = _hp(epochs=2, lr_scheduler="cosine")
    assert lr_factor(cosine, 10, 10) == pytest.approx(0.5)
    assert lr_factor(cosine, 20, 10) == pytest.approx(0.0)
    step = _hp(epochs=30, lr_scheduler="step", lr_scheduler_step="10, 20",
               lr_scheduler_factor=0.5)
    assert [lr_factor(step, e * 10, 10) for e in (0, 9, 10, 19, 20, 29)] == [
        1, 1, 0.5, 0.5, 0.25, 0.25]


def test_optimizers_follow_the_hyperparameters():
    params = [torch.nn.Parameter(torch.zeros(2))]
    nag = build_optimizer(params, _hp(optimizer="nag", momentum=0.8, weight_decay=0.01))
    assert isinstance(nag, torch.optim.SGD)
    assert nag.defaults["nesterov"] and nag.defaults["momentum"] == 0.8
    assert nag.defaults["weight_decay"] == 0.01
    rms = build_optimizer(params, _hp(optimizer="rmsprop", gamma1=0.95, gamma2=0.5))
    assert isinstance(rms, torch.optim.RMSprop)
    assert rms.defaults["alpha"] == 0.95 and rms.defaults["momentum"] == 0.5
    assert isinstance(build_optimizer(params, _hp(optimizer="adagrad")), torch.optim.Adagrad)
    assert isinstance(build_optimizer(params, _hp(optimizer="adam")), torch.optim.Adam)
    sgd = build_optimizer(params, _hp(optimizer="sgd", learning_rate=0.2))
    assert not sgd.defaults["nesterov"] and sgd.defaults["lr"] == 0.2


def test_loss_uses_class_weights_ignore_index_and_aux_weight():
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 4, 4)
    target = torch.randint(0, 3, (1, 4, 4))
    target[0, 0] = 255
    plain = build_loss(_hp(aux_loss_weight=0.0), torch.device("cpu"))({"out": logits}, target)
    keep = target != 255
    expected = torch.nn.functional.cross_entropy(logits, target, ignore_index=255)
    assert plain == pytest.approx(float(expected))
    weighted = build_loss(_hp(class_weights="1, 0, 0"), torch.device("cpu"))({"out": logits},
                                                                            target)
    only0 = torch.nn.functional.cross_entropy(
        logits.permute(0, 2, 3, 1)[keep & (target == 0)], target[keep & (target == 0)])
    assert weighted == pytest.approx(float(only0), rel=1e-5)
    with_aux = build_loss(_hp(aux_loss_weight=0.5), torch.device("cpu"))(
        {"out": logits, "aux": logits}, target)
    assert with_aux == pytest.approx(1.5 * float(expected))


# -- class_weights=auto ----------------------------------------------------------------------
def _expected_auto_weights(annotation_dir: Path, num_classes: int):
    """Square-root median frequency, counted independently of kubeseg's code."""
    import numpy as np
    from PIL import Image

    pixels = np.zeros(num_classes)
    image_pixels = np.zeros(num_classes)
    for path in sorted(annotation_dir.glob("*.png")):
        mask = np.asarray(Image.open(path))
        for c in range(num_classes):
            n = int((mask == c).sum())
            pixels[c] += n
            image_pixels[c] += mask.size if n else 0
    freq = pixels / image_pixels
    return np.sqrt(np.median(freq) / freq)


def test_auto_class_weights_from_the_training_split_are_used_logged_and_stored(
        tiny, tmp_path, caplog):
    import logging

    expected = _expected_auto_weights(tiny / "train_annotation", 3)
    assert expected.max() > 1.05 * expected.min(), "the tiny data should be imbalanced"
    caplog.set_level(logging.INFO, logger="kubeseg.engine")
    result = train(_hp(class_weights="auto"), _channels(tiny), str(tmp_path / "out"),
                   options=IN_PROCESS, class_names=["bg", "disc", "square"])
    _, info = load_model(result.artifact_uri)
    assert info.hyperparameters.class_weights == "auto"
    assert info.class_weights == pytest.approx(list(expected), rel=1e-9)
    line = next(r.getMessage() for r in caplog.records if "class_weights=auto" in r.getMessage())
    assert "8 images" in line
    for name, weight in zip(["bg", "disc", "square"], expected):
        assert f"{name} {weight:.4f}" in line
    # Explicit weights are stored as given; no weights are stored as null.
    explicit = train(_hp(class_weights="1, 2, 3"), _channels(tiny), str(tmp_path / "explicit"),
                     options=IN_PROCESS)
    assert load_model(explicit.artifact_uri)[1].class_weights == [1.0, 2.0, 3.0]
    plain = train(_hp(), _channels(tiny), str(tmp_path / "plain"), options=IN_PROCESS)
    assert load_model(plain.artifact_uri)[1].class_weights is None


def test_auto_class_weights_are_the_same_from_shards_and_split_across_ranks(tiny, tmp_path):
    from kubeseg.data.channels import Channels
    from kubeseg.data.ingest import ingest_channels
    from kubeseg.data.statistics import split_statistics, sqrt_median_frequency_weights

    ingest_channels(_channels(tiny), str(tmp_path / "shards"), shard_size_mb=0.002,
                    row_group_rows=2)
    expected = _expected_auto_weights(tiny / "train_annotation", 3)
    for channels in (_channels(tiny), Channels(shards=str(tmp_path / "shards"))):
        whole = split_statistics(channels, "train", 3)
        parts = [split_statistics(channels, "train", 3, rank=r, world_size=3) for r in range(3)]
        summed = parts[0].merge(parts[1]).merge(parts[2])
        assert summed.images == whole.images == 8
        assert list(summed.pixels) == list(whole.pixels)
        assert sqrt_median_frequency_weights(summed) == pytest.approx(list(expected), rel=1e-9)


def test_auto_class_weights_give_absent_classes_a_neutral_weight():
    import numpy as np

    from kubeseg.data.statistics import ClassStatistics, sqrt_median_frequency_weights

    stats = ClassStatistics.empty(4)
    stats.add(np.array([[0, 0, 0, 1]], dtype=np.uint8))  # image 1: 3/4 class 0, 1/4 class 1
    stats.add(np.array([[0, 2, 255, 255]], dtype=np.uint8))  # ignore counts for no class
    # freq: class 0 = 4/8, class 1 = 1/4, class 2 = 1/4; class 3 absent; median 1/4
    assert sqrt_median_frequency_weights(stats) == pytest.approx(
        [math.sqrt(0.25 / 0.5), 1.0, 1.0, 1.0])
    from kubeseg.errors import DataError

    with pytest.raises(DataError, match="no labelled pixel"):
        sqrt_median_frequency_weights(ClassStatistics.empty(3))


# -- the schedule against the data ------------------------------------------------------------
def test_a_schedule_ending_before_training_is_a_warning_naming_num_training_samples(
        tiny, tmp_path, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="kubeseg.engine")
    # 8 training images, batch 4: 2 iterations per epoch, but the schedule counts 1.
    result = train(_hp(num_training_samples=4, epochs=2), _channels(tiny), str(tmp_path / "a"),
                   options=IN_PROCESS)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    (line,) = [w for w in warnings if "num_training_samples" in w]
    assert "num_training_samples=4" in line and "holds 8 samples" in line
    assert "after 2 of 4 iterations" in line
    assert result.history[0]["lr"] == 0.0  # what the warning is about: half the run at 0
    caplog.clear()
    result = train(_hp(num_training_samples=8, epochs=2), _channels(tiny), str(tmp_path / "b"),
                   options=IN_PROCESS)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert result.history[0]["lr"] > 0.0


# -- the step, its state, its result ----------------------------------------------------------
def _parts(hp, model=None):
    from kubeseg.engine.step import build_parts
    from kubeseg.models import build_model

    torch.manual_seed(0)
    model = model or build_model(algorithm=hp.algorithm, backbone=hp.backbone,
                                 num_classes=hp.num_classes, aux_loss=True)
    return build_parts(model, hp, torch.device("cpu"), iters_per_epoch=2)


def test_train_step_is_the_same_in_channels_last_and_steps_the_schedule():
    from kubeseg.engine.step import train_step

    torch.manual_seed(1)
    images, masks = torch.randn(2, 3, 32, 32), torch.randint(0, 3, (2, 32, 32))
    masks[0, :4] = 255
    runs = {}
    for channels_last in (False, True):
        parts = _parts(_hp(channels_last=channels_last, optimizer="sgd", learning_rate=0.01))
        assert parts.model.backbone.body.conv1.weight.is_contiguous(
            memory_format=torch.channels_last) == channels_last
        before = parts.model.backbone.body.conv1.weight.detach().clone()
        losses = [float(train_step(parts, images, masks)) for _ in range(2)]
        runs[channels_last] = (losses, {k: v.detach().clone()
                                        for k, v in parts.model.state_dict().items()})
        assert parts.optimizer.param_groups[0]["lr"] == pytest.approx(0.0)  # 2 of 2 steps
        assert not torch.equal(before, parts.model.backbone.body.conv1.weight)
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-4)
    for key, value in runs[False][1].items():
        # float sums in another order: equal to rounding, not bit for bit
        assert torch.allclose(runs[True][1][key], value, rtol=1e-2, atol=1e-3), key


def test_train_state_and_early_stopping_round_trip_through_the_checkpoint(tmp_path):
    from kubeseg.engine.checkpoint import EarlyStopping, TrainState

    hp = _hp(early_stopping=True, early_stopping_min_epochs=2, early_stopping_patience=2,
             early_stopping_tolerance=0.1)
    state = TrainState(early_stopping=EarlyStopping.from_hyperparameters(hp))
    stops = []
    for epoch, miou in enumerate([0.5, 0.6, 0.62, 0.64, 0.7], start=1):
        state.end_epoch({"epoch": epoch}, miou)
        stops.append(state.stopped_early)
    # 0.6 > 0.5 x 1.1 improves; 0.62 and 0.64 do not beat 0.66: the second stops
    assert stops == [False, False, False, True, False]
    assert (state.best_miou, state.best_epoch) == (0.7, 5)
    uri = str(tmp_path / "last.pt")
    ckpt.save_checkpoint(uri, state.to_checkpoint())
    again = TrainState.from_checkpoint(ckpt.load_checkpoint(uri),
                                       EarlyStopping.from_hyperparameters(hp))
    assert again == state


def test_a_checkpoint_reaches_the_disk_before_it_replaces_the_last_one(tmp_path, monkeypatch):
    """Flushed file, flushed folder, rename, flushed folder: after a power loss the checkpoint
    is the previous one or the new one, never an empty file (recorded calls; see testkit)."""
    from testkit import record_flushes_and_renames

    uri = tmp_path / "checkpoints" / "last.pt"
    uri.parent.mkdir()
    ckpt.save_checkpoint(str(uri), {"epoch": 1})
    events = record_flushes_and_renames(monkeypatch)
    ckpt.save_checkpoint(str(uri), {"epoch": 2})
    folder = str(uri.parent.resolve())
    temporary = next((e[1] for e in events if e[0] == "rename"), None)
    assert events == [("fsync", temporary), ("fsync", folder),
                      ("rename", temporary, str(uri.resolve())), ("fsync", folder)], events
    assert ckpt.load_checkpoint(str(uri))["epoch"] == 2


def test_the_result_carries_what_a_pipeline_step_records(tiny, tmp_path):
    from kubeseg.engine.summary import summarize_training

    result = train(_hp(epochs=2), _channels(tiny), str(tmp_path / "out"), options=IN_PROCESS)
    summary = result.summary()
    assert summary == summarize_training(str(tmp_path / "out"))  # without reading files
    assert summary.metrics()["best/epoch"] == result.best_epoch
    assert summary.metrics()["best/validation:mIOU"] == pytest.approx(result.best_miou)
    assert storage.exists(result.metrics_uri) and storage.exists(result.checkpoint_uri)
    assert summary.artifact_uri == result.artifact_uri == str(tmp_path / "out" / "model")


@pytest.mark.slow
def test_compile_goes_through_the_same_step():
    from kubeseg.engine.step import train_step

    torch.manual_seed(1)
    images, masks = torch.randn(2, 3, 32, 32), torch.randint(0, 3, (2, 32, 32))
    losses = {}
    for compile in (False, True):
        parts = _parts(_hp(compile=compile, optimizer="sgd", learning_rate=0.01))
        assert (parts.net is not parts.model) == compile
        losses[compile] = [float(train_step(parts, images, masks)) for _ in range(2)]
    assert losses[True] == pytest.approx(losses[False], rel=1e-3)


def test_cudnn_benchmark_mode_is_on_only_inside_a_cuda_step_and_restored_after():
    from kubeseg.engine import step

    assert _parts(_hp()).autotune_convolutions is False  # built for the CPU
    before = torch.backends.cudnn.benchmark
    try:
        for setting in (False, True):
            torch.backends.cudnn.benchmark = setting
            with step._cudnn_autotune(True):
                assert torch.backends.cudnn.benchmark is True
            assert torch.backends.cudnn.benchmark is setting
            with step._cudnn_autotune(False):
                assert torch.backends.cudnn.benchmark is setting
        with pytest.raises(RuntimeError):
            torch.backends.cudnn.benchmark = False
            with step._cudnn_autotune(True):
                raise RuntimeError("a step that fails")
        assert torch.backends.cudnn.benchmark is False
    finally:
        torch.backends.cudnn.benchmark = before


def test_training_workers_persist_across_epochs_and_close_stops_them(tiny):
    import multiprocessing

    from kubeseg.engine import distributed as D
    from kubeseg.engine.loaders import build_loaders

    loaders = build_loaders(_hp(), _channels(tiny), D.DistContext(), workers=2)
    pids = []
    for epoch in (1, 2):
        loaders.start_epoch(epoch)
        assert sum(images.shape[0] for images, _ in loaders.train) == 8
        pids.append(sorted(w.pid for w in loaders.train._iterator._workers))
    assert pids[0] == pids[1]  # the same two workers served both epochs
    assert all(p in {c.pid for c in multiprocessing.active_children()} for p in pids[0])
    loaders.close()  # while the loaders are still referenced, as by a failed run's traceback
    assert not {c.pid for c in multiprocessing.active_children()} & set(pids[0])


# -- the size whole images are scored at --------------------------------------------------------
def test_inference_size_base_size_validates_as_evaluation_scores(tiny, tmp_path):
    from kubeseg.engine.evaluate import Scoring, evaluate

    hp = _hp(epochs=2, base_size=64, inference_size="base_size", validation_mini_batch_size=1)
    result = train(hp, _channels(tiny), str(tmp_path / "out"),
                   options=TrainOptions(workers=0, log_every=100))
    evaluation = evaluate(result.artifact_uri, _channels(tiny), str(tmp_path / "eval"),
                          scoring=Scoring(tile_size=None), device="cpu")
    assert evaluation.metrics["settings"]["inference_size"] == "base_size"
    assert evaluation.metrics["mIOU"] == pytest.approx(result.best_miou, abs=1e-6)


# -- the baseline drift monitoring compares with ----------------------------------------------
def test_the_artifact_records_the_training_histogram_and_the_validation_confidence(tiny,
                                                                                   tmp_path):
    """Class pixels of the training labels (counted here from the PNGs), and the best epoch's
    predicted classes and confidence histogram on the validation images (recomputed here from
    the stored model with numpy)."""
    import numpy as np
    from PIL import Image

    from kubeseg.data.transforms import EvalTransform
    from kubeseg.monitoring.drift import TrainingBaseline, confidence_counts

    result = train(_hp(validation_mini_batch_size=1), _channels(tiny), str(tmp_path / "out"),
                   options=IN_PROCESS)
    model, info = load_model(result.artifact_uri)
    baseline = TrainingBaseline.from_dict(info.training_baseline)
    labels = [np.array(Image.open(p)) for p in sorted((tiny / "train_annotation").glob("*.png"))]
    counted = np.bincount(np.concatenate([m.ravel() for m in labels]), minlength=256)[:3]
    assert baseline.class_pixels == tuple(float(v) for v in counted)
    assert baseline.train_images == 8 and baseline.validation_images == 2
    transform = EvalTransform(crop_size=None)
    confidences, predicted = [], []
    for path in sorted((tiny / "validation").iterdir()):
        mask = np.array(Image.open(tiny / "validation_annotation" / f"{path.stem}.png"))
        image, _ = transform(Image.open(path).convert("RGB"), mask)
        with torch.no_grad():
            probs = model(image[None])["out"].softmax(dim=1)[0].double().numpy()
        confidences.append(probs.max(axis=0).ravel())
        predicted.append(probs.argmax(axis=0).ravel())
    expected = confidence_counts(np.concatenate(confidences))
    # float32 softmax on either side: a pixel may sit on the other side of a bin edge
    assert np.abs(np.array(baseline.confidence_pixels) - expected).sum() <= 2
    assert sum(baseline.confidence_pixels) == 2 * 32 * 32
    assert baseline.predicted_pixels == tuple(np.bincount(np.concatenate(predicted),
                                                          minlength=3))
