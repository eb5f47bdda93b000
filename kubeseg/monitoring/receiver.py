"""The Alertmanager webhook that turns a firing drift alert into one retraining run.

Alertmanager POSTs a JSON notification per alert group (webhook payload version 4: ``groupKey``,
``status``, ``alerts`` with ``labels`` and ``startsAt``, ...). :class:`RetrainReceiver` decides:

- *ignored*: no alert of :data:`~kubeseg.monitoring.alerts.DRIFT_ALERTS` is firing in it;
- *duplicate*: this group's episode (the group key and the earliest ``startsAt`` of its
  firing drift alerts) already started a run: Alertmanager repeats a notification every
  ``repeat_interval`` and again when alerts join the group, and none of those starts another;
- *cooling-down*: a run was started less than ``cooldown_s`` ago (for any group); the
  episode is not recorded, so a repeat after the cool-down starts the run if the drift holds;
- *submitted*: the submitter was called (it submits the pipeline, or records the submission
  in a dry run) and the episode recorded; *failed*: the submitter raised (the HTTP answer is
  503, so Alertmanager sends the notification again).

Every decision is logged with its reason. With ``state_uri`` (a local file or s3:// object,
written atomically) the episodes and the last run's time survive a restart. :func:`serve`
runs the HTTP endpoint (``POST /alerts``, ``GET /healthz``) with the standard library.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from kubeseg.errors import DataError, KubesegError
from kubeseg.monitoring.alerts import DRIFT_ALERTS

logger = logging.getLogger(__name__)

DEFAULT_COOLDOWN_S = 6 * 3600
MAX_BODY_BYTES = 1 << 20
# A body above MAX_BODY_BYTES but at most this is read and dropped before the 413, so that a
# client which sends its whole body before reading sees the answer instead of a broken pipe.
DRAIN_BYTES = 16 << 20
READ_TIMEOUT_S = 30  # a client that stops sending mid-request is cut off
ALERTS_PATH = "/alerts"


class PayloadError(DataError):
    """The notification is not an Alertmanager webhook payload; names the field."""


@dataclass(frozen=True)
class RetrainRequest:
    """What a drift alert group asks for: one retraining run."""

    group_key: str
    episode: str  # the earliest startsAt of the firing drift alerts
    alerts: Tuple[str, ...]  # their names
    labels: Mapping[str, str]  # the labels they share (model, namespace, ...)
    reason: str  # their summaries, for the log and the run's record
    run_name: str


@dataclass(frozen=True)
class Decision:
    action: str  # submitted | duplicate | cooling-down | ignored | failed
    reason: str
    group_key: str = ""
    run: Optional[str] = None  # what the submitter answered (a run id, a file)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


@dataclass
class ReceiverState:
    """Episodes that started a run, and when the last run was started."""

    episodes: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # group key -> record
    last_submission: float = 0.0

    def to_json(self) -> str:
        return json.dumps({"episodes": self.episodes, "last_submission": self.last_submission},
                          indent=2, sort_keys=True)

    @classmethod
    def load(cls, uri: Optional[str]) -> "ReceiverState":
        from kubeseg import storage

        if not uri or not storage.exists(uri):
            return cls()
        try:
            values = json.loads(storage.read_text(uri))
            return cls(episodes=dict(values["episodes"]),
                       last_submission=float(values["last_submission"]))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise DataError(f"--state {uri} is not a state this receiver wrote ({exc}); move "
                            "it away to start afresh") from None


def _firing_drift_alerts(payload: Mapping[str, Any],
                         names: Sequence[str]) -> List[Mapping[str, Any]]:
    alerts = payload.get("alerts")
    if not isinstance(alerts, list):
        raise PayloadError("alerts: expected a list of alerts (Alertmanager webhook payload)")
    out = []
    for i, alert in enumerate(alerts):
        labels = alert.get("labels") if isinstance(alert, dict) else None
        if not isinstance(labels, dict):
            raise PayloadError(f"alerts[{i}].labels: expected an object of label names")
        if alert.get("status") == "firing" and labels.get("alertname") in names:
            if not isinstance(alert.get("startsAt"), str):
                raise PayloadError(f"alerts[{i}].startsAt: expected a timestamp string")
            out.append(alert)
    return out


def parse_request(payload: Any, names: Sequence[str] = DRIFT_ALERTS,
                  now: Optional[float] = None) -> Optional[RetrainRequest]:
    """The retraining a notification asks for; None when no drift alert fires in it. Raises
    :class:`PayloadError` naming the field when it is no webhook payload."""
    if not isinstance(payload, dict):
        raise PayloadError("the body must be a JSON object (an Alertmanager webhook payload)")
    group_key = payload.get("groupKey")
    if not isinstance(group_key, str) or not group_key:
        raise PayloadError("groupKey: expected a non-empty string")
    firing = _firing_drift_alerts(payload, names)
    if not firing:
        return None
    shared = dict(firing[0]["labels"])
    for alert in firing[1:]:
        shared = {k: v for k, v in shared.items() if alert["labels"].get(k) == v}
    shared.pop("alertname", None)
    summaries = [str((a.get("annotations") or {}).get("summary") or a["labels"]["alertname"])
                 for a in firing]
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(time.time() if now is None else now))
    return RetrainRequest(group_key=group_key, episode=min(a["startsAt"] for a in firing),
                          alerts=tuple(sorted({a["labels"]["alertname"] for a in firing})),
                          labels=shared, reason="; ".join(dict.fromkeys(summaries)),
                          run_name=f"kubeseg-drift-{stamp}")


class RetrainReceiver:
    """Decides what each notification does (see the module's doc); thread-safe.

    ``submit(request) -> str`` starts the retraining (and says what it started);
    ``cooldown_s``: the least time between two runs; ``state_uri``: where decisions persist.
    """

    def __init__(self, submit: Callable[[RetrainRequest], str], *,
                 cooldown_s: float = DEFAULT_COOLDOWN_S, state_uri: Optional[str] = None,
                 alerts: Sequence[str] = DRIFT_ALERTS, clock: Callable[[], float] = time.time):
        if cooldown_s < 0:
            raise KubesegError(f"cool-down {cooldown_s} s: must be >= 0")
        self.submit, self.cooldown_s, self.state_uri = submit, float(cooldown_s), state_uri
        self.alerts, self.clock = tuple(alerts), clock
        self.state = ReceiverState.load(state_uri)
        self._lock = threading.Lock()

    def handle(self, payload: Any) -> Decision:
        with self._lock:
            decision = self._decide(payload)
        log = logger.warning if decision.action == "failed" else logger.info
        log("alert group %s: %s (%s)%s", decision.group_key or "?", decision.action,
            decision.reason, f": {decision.run}" if decision.run else "")
        return decision

    def _decide(self, payload: Any) -> Decision:
        now = self.clock()
        request = parse_request(payload, self.alerts, now)
        group = payload["groupKey"]
        if request is None:
            return Decision("ignored", f"no firing alert named {', '.join(self.alerts)}", group)
        seen = self.state.episodes.get(group)
        if seen and seen.get("episode") == request.episode:
            return Decision("duplicate", f"this episode (since {request.episode}) already "
                            f"started {seen.get('run')}", group, seen.get("run"))
        wait = self.state.last_submission + self.cooldown_s - now
        if wait > 0:
            return Decision("cooling-down", f"{', '.join(request.alerts)} firing, but the last "
                            f"run started {now - self.state.last_submission:.0f} s ago; the "
                            f"next may start in {wait:.0f} s", group)
        try:
            run = self.submit(request)
        except Exception as exc:  # noqa: BLE001 - any failure to submit is answered with 503
            return Decision("failed", f"{', '.join(request.alerts)} firing ({request.reason}); "
                            f"submitting failed: {exc}", group)
        self.state.episodes[group] = {"episode": request.episode, "run": run,
                                      "submitted_at": now, "alerts": list(request.alerts)}
        self.state.last_submission = now
        self._save()
        return Decision("submitted", f"{', '.join(request.alerts)} firing ({request.reason})",
                        group, run)

    def _save(self) -> None:
        if self.state_uri:
            from kubeseg import storage

            try:
                storage.write_text(self.state_uri, self.state.to_json())
            except KubesegError as exc:  # the run was started: do not answer 503 for it
                logger.error("could not write the receiver's state to %s: %s", self.state_uri,
                             exc)


STATUS = {"submitted": 200, "duplicate": 200, "cooling-down": 200, "ignored": 200,
          "failed": 503}


def _drain(stream, length: int) -> None:
    """Read and drop ``length`` bytes of ``stream`` (fewer if it ends first)."""
    while length > 0:
        chunk = stream.read(min(length, 1 << 16))
        if not chunk:
            return
        length -= len(chunk)


def _handler(receiver: RetrainReceiver):
    class Handler(BaseHTTPRequestHandler):
        server_version = "kubeseg-retrain-on-alert"
        timeout = READ_TIMEOUT_S

        def _answer(self, status: int, body: Mapping[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, message: str) -> None:
            logger.warning("%s %s: %d %s", self.command, self.path, status, message)
            self._answer(status, {"error": message, "status": status})

        def do_GET(self) -> None:  # noqa: N802 - the http.server interface
            if self.path.split("?")[0] == "/healthz":
                return self._answer(200, {"status": "ok"})
            self._error(404, f"no route {self.path}: POST {ALERTS_PATH} or GET /healthz")

        def do_POST(self) -> None:  # noqa: N802
            if self.path.split("?")[0] != ALERTS_PATH:
                return self._error(404, f"no route {self.path}: POST {ALERTS_PATH}")
            kind = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
            if kind != "application/json":
                return self._error(415, f"Content-Type {kind or '(none)'}: expected "
                                        "application/json (an Alertmanager webhook)")
            try:
                length = int(self.headers.get("Content-Length") or -1)
            except ValueError:
                length = -1
            if not 0 <= length <= MAX_BODY_BYTES:
                if length > MAX_BODY_BYTES:
                    self.close_connection = True
                    _drain(self.rfile, min(length, DRAIN_BYTES))
                return self._error(413 if length > MAX_BODY_BYTES else 411,
                                   f"Content-Length must be given and at most "
                                   f"{MAX_BODY_BYTES} bytes")
            try:
                payload = json.loads(self.rfile.read(length))
                decision = receiver.handle(payload)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                return self._error(400, f"the body is not JSON: {exc}")
            except PayloadError as exc:
                return self._error(400, str(exc))
            self._answer(STATUS[decision.action], decision.to_dict())

        def log_message(self, format: str, *args) -> None:  # decisions are logged instead
            logger.debug("%s " + format, self.address_string(), *args)

    return Handler


def build_server(receiver: RetrainReceiver, host: str = "127.0.0.1",
                 port: int = 8080) -> ThreadingHTTPServer:
    """The HTTP server (not yet serving: call ``serve_forever``); ``port=0`` picks a free one."""
    server = ThreadingHTTPServer((host, port), _handler(receiver))
    server.daemon_threads = True
    return server


def serve(receiver: RetrainReceiver, host: str = "127.0.0.1", port: int = 8080) -> None:
    """Serve until interrupted."""
    server = build_server(receiver, host, port)
    logger.info("retraining webhook on http://%s:%d%s (cool-down %.0f s, state %s)", host,
                server.server_port, ALERTS_PATH, receiver.cooldown_s,
                receiver.state_uri or "in memory")
    try:
        server.serve_forever()
    finally:
        server.server_close()


__all__ = ["RetrainReceiver", "RetrainRequest", "Decision", "ReceiverState", "PayloadError",
           "parse_request", "build_server", "serve", "DEFAULT_COOLDOWN_S", "ALERTS_PATH"]
