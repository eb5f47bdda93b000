#!/usr/bin/env python3
"""Build (and optionally push) kubeseg's three images with docker or podman.

    python3 images/build.py [--registry R] [--tag T] [--push] [--engine docker|podman]

Names come from ``kubeseg/images.py`` (default ``ghcr.io/kubeseg/<role>:<version>``;
``KUBESEG_IMAGE_REGISTRY`` / ``KUBESEG_IMAGE_TAG`` or the flags override). The trainer and the
GPU predictor share their PyTorch layer; the CPU predictor takes PyTorch's CPU wheels.

``--host-pip`` (podman) builds on a machine whose only way to packages is its own pip
configuration: local mirrors (``file://`` indexes, find-links) and a CA bundle for a
TLS-intercepting proxy are mounted into the build, read-only, and never end up in an image.
Only the standard library is used, so this runs before kubeseg is installed.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kubeseg import images  # noqa: E402  (standard library only)

PYPI = "https://pypi.org/simple"
# role -> (Dockerfile, build arguments)
RECIPES: Dict[str, tuple] = {
    images.TRAINER: ("images/trainer/Dockerfile", {}),
    images.PREDICTOR: ("images/predictor/Dockerfile", {}),
    images.PREDICTOR_GPU: ("images/predictor/Dockerfile", {"TORCH_INDEX_URL": PYPI}),
}
# pip settings that name where packages come from; mounted and passed on with --host-pip.
_PIP_KEYS = ("index-url", "extra-index-url", "find-links", "cert", "trusted-host")


def find_engine(preferred: Optional[str]) -> str:
    for engine in ([preferred] if preferred else ["docker", "podman"]):
        if shutil.which(engine) and subprocess.run(
                [engine, "version"], capture_output=True).returncode == 0:
            return engine
    raise SystemExit("images/build.py: no working docker or podman found (install one, or "
                     "run images/setup-podman.sh as root on Debian)")


def host_pip_settings() -> Dict[str, str]:
    """This machine's effective pip settings for package sources (``pip config list``)."""
    out = subprocess.run([sys.executable, "-m", "pip", "config", "list"],
                         capture_output=True, text=True).stdout
    settings: Dict[str, str] = {}
    for line in out.splitlines():
        key, _, value = line.partition("=")
        name = key.rsplit(".", 1)[-1]
        if name in _PIP_KEYS:
            settings[name] = value.strip().strip("'\"")
    return settings


def host_pip_mounts(workdir: Path) -> List[str]:
    """``-v`` options for a pip.conf of this machine's settings and the paths it names."""
    settings = host_pip_settings()
    mounts, lines = set(), ["[global]"]
    for name, value in settings.items():
        for item in value.split():
            path = item[len("file://"):] if item.startswith("file://") else item
            if path.startswith("/") and os.path.exists(path):
                mounts.add(path.split("/simple")[0] if "/simple" in path else path)
        lines.append(f"{name} = {value}")
    conf = workdir / "pip.conf"
    conf.write_text("\n".join(lines) + "\n")
    options = [f"--volume={conf}:/etc/pip.conf:ro"]
    options += [f"--volume={path}:{path}:ro" for path in sorted(mounts)]
    return options


def build_command(engine: str, role: str, name: str, args: argparse.Namespace,
                  extra: List[str]) -> List[str]:
    dockerfile, build_args = RECIPES[role]
    build_args = dict(build_args)
    if role == images.PREDICTOR and args.cpu_torch_index:
        build_args["TORCH_INDEX_URL"] = args.cpu_torch_index
    if role in (images.TRAINER, images.PREDICTOR_GPU) and args.gpu_torch_index:
        build_args["TORCH_INDEX_URL"] = args.gpu_torch_index
    if args.base_image:
        build_args["BASE_IMAGE"] = args.base_image
    command = [engine, "build", "-f", str(REPO / dockerfile), "-t", name]
    for key, value in sorted(build_args.items()):
        command += ["--build-arg", f"{key}={value}"]
    return command + extra + [str(REPO)]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="images/build.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="The same registry and tag must reach the pipeline and the manifests: run\n"
               "'kubeseg compile --registry R --tag T' after building (see README, 'Run on a\n"
               "cluster').")
    parser.add_argument("--registry", help=f"default: ${images.REGISTRY_ENV} or "
                                           f"{images.DEFAULT_REGISTRY}")
    parser.add_argument("--tag", help=f"default: ${images.TAG_ENV} or the kubeseg version")
    parser.add_argument("--only", default=",".join(images.ROLES),
                        help="comma-separated roles to build (default: %(default)s)")
    parser.add_argument("--engine", choices=("docker", "podman"),
                        help="default: docker if it works, else podman")
    parser.add_argument("--push", action="store_true", help="push each image after building")
    parser.add_argument("--base-image", help="BASE_IMAGE build argument (default: the "
                                             "Dockerfiles' python:3.11-slim-bookworm)")
    parser.add_argument("--cpu-torch-index", help="TORCH_INDEX_URL of the CPU predictor "
                                                  "(default: PyTorch's CPU index)")
    parser.add_argument("--gpu-torch-index", help="TORCH_INDEX_URL of the trainer and the GPU "
                                                  f"predictor (default: {PYPI}, CUDA 13.0)")
    parser.add_argument("--host-pip", action="store_true",
                        help="podman: use this machine's pip mirrors and CA bundle during the "
                             "build (mounted read-only, not kept in the image)")
    args = parser.parse_args(argv)

    image_set = images.configured(args.registry, args.tag)
    roles = [r.strip() for r in args.only.split(",") if r.strip()]
    unknown = [r for r in roles if r not in images.ROLES]
    if unknown:
        parser.error(f"--only: unknown role(s) {', '.join(unknown)}; "
                     f"choose from {', '.join(images.ROLES)}")
    engine = find_engine(args.engine)
    with tempfile.TemporaryDirectory(prefix="kubeseg-build-") as tmp:
        extra: List[str] = []
        if args.host_pip:
            if engine != "podman":
                parser.error("--host-pip needs podman (docker build cannot mount volumes)")
            extra = host_pip_mounts(Path(tmp)) + ["--network=host"]
        for role in roles:
            name = image_set.name(role)
            started = time.monotonic()
            print(f"== building {name} ({engine})", flush=True)
            subprocess.run(build_command(engine, role, name, args, extra), check=True)
            print(f"== built {name} in {time.monotonic() - started:.0f} s", flush=True)
            if args.push:
                subprocess.run([engine, "push", name], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
