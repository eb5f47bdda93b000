"""The container engine of ``kubeseg run --runner docker``: a Docker API for the run (docker's,
or podman's Docker-compatible service started for it), podman's answers turned into the ones
kfp.local's DockerRunner expects, and the predictor image served on 127.0.0.1.

Nothing here outlives the ``with`` block that asked for it: the podman service stops and the
docker SDK gets its own behaviour back. Setting ``DOCKER_HOST`` for the run is the caller's
(:func:`kubeseg_platform.pipelines.local_run.run_environment`).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator, Optional


@contextlib.contextmanager
def docker_api() -> Iterator[Optional[str]]:
    """A Docker API for the duration: yields None when docker's answers (``DOCKER_HOST`` or the
    default socket), else the ``unix://`` address of a podman service started on a temporary
    socket and stopped at the end of the block."""
    import docker

    from kubeseg.errors import KubesegError

    try:
        client = docker.from_env()
        client.ping()
        client.close()
        reason = None
    except Exception as exc:  # docker.errors.DockerException and connection errors
        reason = exc
    if reason is None:
        yield None
        return
    podman = shutil.which("podman")
    if not podman:
        raise KubesegError(f"--runner docker needs a Docker API ({reason}): start docker, or "
                           "install podman (images/setup-podman.sh)")
    folder = tempfile.mkdtemp(prefix="kubeseg-podman-")
    socket_path = os.path.join(folder, "podman.sock")
    service = subprocess.Popen([podman, "system", "service", "--time=0",
                                f"unix://{socket_path}"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(socket_path):
            if service.poll() is not None or time.monotonic() > deadline:
                raise KubesegError("podman system service did not start: run it by hand "
                                   "('podman system service --time=0 unix:///tmp/podman.sock') "
                                   "and set DOCKER_HOST=unix:///tmp/podman.sock")
            time.sleep(0.2)
        yield f"unix://{socket_path}"
    finally:
        service.terminate()
        try:
            service.wait(timeout=10)
        except subprocess.TimeoutExpired:
            service.kill()
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def missing_container_as_not_found() -> Iterator[None]:
    """For the duration, podman's answer 500 "no such container" raises
    ``docker.errors.NotFound``, as Docker's 404 does.

    A container that removed itself (``auto_remove``) between two API calls gets that answer
    from podman; kfp.local's DockerRunner expects the NotFound after a step that ends quickly,
    so with podman such a step failed the whole run. The docker SDK's own status check is put
    back when the block ends.
    """
    import docker.errors
    from docker.api.client import APIClient

    original = APIClient.__dict__["_raise_for_status"]

    def raise_for_status(self, response):
        try:
            original(self, response)
        except docker.errors.APIError as exc:
            if exc.status_code == 500 and "no such container" in str(exc.explanation or ""):
                raise docker.errors.NotFound(str(exc), response=response,
                                             explanation=exc.explanation) from exc
            raise

    APIClient._raise_for_status = raise_for_status
    try:
        yield
    finally:
        APIClient._raise_for_status = original


class ContainerServer:
    """``kubeseg serve`` from the predictor image on 127.0.0.1:``port`` (host network), with the
    model folder mounted read-only where KServe's storage initializer puts it."""

    def __init__(self, image: str, model_dir: Path, port: int, *, log_path: Path,
                 ready_timeout_s: float = 180.0):
        from kubeseg.deploy.inference_service import MODEL_MOUNT

        self.image, self.port, self.log_path = image, port, log_path
        self.model_dir, self.mount = Path(model_dir).resolve(), MODEL_MOUNT
        self.ready_timeout_s = ready_timeout_s
        self.url = f"http://127.0.0.1:{port}"
        self.container = None

    def __enter__(self) -> "ContainerServer":
        import docker

        from kubeseg.errors import KubesegError

        self.client = docker.from_env()
        self.container = self.client.containers.run(
            self.image, ["serve", self.mount, "--host", "127.0.0.1", "--port", str(self.port)],
            detach=True, network_mode="host",
            volumes={str(self.model_dir): {"bind": self.mount, "mode": "ro"}})
        deadline = time.monotonic() + self.ready_timeout_s
        while True:
            self.container.reload()
            if self.container.status == "exited":
                self._save_log()
                raise KubesegError(f"the predictor container ({self.image}) exited before it "
                                   f"was ready; see {self.log_path}")
            try:
                with urllib.request.urlopen(self.url + "/v2/health/ready", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                self._save_log()
                self.__exit__()
                raise KubesegError(f"the predictor container ({self.image}) was not ready "
                                   f"within {self.ready_timeout_s:.0f} s; see {self.log_path}")
            time.sleep(0.5)

    def _save_log(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path.write_bytes(self.container.logs())

    def __exit__(self, *exc) -> None:
        if self.container is None:
            return
        try:
            self.container.stop(timeout=10)
            self._save_log()
            self.container.remove(force=True)
        finally:
            self.container = None
            self.client.close()



__all__ = ["docker_api", "missing_container_as_not_found", "ContainerServer"]
