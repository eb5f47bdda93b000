"""The HTTP server: SageMaker-style ``/invocations`` beside KServe's Open Inference Protocol v2.

Routes:

- ``POST /invocations``: an image in (``image/jpeg``, ``image/png``, ``application/x-image``);
  out by ``Accept``: ``image/png`` class-id mask (default), ``application/x-recordio-protobuf``
  / ``application/x-protobuf`` probabilities, ``application/json`` mask or probabilities (see
  :mod:`kubeseg.serving.codecs`).
- ``GET /ping``: 200 once the model is loaded (SageMaker's health check).
- KServe's routes: ``/v2/health/live``, ``/v2/health/ready``, ``/v2/models/{name}``,
  ``/v2/models/{name}/ready``, ``POST /v2/models/{name}/infer`` (input ``image``: BYTES, one
  encoded JPEG/PNG per element, or UINT8 ``[H, W, 3]`` / ``[N, H, W, 3]`` pixels; outputs
  ``mask`` UINT8 ``[N, H, W]`` and, when requested, ``probabilities`` FP32 ``[N, C, H, W]``),
  ``/v1/models/{name}``, ``/metrics`` (Prometheus: KServe's per-step histograms and ours,
  ``kubeseg_requests_total`` and ``kubeseg_request_duration_seconds`` by route and status).

Refusals are JSON ``{"error": ..., "status": ...}``: 413 request body above
``max_request_bytes`` or image above ``max_image_pixels``, 415 Content-Type, 400 undecodable
image, 406 Accept. The server keeps serving after any of them.

KServe's ``ModelServer`` provides the model registry, the data plane and the v1/v2 endpoints;
its ``start()`` is not used because it binds 0.0.0.0, starts gRPC, installs process signal
handlers and mounts everything on one process-wide FastAPI app. Here each :func:`build_app`
gets its own FastAPI app with KServe's endpoints and ours, served by uvicorn on the address
given (127.0.0.1 by default).
"""

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import struct
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

from kubeseg.serving import codecs
from kubeseg.serving.predictor import (DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_MAX_PIXELS,
                                       DEFAULT_TILE_SIZE, BatchRunner, SegmentationPredictor)

logger = logging.getLogger(__name__)

DEFAULT_MAX_REQUEST_BYTES = 32 * 1024 * 1024
DEFAULT_MAX_RESPONSE_BYTES = 512 * 1024 * 1024
DEFAULT_MAX_BATCH_SIZE = 4
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


class LimitsAndMetrics:
    """ASGI middleware: refuse bodies above the limit (413) before the app reads them, and count
    and time every request."""

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

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = _route_label(scope.get("path", ""))
        started = time.perf_counter()
        status_seen = {"code": 500}

        async def send_counting(message):
            if message["type"] == "http.response.start":
                status_seen["code"] = message["status"]
            await send(message)

        too_large = (f"request body larger than {self.max_request_bytes} bytes (server option "
                     "--max-request-bytes): send a smaller image")
        try:
            if scope.get("method") in ("POST", "PUT"):
                headers = dict(scope.get("headers") or [])
                length = headers.get(b"content-length")
                if length is not None and (not length.isdigit()
                                           or int(length) > self.max_request_bytes):
                    return await self._refuse(send_counting, 413, too_large)
                # read the body here (bounded), then hand it to the app
                chunks, size = [], 0
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > self.max_request_bytes:
                        return await self._refuse(send_counting, 413, too_large)
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        break
                body = b"".join(chunks)
                delivered = False

                async def replay():
                    nonlocal delivered
                    if not delivered:
                        delivered = True
                        return {"type": "http.request", "body": body, "more_body": False}
                    return await receive()

                return await self.app(scope, replay, send_counting)
            return await self.app(scope, receive, send_counting)
        finally:
            metrics = _metrics()
            metrics["requests"].labels(route, str(status_seen["code"])).inc()
            metrics["latency"].labels(route).observe(time.perf_counter() - started)


