"""What the HTTP server admits, and how it counts what it answered.

- :class:`ServerLimits`: the sizes a server accepts (request body, image pixels, images per v2
  request, response), its batch size, I/O threads and memory budget.
- :class:`LimitsAndMetrics`: ASGI middleware that refuses a body above ``max_request_bytes``
  (413) before the app reads it, and counts and times every request for Prometheus
  (``kubeseg_requests_total``, ``kubeseg_request_duration_seconds`` by route and status).
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
from kubeseg.serving.defaults import (DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_IMAGE_PIXELS,
                                      DEFAULT_MAX_IMAGES_PER_REQUEST, DEFAULT_MAX_QUEUED_REQUESTS,
                                      DEFAULT_MAX_REQUEST_BYTES, DEFAULT_MEMORY_BUDGET_MIB)
from kubeseg.serving.predictor import STRIP_ELEMENTS

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
    return _METRICS


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
    """ASGI middleware: refuse bodies above the limit (413) before the app reads them, and count
    and time every request. A client that goes away before its body has arrived is counted under
    status 499 and in ``kubeseg_client_disconnects_total``, not as a server error."""

    def __init__(self, app, max_request_bytes: int):
        self.app = app
        self.max_request_bytes = int(max_request_bytes)

    async def _refuse(self, send, status: int, message: str) -> None:
        body = codecs.error_body(message, status)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    def _too_large(self) -> str:
        return (f"request body larger than {self.max_request_bytes} bytes (server option "
                "--max-request-bytes): send a smaller image")

    async def _read_body(self, receive, status: _ResponseStatus) -> Optional[bytes]:
        """The whole body, or None: above the limit (``status.code`` still 500) or the client
        went away (``status.code`` 499)."""
        chunks, size = [], 0
        while True:
            message = await receive()
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
        """Bytes one image of ``pixels`` pixels holds while it is answered (an upper estimate).

        At full size: the decoded RGB picture and one conversion copy, the mask and its
        encoding, and with probabilities twice ``C`` floats (the array and its encoding). At the
        scored size (at most ``max_pixels``): the normalised input and twice the logits
        (sliding-window sum). Plus the strips that resize logits back.
        """
        classes = self.classes
        scored = min(pixels, self.max_pixels)
        per_pixel = 3 + 3 + 1 + 1 + (2 * 4 * classes if probabilities else 0)
        per_scored = 3 * 4 + 2 * 4 * classes
        strips = 3 * 4 * min(STRIP_ELEMENTS, classes * pixels)
        return pixels * per_pixel + scored * per_scored + strips

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
           "LimitsAndMetrics", "MemoryBudget", "Admission", "metrics"]
