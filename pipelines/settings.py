"""Cluster settings of the compiled pipeline that are not pipeline parameters (Kubernetes takes
them from the compiled YAML): the size of ``/dev/shm`` and the step timeouts.

Read from the environment when ``kubeseg_platform.pipelines.segmentation`` is
imported, so that
``kubeseg compile --shm-size 16Gi --step-timeout 7200 --train-timeout 259200`` (which sets
these variables) changes them without editing code.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Mapping, Optional

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


def use_settings(shm_size: Optional[str], step_timeout_s: Optional[int],
                 train_timeout_s: Optional[int]) -> None:
    """Put the settings given (None: keep) in force for
    ``kubeseg_platform.pipelines.segmentation`` imported after this."""
    for value, name in ((shm_size, SHM_SIZE_ENV), (step_timeout_s, STEP_TIMEOUT_ENV),
                        (train_timeout_s, TRAIN_TIMEOUT_ENV)):
        if value is not None:
            os.environ[name] = str(value)


def use_images(registry: Optional[str], tag: Optional[str]):
    """Put the chosen image registry and tag in force for the pipeline modules imported after
    this; returns the chosen :class:`kubeseg.images.ImageSet`. The components read them when
    imported, so a process that already imported them with others cannot switch."""
    import sys

    from kubeseg import images
    from kubeseg.errors import KubesegError

    chosen = images.configured(registry, tag)
    os.environ[images.REGISTRY_ENV], os.environ[images.TAG_ENV] = chosen.registry, chosen.tag
    loaded = sys.modules.get("kubeseg_platform.components.images")
    if loaded is not None and loaded.IMAGES != chosen:
        raise KubesegError(f"the pipeline was already imported with images of "
                           f"{loaded.IMAGES.registry} (tag {loaded.IMAGES.tag}); run this "
                           "command in a fresh process")
    return chosen


__all__ = ["PipelineSettings", "SHM_SIZE_ENV", "STEP_TIMEOUT_ENV", "TRAIN_TIMEOUT_ENV",
           "use_images", "use_settings"]