def _items_from_tensor(name: str, datatype: str, array) -> Tuple[list, str]:
    """Images of one v2 input: (items, "encoded" | "pixels")."""
    import numpy as np

    if datatype == "BYTES":
        items = [v if isinstance(v, bytes) else str(v).encode("latin-1")
                 for v in np.asarray(array, dtype=object).reshape(-1)]
        kind = "encoded"
    elif datatype == "UINT8":
        pixels = np.asarray(array, dtype=np.uint8)
        if pixels.ndim == 3:
            pixels = pixels[None]
        if pixels.ndim != 4 or pixels.shape[-1] != 3:
            raise codecs.RequestError(f"input '{name}' UINT8 has shape {list(pixels.shape)}; "
                                      "expected [H, W, 3] or [N, H, W, 3]")
        items, kind = list(pixels), "pixels"
    else:
        raise codecs.RequestError(f"input '{name}' has datatype {datatype}; send BYTES "
                                  "(encoded JPEG/PNG) or UINT8 pixels [H, W, 3]")
    if not items:
        raise codecs.RequestError(f"input '{name}' is empty")
    return items, kind


def _deserialize_bytes(raw: bytes) -> list:
    """The v2 binary BYTES layout: each element is a uint32 little-endian length, then bytes."""
    items, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise codecs.RequestError("binary BYTES tensor data ends inside a length prefix")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise codecs.RequestError("binary BYTES tensor data is shorter than its lengths say")
        items.append(raw[offset:offset + length])
        offset += length
    return items


def _parse_v2_request(body: bytes, header_length: Optional[str]):
    """``(name, datatype, array)`` of the image input, requested outputs, binary default."""
    import numpy as np
    import orjson

    try:
        json_length = int(header_length) if header_length else len(body)
        request = orjson.loads(body[:json_length])
    except (ValueError, orjson.JSONDecodeError) as exc:
        raise codecs.RequestError(f"the v2 inference request is not valid JSON ({exc})") \
            from None
    inputs = request.get("inputs") if isinstance(request, dict) else None
    if not inputs or not isinstance(inputs, list):
        raise codecs.RequestError("the request has no inputs: send input 'image' (BYTES with "
                                  "encoded JPEG/PNG, or UINT8 [H, W, 3] pixels)")
    binary, offset, chosen = body[json_length:], 0, None
    for entry in inputs:
        if not isinstance(entry, dict):
            raise codecs.RequestError("each input must be a JSON object")
        size = (entry.get("parameters") or {}).get("binary_data_size")
        datatype = str(entry.get("datatype", ""))
        if size is not None:
            raw = binary[offset:offset + int(size)]
            offset += int(size)
            array = (_deserialize_bytes(raw) if datatype == "BYTES"
                     else np.frombuffer(raw, dtype=np.uint8) if datatype == "UINT8" else raw)
        else:
            array = entry.get("data")
            if datatype == "UINT8":
                try:
                    array = np.asarray(array, dtype=np.uint8)
                except (TypeError, ValueError, OverflowError):
                    raise codecs.RequestError(f"input '{entry.get('name')}': UINT8 data must "
                                              "be integers 0..255") from None
            elif datatype == "BYTES":
                array = [v.encode("latin-1") if isinstance(v, str) else bytes(v)
                         for v in np.asarray(array, dtype=object).reshape(-1)]
        if datatype == "UINT8":
            shape = entry.get("shape") or []
            try:
                array = np.asarray(array, dtype=np.uint8).reshape([int(v) for v in shape])
            except (TypeError, ValueError):
                raise codecs.RequestError(f"input '{entry.get('name')}': {np.size(array)} "
                                          f"values do not fit shape {shape}") from None
        if chosen is None or entry.get("name") == "image":
            chosen = (str(entry.get("name", "image")), datatype, array)
    outputs = []
    for entry in request.get("outputs") or []:
        name = entry.get("name") if isinstance(entry, dict) else None
        outputs.append((name, (entry.get("parameters") or {}).get("binary_data")))
    binary_default = bool((request.get("parameters") or {}).get("binary_data_output", False))
    return chosen, outputs, binary_default, request.get("id")


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


