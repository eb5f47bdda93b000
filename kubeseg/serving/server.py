"""The HTTP server: SageMaker-style ``/invocations`` beside KServe's Open Inference Protocol v2.

Routes:

- ``POST /invocations``: an image in (``image/jpeg``, ``image/png``, ``application/x-image``);
  out by ``Accept``: ``image/png`` class-id mask (default), ``application/x-recordio-protobuf``
  / ``application/x-protobuf`` probabilities, ``application/json`` mask or probabilities (see
  :mod:`kubeseg.serving.codecs`).
- ``GET /ping``: 200 once the model is loaded (SageMaker's health check).
- KServe's routes: ``/v2/health/live``, ``/v2/health/ready``, ``/v2/models/{name}``,
  ``/v2/models/{name}/ready``, ``POST /v2/models/{name}[/versions/{v}]/infer`` (input
  ``image``: BYTES, one encoded JPEG/PNG per element, or UINT8 ``[H, W, 3]`` /
  ``[N, H, W, 3]`` pixels; outputs ``mask`` UINT8 ``[N, H, W]`` and, when requested,
  ``probabilities`` FP32 ``[N, C, H, W]``),
  ``/v1/models/{name}``, ``/metrics`` (Prometheus: KServe's per-step histograms and ours,
  ``kubeseg_requests_total`` and ``kubeseg_request_duration_seconds`` by route and status).

Refusals are JSON ``{"error": ..., "status": ...}``: 413 request body above
``max_request_bytes``, image above ``max_image_pixels``, more than ``max_images_per_request``
images in one v2 request, or a request needing more than the memory budget; 415 Content-Type;
400 undecodable image or a malformed v2 request (the message names the field, e.g.
``inputs[0].parameters.binary_data_size``); 406 Accept; 503 with ``Retry-After`` when more than
``max_queued_requests`` requests already wait for memory. The server keeps serving after any of
them.

Memory: every request is admitted by an estimate of the bytes its images need (decoded pixels,
logits at the scored size, mask, probabilities when asked for). While the requests in flight
hold ``memory_budget_mib``, new ones wait in arrival order (see :class:`MemoryBudget`).

KServe's ``ModelServer`` provides the model registry, the data plane and the v1/v2 endpoints;
its ``start()`` is not used because it binds 0.0.0.0, starts gRPC, installs process signal
handlers and mounts everything on one process-wide FastAPI app. Here each :func:`build_app`
gets its own FastAPI app with KServe's endpoints and ours, served by uvicorn on the address
given (127.0.0.1 by default).
"""

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import os
import struct
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

from kubeseg.serving import codecs
from kubeseg.serving.defaults import (DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_IMAGES_PER_REQUEST,
                                      DEFAULT_MAX_QUEUED_REQUESTS, DEFAULT_MAX_REQUEST_BYTES,
                                      DEFAULT_MEMORY_BUDGET_MIB)
from kubeseg.serving.predictor import _BAND_ELEMENTS as _STRIP_ELEMENTS
from kubeseg.serving.predictor import (DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_MAX_PIXELS,
                                       DEFAULT_TILE_SIZE, BatchRunner, Runtime,
                                       SegmentationPredictor)

logger = logging.getLogger(__name__)

DEFAULT_MAX_RESPONSE_BYTES = 512 * 1024 * 1024
CLIENT_CLOSED_REQUEST = 499  # the status a request is counted under when its client went away
_ROUTES = ("/invocations", "/ping", "/metrics", "/v2/health/live", "/v2/health/ready", "/v2",
           "/")


@contextlib.contextmanager
def _plain_argv():
    """kserve.model_server parses sys.argv when imported; keep our CLI options away from it."""
    saved = sys.argv
    sys.argv = saved[:1]
    try:
        yield
    finally:
        sys.argv = saved


def _import_kserve():
    with _plain_argv():
        import kserve.model_server  # noqa: F401
    import kserve

    return kserve


_METRICS: Dict[str, Any] = {}


def _metrics():
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
    metrics = _metrics()
    if code == CLIENT_CLOSED_REQUEST:
        metrics["disconnects"].labels(route).inc()
    metrics["requests"].labels(route, str(code)).inc()
    metrics["latency"].labels(route).observe(time.perf_counter() - started)


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


