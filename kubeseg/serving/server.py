"""The HTTP server: SageMaker-style ``/invocations`` beside KServe's Open Inference Protocol v2.

Routes:

- ``POST /invocations``: an image in (``image/jpeg``, ``image/png``, ``application/x-image``);
  out by ``Accept``: ``image/png`` class-id mask (default), ``application/x-recordio-protobuf``
  / ``application/x-protobuf`` probabilities, ``application/json`` mask or probabilities (see
  :mod:`kubeseg.serving.codecs`).
- ``GET /ping``: 200 once the model is loaded (SageMaker's health check).
- KServe's routes: ``/v2/health/live``, ``/v2/health/ready``, ``/v2/models/{name}``,
  ``/v2/models/{name}/ready``, ``POST /v2/models/{name}[/versions/{v}]/infer`` (the protocol of
  :mod:`kubeseg.serving.v2`), ``/v1/models/{name}``, ``/metrics`` (Prometheus).

Refusals are JSON ``{"error": ..., "status": ...}`` with 400 (undecodable image, malformed v2
request), 406 (Accept), 415 (Content-Type), 408 (a client sending too slowly), 413 and 503
(limits and memory admission: see :mod:`kubeseg.serving.admission`). The server keeps serving
after any of them.

Each :func:`build_app` gets its own FastAPI app with KServe's endpoints and ours, served by
uvicorn on the address given (127.0.0.1 by default); KServe's ``ModelServer.start()`` is not
used (it binds 0.0.0.0, starts gRPC, installs signal handlers and shares one app per process).
"""

import asyncio
import contextlib
import logging
import sys
from dataclasses import dataclass, field
from typing import Optional

from kubeseg.serving import codecs, v2
from kubeseg.serving.admission import LimitsAndMetrics, ServerLimits, header_deadline_protocol
from kubeseg.serving.handling import AppState, app_state, infer_v2
from kubeseg.serving.monitor import MonitoringSettings
from kubeseg.serving.predictor import (DEFAULT_MAX_PIXELS, DEFAULT_TILE_SIZE, Runtime,
                                       SegmentationPredictor)

logger = logging.getLogger(__name__)


def _import_kserve():
    """kserve.model_server parses sys.argv when imported: keep our CLI options away from it."""
    saved = sys.argv
    sys.argv = saved[:1]
    try:
        import kserve.model_server  # noqa: F401
    finally:
        sys.argv = saved
    import kserve

    return kserve


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
    monitoring: MonitoringSettings = field(default_factory=MonitoringSettings)


def _kserve_server(kserve, predictor: SegmentationPredictor):
    """KServe's model server (registry and data plane) holding ``predictor``'s name and
    readiness; never started. The registered model is KServe's own class: it answers readiness
    and metadata, and has no predict path of ours (see the module docstring)."""
    server = kserve.ModelServer(http_port=0, enable_grpc=False, workers=1,
                                enable_latency_logging=False)
    model = kserve.Model(predictor.name)
    model.ready = predictor.ready
    server.register_model(model)
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
        parsed = v2.parse_request(body, request.headers.get("inference-header-content-length"))
        del body
        binary = parsed.binary()
        payload, json_length = await infer_v2(
            state, parsed.image, parsed.requested(), finish=lambda results: v2.encode_response(
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
        async with state.admission.admit(state.admission.encoded_cost(body, want_probs)):
            prediction = await state.infer(state.prepare_encoded, body, want_probs)
            del body
            loop = asyncio.get_running_loop()
            payload = await loop.run_in_executor(state.executor, codecs.encode_prediction,
                                                 prediction, media, state.predictor.class_names)
            del prediction
        return Response(payload, status_code=200, media_type=media.type)

    return ping, invocations


def build_app(predictor: SegmentationPredictor, limits: ServerLimits = ServerLimits(),
              monitoring: MonitoringSettings = MonitoringSettings()):
    """A FastAPI app (an ASGI callable) serving ``predictor`` (loaded here if it is not yet);
    ``monitoring``: what it counts of its predictions for /metrics."""
    kserve = _import_kserve()
    from fastapi import FastAPI
    from fastapi.responses import ORJSONResponse
    from kserve.protocol.rest.server import metrics_handler

    from kubeseg.serving.monitor import unexport

    state = app_state(predictor, limits, monitoring)
    server = _kserve_server(kserve, predictor)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        state.runner.close()
        state.executor.shutdown(wait=False, cancel_futures=True)
        for source in (state.monitor, state.keeper):
            if source is not None:
                unexport(source)
        if state.keeper is not None:
            state.keeper.close()

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
    return LimitsAndMetrics(app, limits.max_request_bytes, body_grace_s=limits.header_timeout_s,
                            min_body_rate=limits.min_body_rate)


def serve(model_uri: str, settings: ServerSettings = ServerSettings()) -> None:
    """Load the model artifact at ``model_uri`` once and serve it on ``settings.host:port``
    (blocking).

    Stops on SIGINT/SIGTERM after finishing the requests in flight.
    """
    import uvicorn

    predictor = SegmentationPredictor(model_uri, name=settings.model_name,
                                      runtime=settings.runtime, max_pixels=settings.max_pixels,
                                      tile_size=settings.tile_size)
    app = build_app(predictor, settings.limits, settings.monitoring)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None,
                            access_log=False, timeout_keep_alive=65, timeout_graceful_shutdown=30,
                            loop="asyncio", lifespan="on",
                            http=header_deadline_protocol(settings.limits.header_timeout_s))
    logger.info("serving model %r from %s on http://%s:%d (POST /invocations, "
                "/v2/models/%s/infer)", settings.model_name, model_uri, settings.host,
                settings.port, settings.model_name)
    uvicorn.Server(config).run()


__all__ = ["ServerSettings", "build_app", "serve"]
