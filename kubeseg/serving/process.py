"""Run an HTTP server in a child process: start it, wait until it answers, stop it by its PID.

Used to serve a model next to other work on one machine (the local pipeline run, benchmarks,
tests). On a cluster KServe runs the server instead.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Mapping, Optional, Sequence

from kubeseg.errors import KubesegError


class ServerProcess:
    """``with ServerProcess(command, url) as server:`` runs ``command`` until the block ends.

    The server counts as ready when ``GET url + ready_path`` answers 200. Output goes to
    ``log_path`` (or is discarded). The child gets a session of its own, so stopping it
    (SIGTERM, then SIGKILL after ``stop_timeout_s``) never touches this process.
    """

    def __init__(self, command: Sequence[str], url: str, *, ready_path: str = "/ping",
                 log_path: Optional[Path] = None, env: Optional[Mapping[str, str]] = None,
                 ready_timeout_s: float = 180.0, stop_timeout_s: float = 20.0):
        self.command = list(command)
        self.url = url.rstrip("/")
        self.ready_path = ready_path
        self.log_path = Path(log_path) if log_path else None
        self.env = dict(env) if env is not None else None
        self.ready_timeout_s = ready_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.process: Optional[subprocess.Popen] = None

    def start(self) -> "ServerProcess":
        if self.log_path:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "wb") as log:
                self.process = subprocess.Popen(self.command, stdout=log,
                                                stderr=subprocess.STDOUT, env=self.env,
                                                start_new_session=True)
        else:
            self.process = subprocess.Popen(self.command, stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL, env=self.env,
                                            start_new_session=True)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _where(self) -> str:
        return f"; see {self.log_path}" if self.log_path else ""

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        while True:
            code = self.process.poll()
            if code is not None:
                raise KubesegError(f"the server ({' '.join(self.command[:4])} ...) exited with "
                                   f"code {code} before it was ready{self._where()}")
            try:
                with urllib.request.urlopen(self.url + self.ready_path, timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise KubesegError(f"the server at {self.url} was not ready within "
                                   f"{self.ready_timeout_s:.0f} s{self._where()}")
            time.sleep(0.5)

    def stop(self) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=self.stop_timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def model_server(model_uri: str, port: int, *, args: Sequence[str] = (),
                 log_path: Optional[Path] = None, env: Optional[Mapping[str, str]] = None,
                 ready_timeout_s: float = 180.0) -> ServerProcess:
    """A :class:`ServerProcess` running ``kubeseg serve MODEL_URI`` on 127.0.0.1:``port``."""
    command = [sys.executable, "-m", "kubeseg", "serve", str(model_uri), "--host", "127.0.0.1",
               "--port", str(port), *args]
    return ServerProcess(command, f"http://127.0.0.1:{port}", log_path=log_path, env=env,
                         ready_timeout_s=ready_timeout_s)