def _json_type(value) -> str:
    """The JSON name of a parsed value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _object(value, field: str) -> dict:
    """``value`` if it is a JSON object (or absent: ``{}``); else a 400 naming ``field``."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise codecs.RequestError(f"{field} must be a JSON object, not {_json_type(value)}")
    return value


def _count(value, field: str) -> int:
    """A non-negative JSON integer (not a boolean), or a 400 naming ``field``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        shown = repr(value)[:60] if isinstance(value, (int, float, str)) else _json_type(value)
        raise codecs.RequestError(f"{field} must be a non-negative integer, not {shown}")
    return value


def _flatten(value, field: str, out: list) -> list:
    """The leaves of a nested JSON array, row-major."""
    stack = [(value, field)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed([(v, f"{where}[{i}]") for i, v in enumerate(item)]))
        else:
            out.append((item, where))
    return out


def _bytes_elements(data, field: str) -> list:
    """BYTES elements given in JSON: strings, each character one byte (Latin-1)."""
    if data is None:
        raise codecs.RequestError(f"{field} is missing: give the BYTES elements as strings, or "
                                  "send them as binary data (parameters.binary_data_size)")
    items = []
    for value, where in _flatten(data, field, []):
        if not isinstance(value, str):
            raise codecs.RequestError(f"{where} is {_json_type(value)}; BYTES elements are "
                                      "strings (one character per byte, Latin-1)")
        try:
            items.append(value.encode("latin-1"))
        except UnicodeEncodeError as exc:
            raise codecs.RequestError(
                f"{where} has a character outside Latin-1 at position {exc.start}: BYTES "
                "elements hold one byte per character (send encoded images as binary data)") \
                from None
    return items


def _uint8_elements(data, field: str):
    """UINT8 values given in JSON, as a flat uint8 array."""
    import numpy as np

    if data is None:
        raise codecs.RequestError(f"{field} is missing: give the UINT8 values 0..255, or send "
                                  "them as binary data (parameters.binary_data_size)")
    values = _flatten(data, field, [])
    for value, where in values:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 255:
            shown = (repr(value)[:60] if isinstance(value, (int, float, str))
                     else _json_type(value))
            raise codecs.RequestError(f"{where} is {shown}; UINT8 values are integers 0..255")
    return np.fromiter((v for v, _ in values), dtype=np.uint8, count=len(values))


def _items_from_tensor(name: str, datatype: str, array, *,
                       max_images: Optional[int] = None) -> Tuple[list, str]:
    """Images of one v2 input: (items, "encoded" | "pixels")."""
    import numpy as np

    field = f"input '{name}'"
    if datatype == "BYTES":
        items = [v if isinstance(v, bytes) else str(v).encode("latin-1")
                 for v in np.asarray(array, dtype=object).reshape(-1)]
        kind = "encoded"
    elif datatype == "UINT8":
        pixels = np.asarray(array, dtype=np.uint8)
        if pixels.ndim == 3:
            pixels = pixels[None]
        if pixels.ndim != 4 or pixels.shape[-1] != 3:
            raise codecs.RequestError(f"{field} UINT8 has shape {list(pixels.shape)}; "
                                      "expected [H, W, 3] or [N, H, W, 3]")
        if pixels.shape[0] and (pixels.shape[1] < 1 or pixels.shape[2] < 1):
            raise codecs.RequestError(f"{field} has shape {list(pixels.shape)}: an image of "
                                      f"{pixels.shape[2]}x{pixels.shape[1]} pixels has no "
                                      "pixels")
        items, kind = list(pixels), "pixels"
    else:
        raise codecs.RequestError(f"{field} has datatype {datatype!r}; send BYTES "
                                  "(encoded JPEG/PNG) or UINT8 pixels [H, W, 3]")
    if not items:
        raise codecs.RequestError(f"{field} is empty: it holds no image")
    if max_images is not None and len(items) > max_images:
        raise codecs.PayloadTooLarge(f"{field} holds {len(items)} images; one request may "
                                     f"carry at most {max_images} (server option "
                                     "--max-images-per-request): split the request")
    return items, kind


def _deserialize_bytes(raw: bytes, field: str = "binary BYTES tensor data") -> list:
    """The v2 binary BYTES layout: each element is a uint32 little-endian length, then bytes."""
    items, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise codecs.RequestError(f"{field} ends inside a length prefix")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise codecs.RequestError(f"{field} is shorter than its lengths say")
        items.append(raw[offset:offset + length])
        offset += length
    return items


@dataclass(frozen=True)
class _V2Request:
    """A parsed v2 inference request: its image input, the outputs asked for (name, binary flag
    or None), the default of ``parameters.binary_data_output`` and the request's id."""

    image: Tuple[str, str, Any]  # (name, datatype, array)
    outputs: List[Tuple[str, Optional[bool]]]
    binary_default: bool
    request_id: Optional[str]

    def requested(self) -> List[str]:
        return [name for name, _ in self.outputs] or ["mask"]

    def binary(self) -> Dict[str, bool]:
        """Whether each output is sent as binary data (its own flag, else the default)."""
        return {name: (flag if flag is not None else self.binary_default)
                for name, flag in (self.outputs or [("mask", None)])}


