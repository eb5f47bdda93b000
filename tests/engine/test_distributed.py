"""Distributed training under torchrun on CPU (gloo): two ranks, one model, one set of metrics."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from kubeseg.data.synthetic import make_shapes_dataset
from kubeseg.engine.distributed import DistContext, init_distributed

REPO = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent("""
    import json, logging, os, sys
    import torch
    from kubeseg.config import Hyperparameters
    from kubeseg.data.channels import Channels
    from kubeseg.engine.train import TrainOptions, train

    logging.basicConfig(level=logging.INFO)
    data, output, dump, backbone, algorithm = sys.argv[1:6]
    hp = Hyperparameters.from_dict(dict(
        backbone=backbone, algorithm=algorithm, num_classes=3, num_training_samples=8,
        crop_size=32, base_size=40, epochs=2, mini_batch_size=2, validation_mini_batch_size=1,
        use_pretrained_model=False, optimizer="sgd", learning_rate=0.01, syncbn=True))
    result = train(hp, Channels.from_root(data), output,
                   options=TrainOptions(workers=0, log_every=1))
    rank = os.environ["RANK"]
    torch.save(result.model.state_dict(), os.path.join(dump, f"rank{rank}.pt"))
    with open(os.path.join(dump, f"rank{rank}.json"), "w") as f:
        json.dump({"history": result.history, "best_miou": result.best_miou}, f)
""")


def test_single_process_needs_no_process_group(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    ctx = init_distributed("cpu")
    assert ctx == DistContext(device=torch.device("cpu")) and ctx.is_main
    assert not torch.distributed.is_initialized()


@pytest.mark.slow
@pytest.mark.parametrize("backbone,algorithm", [("resnet-18", "deeplab"),
                                                ("efficientnet-lite0", "deeplabv3plus"),
                                                ("mobilenet-v3-large", "lraspp")])
def test_torchrun_two_cpu_ranks_end_identical(tmp_path, backbone, algorithm):
    data = tmp_path / "data"
    # 9 validation images: an odd count, so the ranks score different numbers of images.
    make_shapes_dataset(data, n_train=8, n_val=9, size=32, num_classes=3, seed=2)
    script = tmp_path / "train_ranks.py"
    script.write_text(SCRIPT)
    dump = tmp_path / "dump"
    dump.mkdir()
    output = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(script), str(data), str(output), str(dump), backbone, algorithm],
        env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "rank 1 of 2" in proc.stderr and "backend gloo" in proc.stderr
    assert "syncbn=True needs CUDA" in proc.stderr

    w0 = torch.load(dump / "rank0.pt", weights_only=True)
    w1 = torch.load(dump / "rank1.pt", weights_only=True)
    assert set(w0) == set(w1)
    for key in w0:
        assert torch.equal(w0[key], w1[key]), key
    r0 = json.loads((dump / "rank0.json").read_text())
    r1 = json.loads((dump / "rank1.json").read_text())
    for a, b in zip(r0["history"], r1["history"]):
        for key in ("train:loss", "validation:mIOU", "validation:pixel_accuracy", "lr"):
            assert a[key] == b[key], key
    assert r0["best_miou"] == r1["best_miou"]
    # Each rank ran 8 / (2 ranks x batch 2) = 2 iterations per epoch: the data was split.
    assert [h["iterations"] for h in r0["history"]] == [2, 2]
    # Only rank 0 wrote: one metrics file with one line per epoch, one checkpoint, one artifact.
    lines = (output / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    assert (output / "checkpoints" / "last.pt").is_file()
    assert (output / "model" / "_COMPLETE").is_file()
    assert not [p for p in output.rglob(".*")]  # no temporary files left behind
