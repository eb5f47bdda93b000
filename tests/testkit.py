"""Small helpers several test folders share: a random model to serve, and stopping a process."""
from __future__ import annotations

import subprocess
from typing import Sequence, Tuple


def random_fcn(class_names: Sequence[str], crop_size: int) -> Tuple[object, object]:
    """(model in eval mode, Hyperparameters): a seeded, randomly initialised FCN / ResNet-18
    whose BatchNorm statistics were moved off their defaults by one training-mode pass."""
    import torch

    from kubeseg.config import Hyperparameters
    from kubeseg.models import build_model

    classes = len(class_names)
    hp = Hyperparameters.from_dict(dict(algorithm="fcn", backbone="resnet-18",
                                        num_classes=classes, num_training_samples=8,
                                        crop_size=crop_size))
    torch.manual_seed(0)
    model = build_model(algorithm="fcn", backbone="resnet-18", num_classes=classes)
    model.train()
    model(torch.randn(2, 3, 32, 32))
    return model.eval(), hp


def stop_process(process: subprocess.Popen, timeout_s: float = 20) -> None:
    """SIGTERM, wait up to ``timeout_s``, then SIGKILL."""
    process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
