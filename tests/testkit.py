"""Small helpers several test folders share: a random model to serve, stopping a process,
recording the flushes and renames of a durable write, and the repository's own Python files."""
from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Iterator, Sequence, Tuple

# tests, and what builds and runs leave
NOT_SOURCE = {"tests", "build", "dist", "kubeseg-run"}


def source_files(root: Path) -> Iterator[Path]:
    """The Python files of the repository at ``root`` outside tests/, hidden folders (the
    virtual environment) and what builds and runs leave."""
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if not (parts[0] in NOT_SOURCE or any(p.startswith(".") or p.endswith(".egg-info")
                                              for p in parts)):
            yield path


def random_model(hp, seed: int = 0):
    """The model of Hyperparameters ``hp``, in eval mode: seeded random weights, BatchNorm
    statistics moved off their defaults by one training-mode pass."""
    import torch

    from kubeseg.models import build_model

    torch.manual_seed(seed)
    model = build_model(algorithm=hp.algorithm, backbone=hp.backbone, num_classes=hp.num_classes,
                        aux_loss=hp.aux_loss_weight > 0, output_stride=hp.output_stride)
    model.train()
    model(torch.randn(2, 3, 32, 32))
    return model.eval()


def random_fcn(class_names: Sequence[str], crop_size: int) -> Tuple[object, object]:
    """(model in eval mode, Hyperparameters): a random FCN / ResNet-18 (:func:`random_model`)
    for ``class_names``."""
    from kubeseg.config import Hyperparameters

    hp = Hyperparameters.from_dict(dict(algorithm="fcn", backbone="resnet-18",
                                        num_classes=len(class_names), num_training_samples=8,
                                        crop_size=crop_size))
    return random_model(hp), hp


def stop_process(process: subprocess.Popen, timeout_s: float = 20) -> None:
    """SIGTERM, wait up to ``timeout_s``, then SIGKILL."""
    process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def record_flushes_and_renames(monkeypatch) -> list:
    """From now on, ``("fsync", path)`` and ``("rename", src, dst)`` events in call order.

    A power loss cannot be simulated here, so the calls are recorded instead: every fsync is
    the real one, named by the path of the descriptor it flushed, and renames still happen.
    """
    import os

    events = []
    real_fsync, real_replace, real_rename = os.fsync, os.replace, os.rename

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("rename", str(src), str(dst)))
        real_replace(src, dst)

    def rename(src, dst):
        events.append(("rename", str(src), str(dst)))
        real_rename(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "rename", rename)
    return events
