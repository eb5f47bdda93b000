"""A stand-in for the Kubeflow Pipelines API at the boundary where no KFP server can run here.

It is not a KFP server: it answers the four calls ``kfp.Client`` makes to create a run
(``GET /apis/v2beta1/healthz``, reporting a backend release, look up an experiment by name, create it, ``POST
/apis/v2beta1/runs``) on 127.0.0.1 and records every request, so a test can check what the
real client sent: the run's name, its experiment, its pipeline spec and its parameters.
"""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, List, Optional


@dataclass(frozen=True)
class Recorded:
    method: str
    path: str
    body: Optional[Any]


class KfpApiStandIn:
    def __init__(self, tag_name: str = "2.14.0"):
        self.tag_name = tag_name  # the backend release healthz reports
        self.requests: List[Recorded] = []
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}"

    def runs(self) -> List[Recorded]:
        """The run creations received (``POST /apis/v2beta1/runs``)."""
        with self._lock:
            return [r for r in self.requests
                    if r.method == "POST" and r.path == "/apis/v2beta1/runs"]

    def __enter__(self) -> "KfpApiStandIn":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _answer(self, method: str, path: str, body: Optional[Any]) -> dict:
        with self._lock:
            self.requests.append(Recorded(method, path, body))
            if path == "/apis/v2beta1/runs" and method == "POST":
                count = sum(r.method == "POST" and r.path == path for r in self.requests)
                return {"run_id": f"run-{count}",
                        "display_name": (body or {}).get("display_name")}
        if path == "/apis/v2beta1/healthz":
            return {"tag_name": self.tag_name}
        if path.startswith("/apis/v2beta1/experiments"):
            if method == "POST":
                return {"experiment_id": "experiment-1", **(body or {})}
            return {}  # no experiment of that name yet
        return {}

    def _handler(self):
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw else None
                answer = json.dumps(stand_in._answer(self.command, self.path.split("?")[0],
                                                     body)).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            do_GET = do_POST = _serve

            def log_message(self, *args):
                pass

        return Handler
