"""Cluster settings of the compiled pipeline that are not pipeline parameters (Kubernetes takes
them from the compiled YAML): the size of ``/dev/shm`` and the step timeouts.

Read from the environment when ``pipelines.segmentation`` is imported, so that
``kubeseg compile --shm-size 16Gi --step-timeout 7200 --train-timeout 259200`` (which sets
these variables) changes them without editing code.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Mapping

from kubeseg.deploy.placement import DEFAULT_SHM_SIZE

SHM_SIZE_ENV = "KUBESEG_SHM_SIZE"
STEP_TIMEOUT_ENV = "KUBESEG_STEP_TIMEOUT"
TRAIN_TIMEOUT_ENV = "KUBESEG_TRAIN_TIMEOUT"
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?([KMGTPE]i|[kMGTPE])?$")


@dataclass(frozen=True)
class PipelineSettings:
    """``shm_size``: memory-backed /dev/shm of the data-loading steps and training pods.
    ``step_timeout_s``: how long any step but training may run. ``train_timeout_s``: how long
    training may run (the pod's activeDeadlineSeconds, counted from its start on a node)."""

    shm_size: str = DEFAULT_SHM_SIZE
    step_timeout_s: int = 6 * 3600
    train_timeout_s: int = 7 * 24 * 3600

    def __post_init__(self) -> None:
        problems = []
        if not _QUANTITY.match(str(self.shm_size)):
            problems.append(f"shm size {self.shm_size!r}: a Kubernetes quantity such as 8Gi")
        for name in ("step_timeout_s", "train_timeout_s"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 60:
                problems.append(f"{name}={value!r}: whole seconds, at least 60")
        if problems:
            from kubeseg.errors import ConfigError

            raise ConfigError(problems, what="pipeline setting")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> "PipelineSettings":
        def seconds(name: str, default: int) -> int:
            raw = environ.get(name)
            if not raw:
                return default
            try:
                return int(raw)
            except ValueError:
                from kubeseg.errors import ConfigError

                raise ConfigError([f"{name}={raw!r}: whole seconds"],
                                  what="pipeline setting") from None

        defaults = cls()
        return cls(shm_size=environ.get(SHM_SIZE_ENV) or defaults.shm_size,
                   step_timeout_s=seconds(STEP_TIMEOUT_ENV, defaults.step_timeout_s),
                   train_timeout_s=seconds(TRAIN_TIMEOUT_ENV, defaults.train_timeout_s))


__all__ = ["PipelineSettings", "SHM_SIZE_ENV", "STEP_TIMEOUT_ENV", "TRAIN_TIMEOUT_ENV"]