def _json_part(body: bytes, header_length: Optional[str]) -> Tuple[dict, int]:
    """The request's JSON object and its byte length (``Inference-Header-Content-Length``)."""
    import orjson

    json_length = len(body)
    if header_length is not None:
        text = header_length.strip()
        if not text.isdigit() or int(text) > len(body):
            raise codecs.RequestError(
                f"header Inference-Header-Content-Length is {header_length!r}: it must be the "
                f"byte length of the JSON part, at most the body's {len(body)} bytes")
        json_length = int(text)
    try:
        request = orjson.loads(body[:json_length])
    except orjson.JSONDecodeError as exc:
        raise codecs.RequestError(f"the v2 inference request is not valid JSON ({exc})") \
            from None
    if not isinstance(request, dict):
        raise codecs.RequestError(f"the v2 inference request must be a JSON object, not "
                                  f"{_json_type(request)}")
    return request, json_length


def _input_header(entry, where: str) -> Tuple[str, str, list, dict]:
    """``(name, datatype, shape, parameters)`` of one v2 input, each checked."""
    if not isinstance(entry, dict):
        raise codecs.RequestError(f"{where} must be a JSON object, not {_json_type(entry)}")
    name = entry.get("name", "image")
    if not isinstance(name, str) or not name:
        raise codecs.RequestError(f"{where}.name must be a non-empty string")
    datatype = entry.get("datatype")
    if not isinstance(datatype, str):
        raise codecs.RequestError(f"{where}.datatype must be a string such as \"BYTES\" or "
                                  f"\"UINT8\", not {_json_type(datatype)}")
    shape = entry.get("shape", [])
    if not isinstance(shape, list):
        raise codecs.RequestError(f"{where}.shape must be an array of integers, not "
                                  f"{_json_type(shape)}")
    shape = [_count(v, f"{where}.shape[{i}]") for i, v in enumerate(shape)]
    return name, datatype, shape, _object(entry.get("parameters"), f"{where}.parameters")


def _input_array(entry: dict, where: str, binary: bytes, offset: int) -> Tuple[Any, int]:
    """One v2 input's data (from the binary part after ``offset``, or from its JSON ``data``)
    and the offset after it."""
    import numpy as np

    name, datatype, shape, parameters = _input_header(entry, where)
    size = parameters.get("binary_data_size")
    if size is not None:
        size = _count(size, f"{where}.parameters.binary_data_size")
        if offset + size > len(binary):
            raise codecs.RequestError(
                f"{where}.parameters.binary_data_size is {size} but only "
                f"{len(binary) - offset} bytes of binary data follow the JSON")
        raw = binary[offset:offset + size]
        offset += size
        array = (_deserialize_bytes(raw, f"{where} binary BYTES data") if datatype == "BYTES"
                 else np.frombuffer(raw, dtype=np.uint8) if datatype == "UINT8" else raw)
    elif datatype == "BYTES":
        array = _bytes_elements(entry.get("data"), f"{where}.data")
    elif datatype == "UINT8":
        array = _uint8_elements(entry.get("data"), f"{where}.data")
    else:
        array = entry.get("data")
    if datatype == "UINT8":
        try:
            array = np.asarray(array, dtype=np.uint8).reshape(shape)
        except ValueError:
            raise codecs.RequestError(f"{where}: {np.size(array)} UINT8 values do not fit "
                                      f"{where}.shape {shape}") from None
    return (name, datatype, array), offset


