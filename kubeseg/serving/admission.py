"""What the HTTP server admits, and how it counts what it answered.

- :class:`ServerLimits`: the sizes a server accepts (request body, image pixels, images per v2
  request, response), its batch size, I/O threads and memory budget.
- :class:`LimitsAndMetrics`: ASGI middleware that refuses a body above ``max_request_bytes``
  (413) before the app reads it, cuts off a body slower than ``min_body_rate`` (408), and
  counts and times every request for Prometheus (``kubeseg_requests_total``,
  ``kubeseg_request_duration_seconds`` by route and status).
- :func:`header_deadline_protocol`: uvicorn's HTTP protocol with a deadline for the request
  line and headers (408 and close). Both cut-offs count in ``kubeseg_read_timeouts_total``
  (by ``part``: headers, body), so a slow or stalled client holds a connection, a task and its
  buffered bytes for a bounded time only.
- :class:`MemoryBudget`: every request is admitted by an estimate of the bytes its images need
  (:func:`image_cost`: decoded pixels, logits at the scored size, mask, probabilities when
  asked for). While the requests in flight hold ``memory_budget_mib``, new ones wait in arrival
  order; 503 with ``Retry-After`` when more than ``max_queued_requests`` already wait, 413 for
  a request that could never fit.
- :func:`check_image_pixels`, :func:`check_response_size`: 413 for an image or an answer above
  the limits.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

from kubeseg.serving import codecs
from kubeseg.serving.defaults import (DEFAULT_HEADER_TIMEOUT_S, DEFAULT_MAX_BATCH_SIZE,
                                      DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_MAX_IMAGES_PER_REQUEST,
                                      DEFAULT_MAX_QUEUED_REQUESTS, DEFAULT_MAX_REQUEST_BYTES,
                                      DEFAULT_MEMORY_BUDGET_MIB, DEFAULT_MIN_BODY_RATE,
                                      image_memory_bytes)

DEFAULT_MAX_RESPONSE_BYTES = 512 * 1024 * 1024
CLIENT_CLOSED_REQUEST = 499  # the status a request is counted under when its client went away
_ROUTES = ("/invocations", "/ping", "/metrics", "/v2/health/live", "/v2/health/ready", "/v2",
           "/")

_METRICS: Dict[str, Any] = {}


def metrics():
    """Our Prometheus collectors (created once per process, in the default registry)."""
    if not _METRICS:
        from prometheus_client import Counter, Histogram

        _METRICS["requests"] = Counter(
            "kubeseg_requests", "HTTP requests answered, by route and status code",
            ["route", "status"])
        _METRICS["latency"] = Histogram(
            "kubeseg_request_duration_seconds", "Time to answer an HTTP request, by route",
            ["route"], buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60))
        _METRICS["disconnects"] = Counter(
            "kubeseg_client_disconnects", "Requests whose client closed the connection before "
            "the answer was sent, by route", ["route"])
        _METRICS["batch"] = Histogram(
            "kubeseg_inference_batch_size", "Images per forward pass",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32))
        _METRICS["read_timeouts"] = Counter(
            "kubeseg_read_timeouts", "Clients cut off (408) for sending a request too slowly, "
            "by the part that was late: headers or body", ["part"])
    return _METRICS


def _read_timeout_response(message: str) -> bytes:
    """A whole 408 response that closes the connection, written before any request exists."""
    body = codecs.error_body(message, 408)
    return (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body)) + body


def header_deadline_protocol(header_timeout_s: float):
    """The HTTP protocol class uvicorn would pick (httptools, else h11) with a deadline: the
    request line and headers must arrive within ``header_timeout_s`` of the connection's start,
    or of the first byte of a following request on a kept-alive connection; otherwise the
    client gets 408 and the connection is closed. (Idle kept-alive connections are closed by
    uvicorn's keep-alive timeout.) A request's headers are complete when the protocol starts
    its request cycle."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    message = (f"the request line and headers did not arrive within {header_timeout_s:g} s "
               "(server option --header-timeout)")

    class HeaderDeadlineProtocol(AutoHTTPProtocol):
        _header_timer = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm_header_deadline()

        def data_received(self, data):
            if self._header_timer is None and (self.cycle is None
                                               or self.cycle.response_complete):
                self._arm_header_deadline()  # the first bytes of a following request
            before = self.cycle
            super().data_received(data)
            if self.cycle is not before:  # its headers are complete
                self._disarm_header_deadline()

        def connection_lost(self, exc):
            self._disarm_header_deadline()
            super().connection_lost(exc)

        def _arm_header_deadline(self):
            self._disarm_header_deadline()
            self._header_timer = self.loop.call_later(header_timeout_s, self._headers_late)

        def _disarm_header_deadline(self):
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_late(self):
            self._header_timer = None
            if not self.transport.is_closing():
                metrics()["read_timeouts"].labels("headers").inc()
                self.transport.write(_read_timeout_response(message))
                self.transport.close()

    return HeaderDeadlineProtocol