def _make_kserve_model(kserve, predictor: SegmentationPredictor, app_state: "AppState"):
    """A kserve.Model for KServe's registry and data plane (readiness, metadata, infer)."""
    from kserve import InferOutput, InferRequest, InferResponse
    from kserve.errors import InvalidInput

    class KubesegModel(kserve.Model):
        def __init__(self):
            super().__init__(predictor.name)
            self.ready = predictor.ready

        def load(self) -> bool:
            if not predictor.ready:
                predictor.load()
            self.ready = True
            return True

        async def predict(self, payload, headers=None):
            if not isinstance(payload, InferRequest) or not payload.inputs:
                raise InvalidInput("send an Open Inference Protocol v2 request with input "
                                   "'image' (POST /v2/models/NAME/infer), or an image to "
                                   "POST /invocations")
            source = payload.get_input_by_name("image") or payload.inputs[0]
            requested = [o.name for o in (payload.request_outputs or [])] or ["mask"]
            try:
                results = await app_state.infer_v2(source.name, source.datatype,
                                                   source.as_numpy(), requested)
            except codecs.RequestError as exc:
                raise InvalidInput(str(exc)) from None
            outputs = []
            for name, datatype, array in results:
                output = InferOutput(name, list(array.shape), datatype)
                output.set_data_from_numpy(array, binary_data=payload.use_binary_outputs)
                outputs.append(output)
            return InferResponse(response_id=payload.id or str(uuid.uuid4()),
                                 model_name=self.name, infer_outputs=outputs,
                                 use_binary_outputs=payload.use_binary_outputs)

    return KubesegModel()


@dataclass
class AppState:
    """What the request handlers share: the predictor, the batch runner, the limits."""

    predictor: SegmentationPredictor
    runner: BatchRunner
    executor: concurrent.futures.ThreadPoolExecutor
    max_image_pixels: int
    max_response_bytes: int

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

    async def infer_v2(self, name, datatype, array, requested):
        return await _infer_v2(self, name, datatype, array, requested)

    async def infer(self, prepare, item, probabilities: bool):
        loop = asyncio.get_running_loop()
        tensor, size = await loop.run_in_executor(self.executor, prepare, item)
        if probabilities:
            self.check_response_size(size, 4)
        logits = await asyncio.wrap_future(self.runner.submit(tensor))
        return await loop.run_in_executor(
            self.executor, lambda: self.predictor.postprocess(logits, size,
                                                              probabilities=probabilities))


async def _infer_v2(state: "AppState", name: str, datatype: str, array, requested):
    import numpy as np

    unknown = sorted(set(requested) - {"mask", "probabilities"})
    if unknown:
        raise codecs.RequestError(f"unknown output(s) {unknown}: this model has 'mask' and "
                                  "'probabilities'")
    items, kind = _items_from_tensor(name, datatype, array)
    prepare = state.prepare_encoded if kind == "encoded" else state.prepare_pixels
    want_probs = "probabilities" in requested
    results = await asyncio.gather(*[state.infer(prepare, item, want_probs) for item in items])
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
    return outputs


def _encode(state: AppState, prediction, media: codecs.MediaType) -> bytes:
    if media.type == codecs.PNG:
        return codecs.encode_png_mask(prediction.mask)
    if media.type in (codecs.RECORDIO_PROTOBUF, codecs.PROTOBUF):
        return codecs.encode_probabilities_recordio(prediction.probabilities)
    if prediction.probabilities is not None:
        return codecs.encode_json_probabilities(prediction.probabilities,
                                                state.predictor.class_names)
    return codecs.encode_json_mask(prediction.mask, state.predictor.class_names)