def _image_input(inputs, binary: bytes) -> Tuple[str, str, Any]:
    """The input named ``image`` (else the first); every input is checked."""
    if not inputs or not isinstance(inputs, list):
        raise codecs.RequestError("the request has no inputs: send input 'image' (BYTES with "
                                  "encoded JPEG/PNG, or UINT8 [H, W, 3] pixels)")
    offset, chosen = 0, None
    for index, entry in enumerate(inputs):
        tensor, offset = _input_array(entry, f"inputs[{index}]", binary, offset)
        if chosen is None or tensor[0] == "image":
            chosen = tensor
    return chosen


def _requested_outputs(outputs_given) -> List[Tuple[str, Optional[bool]]]:
    """``[(name, binary_data flag or None)]`` of the request's ``outputs``."""
    if outputs_given is not None and not isinstance(outputs_given, list):
        raise codecs.RequestError(f"outputs must be an array, not {_json_type(outputs_given)}")
    outputs = []
    for index, entry in enumerate(outputs_given or []):
        where = f"outputs[{index}]"
        if not isinstance(entry, dict):
            raise codecs.RequestError(f"{where} must be a JSON object, not {_json_type(entry)}")
        name = entry.get("name")
        if name not in ("mask", "probabilities"):
            raise codecs.RequestError(f"{where}.name is {name!r}: this model has outputs "
                                      "'mask' and 'probabilities'")
        flag = _object(entry.get("parameters"), f"{where}.parameters").get("binary_data")
        if flag is not None and not isinstance(flag, bool):
            raise codecs.RequestError(f"{where}.parameters.binary_data must be true or false")
        outputs.append((name, flag))
    return outputs


def _parse_v2_request(body: bytes, header_length: Optional[str]) -> _V2Request:
    """The image input, requested outputs, binary default and id of a v2 request.

    Every malformed part is refused with a :class:`codecs.RequestError` (400) naming the field.
    """
    request, json_length = _json_part(body, header_length)
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise codecs.RequestError(f"id must be a string, not {_json_type(request_id)}")
    request_parameters = _object(request.get("parameters"), "parameters")
    image = _image_input(request.get("inputs"), body[json_length:])
    outputs = _requested_outputs(request.get("outputs"))
    binary_default = request_parameters.get("binary_data_output", False)
    if not isinstance(binary_default, bool):
        raise codecs.RequestError("parameters.binary_data_output must be true or false")
    return _V2Request(image, outputs, binary_default, request_id)


def _encode_v2_response(model_name: str, request_id, outputs) -> Tuple[bytes, Optional[int]]:
    """v2 JSON response, binary outputs appended (``Inference-Header-Content-Length``)."""
    import orjson

    described, raw = [], []
    for name, datatype, array, binary in outputs:
        entry = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if binary:
            data = array.tobytes()
            entry["parameters"] = {"binary_data_size": len(data)}
            raw.append(data)
        else:
            entry["data"] = array.reshape(-1)
        described.append(entry)
    head = orjson.dumps({"id": request_id or str(uuid.uuid4()), "model_name": model_name,
                         "outputs": described}, option=orjson.OPT_SERIALIZE_NUMPY)
    if raw:
        return head + b"".join(raw), len(head)
    return head, None


def _make_kserve_model(kserve, predictor: SegmentationPredictor):
    """A kserve.Model for KServe's registry and data plane (readiness, metadata).

    It has no ``predict`` of its own: v2 inference requests go to this server's route (they
    reach KServe's data plane only in a v1 request, which KServe answers as not implemented).
    """

    class KubesegModel(kserve.Model):
        def __init__(self):
            super().__init__(predictor.name)
            self.ready = predictor.ready

        def load(self) -> bool:
            if not predictor.ready:
                predictor.load()
            self.ready = True
            return True

    return KubesegModel()


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