def _route_label(path: str) -> str:
    if path.startswith("/v2/models/"):
        return "/v2/models/{name}/infer" if path.endswith("/infer") else "/v2/models/{name}"
    if path.startswith("/v1/models/"):
        return "/v1/models/{name}"
    return path if path in _ROUTES else "other"


@dataclass
class _ResponseStatus:
    """The status a request is counted under: 500 until the app starts its answer."""

    code: int = 500
    sent: bool = False


def _count_request(route: str, code: int, started: float) -> None:
    collectors = metrics()
    if code == CLIENT_CLOSED_REQUEST:
        collectors["disconnects"].labels(route).inc()
    collectors["requests"].labels(route, str(code)).inc()
    collectors["latency"].labels(route).observe(time.perf_counter() - started)


class LimitsAndMetrics:
    """ASGI middleware: refuse bodies above the limit (413) before the app reads them, cut off
    bodies that arrive too slowly (408), and count and time every request. A client that goes
    away before its body has arrived is counted under status 499 and in
    ``kubeseg_client_disconnects_total``, not as a server error.

    The body's floor: after a grace of ``body_grace_s``, the bytes received must keep up with
    ``min_body_rate`` bytes per second since the headers arrived; a client falling behind gets
    408 and the connection is closed. A body that keeps up may take as long as its size needs.
    """

    def __init__(self, app, max_request_bytes: int, *,
                 body_grace_s: float = DEFAULT_HEADER_TIMEOUT_S,
                 min_body_rate: int = DEFAULT_MIN_BODY_RATE):
        self.app = app
        self.max_request_bytes = int(max_request_bytes)
        self.body_grace_s = float(body_grace_s)
        self.min_body_rate = int(min_body_rate)

    async def _refuse(self, send, status: int, message: str) -> None:
        body = codecs.error_body(message, status)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    def _too_slow(self) -> str:
        return (f"the request body arrived slower than {self.min_body_rate} bytes/s after the "
                f"first {self.body_grace_s:g} s (server options --min-body-rate, "
                "--header-timeout)")

    def _too_large(self) -> str:
        return (f"request body larger than {self.max_request_bytes} bytes (server option "
                "--max-request-bytes): send a smaller image")

    async def _read_body(self, receive, status: _ResponseStatus) -> Optional[bytes]:
        """The whole body, or None: above the limit (``status.code`` still 500), the client
        went away (``status.code`` 499) or fell behind the floor rate (``status.code`` 408)."""
        chunks, size = [], 0
        started = time.monotonic()
        while True:
            allowed = self.body_grace_s + size / self.min_body_rate
            try:
                message = await asyncio.wait_for(
                    receive(), timeout=max(0.0, started + allowed - time.monotonic()))
            except asyncio.TimeoutError:
                status.code = 408
                return None
            if message["type"] == "http.disconnect":
                status.code = CLIENT_CLOSED_REQUEST
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_request_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _bounded(self, scope, receive, send, status: _ResponseStatus):
        """Read the body here (bounded), then hand it to the app."""
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit()
                                   or int(length) > self.max_request_bytes):
            return await self._refuse(send, 413, self._too_large())
        body = await self._read_body(receive, status)
        if body is None:
            if status.code == CLIENT_CLOSED_REQUEST:
                return None
            if status.code == 408:
                metrics()["read_timeouts"].labels("body").inc()
                return await self._refuse(send, 408, self._too_slow())
            return await self._refuse(send, 413, self._too_large())
        delivered = False

        async def replay():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            message = await receive()
            if message["type"] == "http.disconnect" and not status.sent:
                status.code = CLIENT_CLOSED_REQUEST
            return message

        return await self.app(scope, replay, send)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = _route_label(scope.get("path", ""))
        started = time.perf_counter()
        status = _ResponseStatus()

        async def send_counting(message):
            if message["type"] == "http.response.start":
                status.code = message["status"]
                status.sent = True
            await send(message)

        try:
            if scope.get("method") in ("POST", "PUT"):
                return await self._bounded(scope, receive, send_counting, status)
            return await self.app(scope, receive, send_counting)
        except OSError:
            # the connection broke while the answer was written: the client went away
            status.code = CLIENT_CLOSED_REQUEST
            raise
        finally:
            _count_request(route, status.code, started)


