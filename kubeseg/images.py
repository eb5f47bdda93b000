"""kubeseg's container images, named in one place.

Three images are built from ``images/`` (``make images``):

- ``trainer``: CUDA PyTorch, kubeseg and the KFP SDK; every pipeline step, the distributed
  training pods, the GitOps submit Job.
- ``predictor``: CPU PyTorch and KServe; CPU serving.
- ``predictor-gpu``: CUDA PyTorch and KServe; chosen whenever serving asks for GPUs.

Every name is ``<registry>/<role>:<tag>``. The registry defaults to ``ghcr.io/kubeseg`` and the
tag to the kubeseg version; ``KUBESEG_IMAGE_REGISTRY`` and ``KUBESEG_IMAGE_TAG`` override them
(``kubeseg compile --registry R --tag T`` sets both), and the compiled pipeline, the
InferenceService and training-job builders and the kustomize overlays all take their names
from here. This module imports nothing beyond the standard library, so build scripts can use it
before anything is installed.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Dict, Mapping, Optional

from kubeseg import __version__

DEFAULT_REGISTRY = "ghcr.io/kubeseg"
REGISTRY_ENV = "KUBESEG_IMAGE_REGISTRY"
TAG_ENV = "KUBESEG_IMAGE_TAG"

TRAINER = "trainer"
PREDICTOR = "predictor"
PREDICTOR_GPU = "predictor-gpu"
ROLES = (TRAINER, PREDICTOR, PREDICTOR_GPU)

_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


@dataclass(frozen=True)
class ImageSet:
    """The three image names for one registry and tag."""

    registry: str = DEFAULT_REGISTRY
    tag: str = __version__

    def __post_init__(self) -> None:
        problems = []
        if not self.registry or self.registry != self.registry.strip().rstrip("/") \
                or any(c.isspace() or c.isupper() for c in self.registry):
            problems.append(f"registry {self.registry!r}: expected e.g. 'ghcr.io/ORG' or "
                            "'registry.example.com:5000/team' (lower case, no trailing /)")
        if not _TAG.fullmatch(self.tag or ""):
            problems.append(f"tag {self.tag!r}: up to 128 letters, digits, '_', '.' and '-', "
                            "not starting with '.' or '-'")
        if problems:
            from kubeseg.errors import ConfigError

            raise ConfigError(problems, what="image setting")

    def name(self, role: str) -> str:
        if role not in ROLES:
            raise ValueError(f"unknown image role {role!r}; one of {', '.join(ROLES)}")
        return f"{self.registry}/{role}:{self.tag}"

    @property
    def trainer(self) -> str:
        return self.name(TRAINER)

    @property
    def predictor(self) -> str:
        return self.name(PREDICTOR)

    @property
    def predictor_gpu(self) -> str:
        return self.name(PREDICTOR_GPU)

    def predictor_for(self, gpus: int) -> str:
        """The serving image: the CUDA build when GPUs are requested, else the CPU build."""
        return self.predictor_gpu if gpus > 0 else self.predictor

    def names(self) -> Dict[str, str]:
        return {role: self.name(role) for role in ROLES}


def configured(registry: Optional[str] = None, tag: Optional[str] = None,
               environ: Mapping[str, str] = os.environ) -> ImageSet:
    """The image set in force: explicit arguments, else the environment, else the defaults."""
    return ImageSet(registry=registry or environ.get(REGISTRY_ENV) or DEFAULT_REGISTRY,
                    tag=tag or environ.get(TAG_ENV) or __version__)


def pull_policy(image: str) -> str:
    """``IfNotPresent`` only for an image pinned by digest; ``Always`` for a tag.

    A tag can be rebuilt and pushed again under the same name (a development tag, or the
    version tag while it is being fixed); with ``IfNotPresent`` nodes that pulled it once keep
    running the old code. ``Always`` costs a registry round trip, not a download, when the
    image has not changed.
    """
    return "IfNotPresent" if "@sha256:" in image else "Always"


def placeholder(role: str) -> str:
    """The image name the kustomize manifests use for ``role``; the images component
    (``manifests/components/images``) replaces it with the configured name."""
    if role not in ROLES:
        raise ValueError(f"unknown image role {role!r}; one of {', '.join(ROLES)}")
    return f"kubeseg/{role}"


def kustomize_component(image_set: ImageSet) -> str:
    """The kustomize Component (YAML text) that maps every placeholder to ``image_set``."""
    lines = ["# Written by `kubeseg compile` from kubeseg/images.py: the image names every overlay",
             "# uses. Change them with `kubeseg compile --registry R --tag T`, not by hand.",
             "apiVersion: kustomize.config.k8s.io/v1alpha1",
             "kind: Component",
             "images:"]
    for role in ROLES:
        name, _, tag = image_set.name(role).rpartition(":")
        lines += [f"- name: {placeholder(role)}", f"  newName: {name}", f"  newTag: '{tag}'"]
    return "\n".join(lines) + "\n"


__all__ = ["ImageSet", "configured", "pull_policy", "placeholder", "kustomize_component",
           "ROLES", "TRAINER", "PREDICTOR", "PREDICTOR_GPU", "DEFAULT_REGISTRY", "REGISTRY_ENV",
           "TAG_ENV"]