@dataclass
class AppState:
    """What the request handlers share: the predictor, the batch runner, the limits."""

    predictor: SegmentationPredictor
    runner: BatchRunner
    executor: concurrent.futures.ThreadPoolExecutor
    max_image_pixels: int
    max_response_bytes: int
    budget: MemoryBudget
    max_images_per_request: int = DEFAULT_MAX_IMAGES_PER_REQUEST

    def image_cost(self, pixels: int, probabilities: bool) -> int:
        """Bytes one image of ``pixels`` pixels holds while it is answered (an upper estimate).

        At full size: the decoded RGB picture and one conversion copy, the mask and its encoding,
        and with probabilities twice ``C`` floats (the array and its encoding). At the scored size
        (at most ``max_pixels``): the normalised input and twice the logits (sliding-window sum).
        Plus the strips that resize logits back.
        """
        classes = max(1, self.predictor.num_classes)
        scored = min(pixels, self.predictor.max_pixels)
        per_pixel = 3 + 3 + 1 + 1 + (2 * 4 * classes if probabilities else 0)
        per_scored = 3 * 4 + 2 * 4 * classes
        strips = 3 * 4 * min(_STRIP_ELEMENTS, classes * pixels)
        return pixels * per_pixel + scored * per_scored + strips

    def prepare_encoded(self, data: bytes):
        image = codecs.decode_image(data, max_image_pixels=self.max_image_pixels)
        return self.predictor.preprocess(image), (image.height, image.width)

    def prepare_pixels(self, pixels):
        height, width = pixels.shape[:2]
        if height * width > self.max_image_pixels:
            raise codecs.PayloadTooLarge(
                f"the image is {width}x{height} pixels; this endpoint accepts at most "
                f"{self.max_image_pixels} (server option --max-image-pixels)")
        return self.predictor.preprocess(pixels), (height, width)

    def check_response_size(self, size: Tuple[int, int], bytes_per_value: int) -> None:
        values = self.predictor.num_classes * size[0] * size[1]
        if values * bytes_per_value > self.max_response_bytes:
            raise codecs.PayloadTooLarge(
                f"probabilities for a {size[1]}x{size[0]} image with "
                f"{self.predictor.num_classes} classes would be about "
                f"{values * bytes_per_value // 2**20} MiB, above the server's "
                f"{self.max_response_bytes // 2**20} MiB limit: ask for Accept image/png, or "
                "send a smaller image")

    async def infer(self, prepare, item, probabilities: bool):
        loop = asyncio.get_running_loop()
        tensor, size = await loop.run_in_executor(self.executor, prepare, item)
        if probabilities:
            self.check_response_size(size, 4)
        logits = await asyncio.wrap_future(self.runner.submit(tensor))
        return await loop.run_in_executor(
            self.executor, lambda: self.predictor.postprocess(logits, size,
                                                              probabilities=probabilities))


def _pixels_of(state: AppState, kind: str, item) -> int:
    """Pixels of one request image, from its header (encoded) or its shape (pixels)."""
    if kind == "encoded":
        width, height = codecs.image_size(item, max_image_pixels=state.max_image_pixels)
        return width * height
    return int(item.shape[0]) * int(item.shape[1])


async def _infer_v2(state: "AppState", name: str, datatype: str, array, requested,
                    finish: Optional[Callable[[list], Any]] = None):
    """``[(output name, datatype, array)]`` for a v2 request's image input.

    The request's memory is held from decoding until ``finish(outputs)`` (run on a worker
    thread, e.g. to encode the response) returns; its result is returned then.
    """
    import numpy as np

    unknown = sorted(set(requested) - {"mask", "probabilities"})
    if unknown:
        raise codecs.RequestError(f"unknown output(s) {unknown}: this model has 'mask' and "
                                  "'probabilities'")
    items, kind = _items_from_tensor(name, datatype, array,
                                     max_images=state.max_images_per_request)
    prepare = state.prepare_encoded if kind == "encoded" else state.prepare_pixels
    want_probs = "probabilities" in requested
    cost = 0
    for index, item in enumerate(items):
        try:
            cost += state.image_cost(_pixels_of(state, kind, item), want_probs)
        except codecs.RequestError as exc:
            raise type(exc)(f"input '{name}', image {index}: {exc}") from None
    async with state.budget.admit(cost):
        results = await asyncio.gather(*[state.infer(prepare, item, want_probs)
                                         for item in items])
        sizes = {r.mask.shape for r in results}
        if len(sizes) > 1:
            raise codecs.RequestError(f"the images of one request must share a size; got "
                                      f"{sorted(sizes)}")
        outputs = []
        for output in requested:
            if output == "mask":
                outputs.append(("mask", "UINT8", np.stack([r.mask for r in results])))
            else:
                outputs.append(("probabilities", "FP32",
                                np.concatenate([r.probabilities for r in results])))
        del results
        if finish is None:
            return outputs
        return await asyncio.get_running_loop().run_in_executor(state.executor, finish, outputs)


