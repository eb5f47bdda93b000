"""A loopback HTTP server answering the Kubernetes API paths ``kubeseg preflight`` reads, with
the objects a test gives it, so the real client code (kubeconfig, kubernetes.ApiClient, error
statuses) runs end to end where no API server can.

- GET PATH: the object stored at PATH (200), 403 for a path listed as forbidden, else 404.
- POST /apis/authorization.k8s.io/v1/selfsubjectaccessreviews: ``status.allowed`` by the RBAC
  rules the test gives for the impersonated user, or for the caller without impersonation
  (Kubernetes' rule match: group, resource or resource/subresource, verb, each also by
  ``*``); 403 when impersonation is refused.
- Every request is recorded (method, path, headers), so a test can check that nothing but
  reads and access reviews were sent.
"""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Set, Tuple

SSAR_PATH = "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews"


def rule_allows(rule: Mapping[str, Any], attributes: Mapping[str, str]) -> bool:
    """Whether one RBAC PolicyRule allows the request ``attributes`` (resourceAttributes)."""
    resource = attributes.get("resource", "")
    if attributes.get("subresource"):
        resource += "/" + attributes["subresource"]

    def matches(values, value):
        return "*" in (values or []) or value in (values or [])

    names = rule.get("resourceNames")
    return (matches(rule.get("apiGroups"), attributes.get("group", ""))
            and matches(rule.get("resources"), resource)
            and matches(rule.get("verbs"), attributes.get("verb", ""))
            and (not names or attributes.get("name") in names))


class StubApiServer:
    def __init__(self, objects: Optional[Dict[str, Any]] = None,
                 forbidden: Sequence[str] = (), rules: Optional[Dict[str, List[dict]]] = None,
                 impersonation: bool = True):
        self.objects = dict(objects or {})
        self.forbidden: Set[str] = set(forbidden)
        # impersonated user (None: the caller itself) -> the RBAC rules granted to them
        self.rules = dict(rules or {})
        self.impersonation = impersonation
        self.requests: List[Tuple[str, str, Dict[str, str]]] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> "StubApiServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def kubeconfig(self, path: Path) -> Path:
        path.write_text(
            "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
            f"clusters: [{{name: k, cluster: {{server: '{self.url}'}}}}]\n"
            "users: [{name: u, user: {token: test-token}}]\n"
            "contexts: [{name: c, context: {cluster: k, user: u}}]\n")
        return path

    def _review(self, body: Mapping[str, Any], headers: Mapping[str, str]) -> Tuple[int, Any]:
        user = headers.get("Impersonate-User")
        if user and not self.impersonation:
            return 403, _status(403, f'users "x" cannot impersonate serviceaccounts {user}')
        attributes = (body.get("spec") or {}).get("resourceAttributes") or {}
        allowed = any(rule_allows(rule, attributes) for rule in self.rules.get(user, []))
        return 201, {**body, "status": {"allowed": allowed}}

    def _handler(self):
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self, code: int, payload: Any) -> None:
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                stub.requests.append((self.command, self.path, dict(self.headers)))
                if self.path in stub.forbidden:
                    return self._answer(403, _status(403, "forbidden"))
                if self.path in stub.objects:
                    return self._answer(200, stub.objects[self.path])
                return self._answer(404, _status(404, "not found"))

            def do_POST(self):
                stub.requests.append((self.command, self.path, dict(self.headers)))
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                if self.path != SSAR_PATH:
                    return self._answer(405, _status(405, "not allowed here"))
                return self._answer(*stub._review(body, self.headers))

            do_PUT = do_PATCH = do_DELETE = do_POST

        return Handler


def _status(code: int, message: str) -> Dict[str, Any]:
    reasons = {403: "Forbidden", 404: "NotFound", 405: "MethodNotAllowed"}
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message,
            "reason": reasons.get(code, ""), "code": code}