class MemoryBudget:
    """Admission by the memory a request's images will need (an estimate from their pixels).

    A request is admitted while the bytes in flight plus its own stay within ``budget_bytes``;
    otherwise it waits, in arrival order, for earlier requests to finish. When
    ``max_waiting`` requests already wait, it is refused at once with 503 and ``Retry-After``.
    A request that could never fit is refused with 413.
    """

    def __init__(self, budget_bytes: int, max_waiting: int):
        self.budget_bytes = int(budget_bytes)
        self.max_waiting = int(max_waiting)
        self.in_use = 0
        self.peak = 0
        self._waiting: "collections.deque" = collections.deque()
        self._cond: Optional[asyncio.Condition] = None

    def _condition(self) -> asyncio.Condition:
        if self._cond is None:  # created on the server's event loop, at the first request
            self._cond = asyncio.Condition()
        return self._cond

    @contextlib.asynccontextmanager
    async def admit(self, cost: int):
        cost = int(cost)
        if cost > self.budget_bytes:
            raise codecs.PayloadTooLarge(
                f"this request needs about {cost // 2**20} MiB to answer, above the server's "
                f"memory budget of {self.budget_bytes // 2**20} MiB (server option "
                "--memory-budget-mib): send fewer or smaller images, or ask for the mask only")
        cond = self._condition()
        async with cond:
            if self._waiting or self.in_use + cost > self.budget_bytes:
                if len(self._waiting) >= self.max_waiting:
                    raise codecs.ServiceUnavailable(
                        f"the server is busy: {len(self._waiting)} requests already wait for "
                        f"memory (server options --memory-budget-mib, --max-queued-requests); "
                        "retry shortly", retry_after=1)
                ticket = object()
                self._waiting.append(ticket)
                try:
                    await cond.wait_for(lambda: self._waiting[0] is ticket
                                        and self.in_use + cost <= self.budget_bytes)
                finally:
                    self._waiting.remove(ticket)
                    cond.notify_all()
            self.in_use += cost
            self.peak = max(self.peak, self.in_use)
        try:
            yield
        finally:
            async with cond:
                self.in_use -= cost
                cond.notify_all()


@dataclass(frozen=True)
class ServerLimits:
    """What the HTTP app accepts and how it shares the work (see the module docstring):
    ``workers`` threads decode and encode (None: CPUs + 4, at most 32), forward passes of up to
    ``max_batch_size`` images run on one thread of their own."""

    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    workers: Optional[int] = None
    memory_budget_mib: int = DEFAULT_MEMORY_BUDGET_MIB
    max_queued_requests: int = DEFAULT_MAX_QUEUED_REQUESTS
    max_images_per_request: int = DEFAULT_MAX_IMAGES_PER_REQUEST
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S
    min_body_rate: int = DEFAULT_MIN_BODY_RATE


class Admission:
    """One app's limits applied to one model's images: what a request costs in memory (an
    estimate from its pixels), the memory budget that admits it, and whether its images and
    answer fit."""

    def __init__(self, limits: ServerLimits, *, classes: int, max_pixels: int):
        self.limits = limits
        self.classes = max(1, int(classes))
        self.max_pixels = int(max_pixels)
        self.budget = MemoryBudget(int(limits.memory_budget_mib) * 2**20,
                                   int(limits.max_queued_requests))

    def admit(self, cost: int):
        """Async context: the request holds ``cost`` bytes of the budget while inside."""
        return self.budget.admit(cost)

    def image_cost(self, pixels: int, probabilities: bool) -> int:
        """Bytes one image of ``pixels`` pixels holds while it is answered (an upper estimate,
        :func:`kubeseg.serving.defaults.image_memory_bytes`)."""
        return image_memory_bytes(pixels, classes=self.classes, max_pixels=self.max_pixels,
                                  probabilities=probabilities)

    def encoded_cost(self, data: bytes, probabilities: bool) -> int:
        """The cost of an encoded image, its size read from its header (413 above
        ``max_image_pixels``, 400 when it is no JPEG/PNG)."""
        width, height = codecs.image_size(data, max_image_pixels=self.limits.max_image_pixels)
        return self.image_cost(width * height, probabilities)

    def request_cost(self, name: str, images: list, kind: str, probabilities: bool) -> int:
        """The cost of a v2 input's images: ``kind`` "encoded" or "pixels" (arrays
        ``[H, W, 3]``); a refusal names the input and the image."""
        cost = 0
        for index, item in enumerate(images):
            try:
                if kind == "encoded":
                    cost += self.encoded_cost(item, probabilities)
                else:
                    pixels = int(item.shape[0]) * int(item.shape[1])
                    cost += self.image_cost(pixels, probabilities)
            except codecs.RequestError as exc:
                raise type(exc)(f"input '{name}', image {index}: {exc}") from None
        return cost

    def check_pixels(self, height: int, width: int) -> None:
        """413 for an image of pixels (not an encoded one) above ``max_image_pixels``."""
        if height * width > self.limits.max_image_pixels:
            raise codecs.PayloadTooLarge(
                f"the image is {width}x{height} pixels; this endpoint accepts at most "
                f"{self.limits.max_image_pixels} (server option --max-image-pixels)")

    def check_response_size(self, size: Tuple[int, int], bytes_per_value: int = 4) -> None:
        """413 when the probabilities of an image of ``size`` (height, width) would be larger
        than ``max_response_bytes``."""
        values = self.classes * size[0] * size[1]
        limit = self.limits.max_response_bytes
        if values * bytes_per_value > limit:
            raise codecs.PayloadTooLarge(
                f"probabilities for a {size[1]}x{size[0]} image with {self.classes} classes "
                f"would be about {values * bytes_per_value // 2**20} MiB, above the server's "
                f"{limit // 2**20} MiB limit: ask for Accept image/png, or send a smaller image")


__all__ = ["DEFAULT_MAX_RESPONSE_BYTES", "CLIENT_CLOSED_REQUEST", "ServerLimits",
           "LimitsAndMetrics", "MemoryBudget", "Admission", "metrics",
           "header_deadline_protocol"]