def _encode(state: AppState, prediction, media: codecs.MediaType) -> bytes:
    if media.type == codecs.PNG:
        return codecs.encode_png_mask(prediction.mask)
    if media.type in (codecs.RECORDIO_PROTOBUF, codecs.PROTOBUF):
        return codecs.encode_probabilities_recordio(prediction.probabilities)
    if prediction.probabilities is not None:
        return codecs.encode_json_probabilities(prediction.probabilities,
                                                state.predictor.class_names)
    return codecs.encode_json_mask(prediction.mask, state.predictor.class_names)


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


@dataclass(frozen=True)
class ServerSettings:
    """Everything :func:`serve` needs besides the model: the address, the model's name in the
    v2 routes, how images are scored (``max_pixels``, ``tile_size``; see
    :class:`SegmentationPredictor`), where the forward pass runs, and the server's limits."""

    host: str = "127.0.0.1"
    port: int = 8080
    model_name: str = "model"
    max_pixels: int = DEFAULT_MAX_PIXELS
    tile_size: Optional[int] = DEFAULT_TILE_SIZE
    runtime: Runtime = field(default_factory=Runtime)
    limits: ServerLimits = field(default_factory=ServerLimits)


def _app_state(predictor: SegmentationPredictor, limits: ServerLimits) -> AppState:
    """The predictor (loaded here if it is not yet), its batch runner and the I/O threads."""
    if not predictor.ready:
        predictor.load()
    runner = BatchRunner(predictor, max_batch_size=limits.max_batch_size,
                         on_batch=_metrics()["batch"].observe)
    workers = limits.workers or min(32, (os.cpu_count() or 1) + 4)
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=workers,
                                                     thread_name_prefix="kubeseg-io")
    budget = MemoryBudget(int(limits.memory_budget_mib) * 2**20, int(limits.max_queued_requests))
    return AppState(predictor, runner, executor, int(limits.max_image_pixels),
                    int(limits.max_response_bytes), budget, int(limits.max_images_per_request))


def _kserve_server(kserve, predictor: SegmentationPredictor):
    """KServe's model server (registry and data plane) holding ``predictor``; never started."""
    server = kserve.ModelServer(http_port=0, enable_grpc=False, workers=1,
                                enable_latency_logging=False)
    server.register_model(_make_kserve_model(kserve, predictor))
    return server


def _add_kserve_routes(app, server) -> None:
    """KServe's health, metadata and v1/v2 routes and its error handlers."""
    from kserve import errors as kerrors
    from kserve.protocol.rest.v1_endpoints import register_v1_endpoints
    from kserve.protocol.rest.v2_endpoints import register_v2_endpoints

    register_v1_endpoints(app, server.dataplane, server.model_repository_extension)
    register_v2_endpoints(app, server.dataplane, server.model_repository_extension)
    for exc_type, handler in (
            (kerrors.InvalidInput, kerrors.invalid_input_handler),
            (kerrors.InferenceError, kerrors.inference_error_handler),
            (kerrors.ModelNotFound, kerrors.model_not_found_handler),
            (kerrors.ModelNotReady, kerrors.model_not_ready_handler),
            (NotImplementedError, kerrors.not_implemented_error_handler),
            (kerrors.ServerNotLive, kerrors.server_not_live_handler),
            (kerrors.ServerNotReady, kerrors.server_not_ready_handler),
            (Exception, kerrors.generic_exception_handler)):
        app.add_exception_handler(exc_type, handler)


async def _request_error(request, exc: codecs.RequestError):
    from fastapi.responses import Response

    headers = {}
    if isinstance(exc, codecs.ServiceUnavailable):
        headers["Retry-After"] = str(exc.retry_after)
    return Response(codecs.error_body(str(exc), exc.status), status_code=exc.status,
                    media_type=codecs.JSON, headers=headers)


def _v2_infer_route(state: AppState):
    """The handler of ``POST /v2/models/{name}[/versions/{v}]/infer``."""
    from fastapi import Request
    from fastapi.responses import Response

    predictor = state.predictor

    async def v2_infer(model_name: str, request: Request, model_version: Optional[str] = None):
        if model_name != predictor.name:
            return Response(codecs.error_body(f"model {model_name!r} is not served here; this "
                                              f"server has {predictor.name!r}", 404),
                            status_code=404, media_type=codecs.JSON)
        body = await request.body()
        parsed = _parse_v2_request(body, request.headers.get("inference-header-content-length"))
        del body
        binary = parsed.binary()
        payload, json_length = await _infer_v2(
            state, *parsed.image, parsed.requested(), finish=lambda results: _encode_v2_response(
                predictor.name, parsed.request_id,
                [(name, dtype, array, bool(binary.get(name)))
                 for name, dtype, array in results]))
        if json_length is not None:
            headers = {"inference-header-content-length": str(json_length)}
            return Response(payload, headers=headers, media_type="application/octet-stream")
        return Response(payload, media_type=codecs.JSON)

    return v2_infer


