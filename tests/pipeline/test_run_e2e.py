"""``kubeseg run``: the whole pipeline with kfp.local, then a served prediction."""
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_kubeseg_run_trains_serves_and_writes_the_prediction(tmp_path):
    workdir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "kubeseg", "run", "--workdir", str(workdir), "--images", "12",
         "--validation-images", "3", "--epochs", "4", "--min-miou", "0.0"],
        capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    summary = result.stdout[result.stdout.index("kubeseg run: pipeline finished"):]
    # quiet: one line per step (and the epochs); kfp.local's own output is in the log
    assert len(result.stdout.splitlines()) <= 40, result.stdout
    for step in ("validate-dataset", "ingest-manifest", "train", "evaluate", "deploy",
                 "promote"):
        assert f"  {step}" in result.stdout, step
    assert "epoch 4/4: train:loss" in result.stdout
    assert "Executing task" in (workdir / "pipeline.log").read_text()
    for label in ("model (KFP artifact)", "evaluation report", "InferenceService (dry)",
                  "champion (promoted)", "predicted mask (ids)", "overlay", "quality gate"):
        assert label in summary, f"'{label}' missing from the summary:\n{summary}"
    predictions = workdir / "prediction"
    (mask_path,) = predictions.glob("*_mask.png")
    mask = np.asarray(Image.open(mask_path))
    assert mask.shape == (64, 64) and mask.max() < 3
    overlay = Image.open(next(predictions.glob("*_overlay.png")))
    assert overlay.size == (64, 64) and overlay.mode == "RGB"
    run_dirs = list((workdir / "pipeline").glob("kubeseg-segmentation-*"))
    assert len(run_dirs) == 1
    assert (run_dirs[0] / "train" / "model" / "_COMPLETE").is_file()  # one-GPU branch
    assert not list(run_dirs[0].glob("train-distributed*"))
    # the gate (0.0) passed: the dry run rendered and the model became the champion
    assert list(run_dirs[0].glob("deploy*/inference_service"))
    assert (workdir / "champion" / "model" / "_COMPLETE").is_file()
    assert (workdir / "champion" / "metrics.json").is_file()
    (work_run,) = (workdir / "work").iterdir()
    assert (work_run / "train" / "checkpoints" / "last.pt").is_file()
    assert (work_run / "evaluation" / "metrics.json").is_file()


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_a_second_run_gates_against_the_champion_the_first_promoted(tmp_path):
    """The GitOps retraining path: run 1 finds no champion (a warning, not an error), passes
    the gate and is promoted; run 2 reads that champion's metrics in its gate."""
    import json

    workdir = tmp_path / "retrain"
    command = [sys.executable, "-m", "kubeseg", "run", "--workdir", str(workdir), "--images",
               "6", "--validation-images", "2", "--epochs", "1", "--min-miou", "0.0",
               "--no-serve"]
    first = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "no champion yet" in (workdir / "pipeline.log").read_text()
    champion = json.loads((workdir / "champion" / "metrics.json").read_text())

    second = subprocess.run(command + ["--set", "seed=7"], capture_output=True, text=True,
                            timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    gate = [line for line in second.stdout.splitlines() if "quality gate" in line][-1]
    assert f"previous model's mIoU {champion['mIOU']:.4f}" in gate, gate
    assert "no champion yet" not in (workdir / "pipeline.log").read_text()


@pytest.mark.parametrize("live", [False, True])
def test_progress_shows_one_line_per_step(tmp_path, live):
    """On a terminal a step's "running" line is overwritten by its outcome (unless training's
    epochs came between); elsewhere only the outcome is written."""
    import io

    from kubeseg_platform.pipelines.local_run import StepProgress

    progress = StepProgress(tmp_path / "pipeline.log")
    progress.terminal, progress.live = io.StringIO(), live
    for line in ("Executing task 'validate-dataset'",
                 "Task 'validate-dataset' finished with status SUCCESS",
                 "Executing task 'train'", "noise from a step",
                 "INFO epoch 1/2: train:loss=1.0 validation:mIOU=0.1",
                 "INFO epoch 2/2: train:loss=0.5 validation:mIOU=0.2",
                 "Task 'train' finished with status FAILURE"):
        progress._show(line)
    text = progress.terminal.getvalue()
    lines = [line.rsplit("\r", 1)[-1] for line in text.split("\n") if line]
    running = ["train"] if live else []
    assert [line.split()[0] for line in lines] == ["validate-dataset", *running, "epoch",
                                                    "epoch", "train"]
    assert lines[0].endswith("success in 0 s") and lines[-1].endswith("failure in 0 s")
    assert ("running" in text) == live and progress.failed == ["train"]