def build_app(predictor: SegmentationPredictor, *,
              max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
              max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
              max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
              max_batch_size: int = DEFAULT_MAX_BATCH_SIZE, workers: Optional[int] = None):
    """A FastAPI app (an ASGI callable) serving ``predictor`` (loaded here if it is not yet)."""
    kserve = _import_kserve()
    from fastapi import FastAPI, Request
    from fastapi.responses import ORJSONResponse, Response
    from kserve import errors as kerrors
    from kserve.protocol.rest.server import metrics_handler
    from kserve.protocol.rest.v1_endpoints import register_v1_endpoints
    from kserve.protocol.rest.v2_endpoints import register_v2_endpoints

    if not predictor.ready:
        predictor.load()
    runner = BatchRunner(predictor, max_batch_size=max_batch_size,
                         on_batch=_metrics()["batch"].observe)
    workers = workers or min(32, (os.cpu_count() or 1) + 4)
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=workers,
                                                     thread_name_prefix="kubeseg-io")
    state = AppState(predictor, runner, executor, int(max_image_pixels), int(max_response_bytes))
    model = _make_kserve_model(kserve, predictor, state)
    server = kserve.ModelServer(http_port=0, enable_grpc=False, workers=1,
                                enable_latency_logging=False)
    server.register_model(model)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        runner.close()
        executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="kubeseg", docs_url=None, redoc_url=None, lifespan=lifespan,
                  default_response_class=ORJSONResponse)
    app.state.kubeseg = state
    app.add_api_route("/", server.dataplane.live)
    app.add_api_route("/metrics", metrics_handler, methods=["GET"])
    async def v2_infer(model_name: str, request: Request):
        if model_name != predictor.name:
            return Response(codecs.error_body(f"model {model_name!r} is not served here; this "
                                              f"server has {predictor.name!r}", 404),
                            status_code=404, media_type=codecs.JSON)
        body = await request.body()
        source, outputs, binary_default, request_id = _parse_v2_request(
            body, request.headers.get("inference-header-content-length"))
        requested = [name for name, _ in outputs] or ["mask"]
        binary = {name: (flag if flag is not None else binary_default)
                  for name, flag in (outputs or [("mask", None)])}
        results = await state.infer_v2(*source, requested)
        payload, json_length = _encode_v2_response(
            predictor.name, request_id,
            [(name, dtype, array, bool(binary.get(name))) for name, dtype, array in results])
        headers = {}
        if json_length is not None:
            headers["inference-header-content-length"] = str(json_length)
            return Response(payload, headers=headers, media_type="application/octet-stream")
        return Response(payload, media_type=codecs.JSON)

    # ours first: KServe 0.21's own route cannot read binary BYTES (encoded images)
    app.add_api_route("/v2/models/{model_name}/infer", v2_infer, methods=["POST"])
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

    async def request_error(request: Request, exc: codecs.RequestError):
        return Response(codecs.error_body(str(exc), exc.status), status_code=exc.status,
                        media_type=codecs.JSON)

    app.add_exception_handler(codecs.RequestError, request_error)

    async def ping():
        if not predictor.ready:
            return Response(codecs.error_body("model not loaded", 503), status_code=503,
                            media_type=codecs.JSON)
        return Response(b"", status_code=200)

    async def invocations(request: Request):
        codecs.check_content_type(request.headers.get("content-type"))
        media = codecs.choose_response_type(request.headers.get("accept"))
        want_probs = codecs.wants_probabilities(media)
        body = await request.body()
        prediction = await state.infer(state.prepare_encoded, body, want_probs)
        loop = asyncio.get_running_loop()
        payload = await loop.run_in_executor(executor, _encode, state, prediction, media)
        return Response(payload, status_code=200, media_type=media.type)

    app.add_api_route("/ping", ping, methods=["GET"])
    app.add_api_route("/invocations", invocations, methods=["POST"])

    return LimitsAndMetrics(app, max_request_bytes)


def serve(model_uri: str, *, host: str = "127.0.0.1", port: int = 8080,
          model_name: str = "model", max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
          max_pixels: int = DEFAULT_MAX_PIXELS, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
          tile_size: Optional[int] = DEFAULT_TILE_SIZE,
          max_batch_size: int = DEFAULT_MAX_BATCH_SIZE, workers: Optional[int] = None,
          device: Optional[str] = None, precision: str = "float32",
          threads: Optional[int] = None) -> None:
    """Load the model artifact at ``model_uri`` once and serve it on ``host:port`` (blocking).

    Stops on SIGINT/SIGTERM after finishing the requests in flight.
    """
    import uvicorn

    predictor = SegmentationPredictor(model_uri, name=model_name, device=device,
                                      max_pixels=max_pixels, tile_size=tile_size,
                                      precision=precision, threads=threads)
    app = build_app(predictor, max_request_bytes=max_request_bytes,
                    max_image_pixels=max_image_pixels, max_batch_size=max_batch_size,
                    workers=workers)
    config = uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False,
                            timeout_keep_alive=65, timeout_graceful_shutdown=30,
                            loop="asyncio", lifespan="on")
    logger.info("serving model %r from %s on http://%s:%d (POST /invocations, "
                "/v2/models/%s/infer)", model_name, model_uri, host, port, model_name)
    uvicorn.Server(config).run()


__all__ = ["DEFAULT_MAX_REQUEST_BYTES", "DEFAULT_MAX_RESPONSE_BYTES", "DEFAULT_MAX_BATCH_SIZE",
           "AppState", "LimitsAndMetrics", "build_app", "serve"]