def _sagemaker_routes(state: AppState):
    """The handlers of ``GET /ping`` and ``POST /invocations``."""
    from fastapi import Request
    from fastapi.responses import Response

    async def ping():
        if not state.predictor.ready:
            return Response(codecs.error_body("model not loaded", 503), status_code=503,
                            media_type=codecs.JSON)
        return Response(b"", status_code=200)

    async def invocations(request: Request):
        codecs.check_content_type(request.headers.get("content-type"))
        media = codecs.choose_response_type(request.headers.get("accept"))
        want_probs = codecs.wants_probabilities(media)
        body = await request.body()
        width, height = codecs.image_size(body, max_image_pixels=state.max_image_pixels)
        async with state.budget.admit(state.image_cost(width * height, want_probs)):
            prediction = await state.infer(state.prepare_encoded, body, want_probs)
            del body
            loop = asyncio.get_running_loop()
            payload = await loop.run_in_executor(state.executor, _encode, state, prediction,
                                                 media)
            del prediction
        return Response(payload, status_code=200, media_type=media.type)

    return ping, invocations


def build_app(predictor: SegmentationPredictor, limits: ServerLimits = ServerLimits()):
    """A FastAPI app (an ASGI callable) serving ``predictor`` (loaded here if it is not yet)."""
    kserve = _import_kserve()
    from fastapi import FastAPI
    from fastapi.responses import ORJSONResponse
    from kserve.protocol.rest.server import metrics_handler

    state = _app_state(predictor, limits)
    server = _kserve_server(kserve, predictor)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        state.runner.close()
        state.executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="kubeseg", docs_url=None, redoc_url=None, lifespan=lifespan,
                  default_response_class=ORJSONResponse)
    app.state.kubeseg = state
    app.add_api_route("/", server.dataplane.live)
    app.add_api_route("/metrics", metrics_handler, methods=["GET"])
    # ours first, for every v2 infer route: KServe 0.21's own cannot read binary BYTES (encoded
    # images); a version, when named, is not checked (one version is served)
    v2_infer = _v2_infer_route(state)
    app.add_api_route("/v2/models/{model_name}/infer", v2_infer, methods=["POST"])
    app.add_api_route("/v2/models/{model_name}/versions/{model_version}/infer", v2_infer,
                      methods=["POST"])
    _add_kserve_routes(app, server)
    app.add_exception_handler(codecs.RequestError, _request_error)
    ping, invocations = _sagemaker_routes(state)
    app.add_api_route("/ping", ping, methods=["GET"])
    app.add_api_route("/invocations", invocations, methods=["POST"])
    return LimitsAndMetrics(app, limits.max_request_bytes)


def serve(model_uri: str, settings: ServerSettings = ServerSettings()) -> None:
    """Load the model artifact at ``model_uri`` once and serve it on ``settings.host:port``
    (blocking).

    Stops on SIGINT/SIGTERM after finishing the requests in flight.
    """
    import uvicorn

    predictor = SegmentationPredictor(model_uri, name=settings.model_name,
                                      runtime=settings.runtime, max_pixels=settings.max_pixels,
                                      tile_size=settings.tile_size)
    app = build_app(predictor, settings.limits)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None,
                            access_log=False, timeout_keep_alive=65, timeout_graceful_shutdown=30,
                            loop="asyncio", lifespan="on")
    logger.info("serving model %r from %s on http://%s:%d (POST /invocations, "
                "/v2/models/%s/infer)", settings.model_name, model_uri, settings.host,
                settings.port, settings.model_name)
    uvicorn.Server(config).run()


__all__ = ["DEFAULT_MAX_REQUEST_BYTES", "DEFAULT_MAX_RESPONSE_BYTES", "DEFAULT_MAX_BATCH_SIZE",
           "DEFAULT_MAX_IMAGES_PER_REQUEST", "DEFAULT_MEMORY_BUDGET_MIB",
           "DEFAULT_MAX_QUEUED_REQUESTS", "AppState", "MemoryBudget", "LimitsAndMetrics",
           "ServerLimits", "ServerSettings", "build_app", "serve"]
