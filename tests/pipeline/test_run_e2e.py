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
    for label in ("model (KFP artifact)", "evaluation report", "InferenceService (dry)",
                  "predicted mask (ids)", "overlay", "quality gate"):
        assert label in summary, f"'{label}' missing from the summary:\n{summary}"
    predictions = workdir / "prediction"
    (mask_path,) = predictions.glob("*_mask.png")
    mask = np.asarray(Image.open(mask_path))
    assert mask.shape == (64, 64) and mask.max() < 3
    overlay = Image.open(next(predictions.glob("*_overlay.png")))
    assert overlay.size == (64, 64) and overlay.mode == "RGB"
    run_dirs = list((workdir / "pipeline").glob("kubeseg-segmentation-*"))
    assert len(run_dirs) == 1
    assert (run_dirs[0] / "train" / "model" / "_COMPLETE").is_file()
    assert (run_dirs[0] / "deploy").is_dir()  # the gate (0.0) passed, the dry run rendered
    (work_run,) = (workdir / "work").iterdir()
    assert (work_run / "train" / "checkpoints" / "last.pt").is_file()
    assert (work_run / "evaluation" / "metrics.json").is_file()
