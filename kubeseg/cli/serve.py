"""``kubeseg serve``: serve a model artifact over HTTP (SageMaker-style and Open Inference v2);
``kubeseg export``: add an ONNX export to the artifact; ``kubeseg quantize``: add an int8 model."""
from __future__ import annotations

import argparse
import textwrap


def add_image_size_arguments(parser: argparse.ArgumentParser, *, too_large: str) -> None:
    """How image size is handled when scoring, the same for the server and batch prediction:
    ``too_large`` says what happens to images above --max-image-pixels."""
    from kubeseg.serving.defaults import (DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_MAX_PIXELS,
                                          DEFAULT_TILE_SIZE)

    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help="images with more pixels are scored downscaled and answered at "
                             "their full size (default: %(default)s)")
    parser.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
                        help=f"images with more pixels {too_large} (default: %(default)s)")
    parser.add_argument("--tile-size", type=int, default=DEFAULT_TILE_SIZE,
                        help="image sides above this are scored with a sliding window "
                             "(default: %(default)s; 0 = off)")


def add_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    if verb == "export":
        return _export_arguments(parser)
    if verb == "quantize":
        return _quantize_arguments(parser)
    from kubeseg.serving.defaults import (BACKENDS, DEFAULT_CPU_BACKEND, DEFAULT_MAX_BATCH_SIZE,
                                          DEFAULT_MAX_IMAGES_PER_REQUEST,
                                          DEFAULT_MAX_QUEUED_REQUESTS, DEFAULT_MAX_REQUEST_BYTES,
                                          DEFAULT_MEMORY_BUDGET_MIB, PRECISIONS)

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = _memory_epilog()

    parser.add_argument("model_uri", metavar="MODEL_URI",
                        help="model artifact folder or s3:// prefix (written by kubeseg train)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default: %(default)s; 0.0.0.0 in a container)")
    parser.add_argument("--port", type=int, default=8080, help="(default: %(default)s)")
    parser.add_argument("--model-name", default="model",
                        help="name in the v2 routes /v2/models/NAME/... (default: %(default)s)")
    parser.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES,
                        help="larger request bodies get 413 (default: %(default)s)")
    add_image_size_arguments(parser, too_large="are refused with 413 before decoding")
    parser.add_argument("--max-batch-size", type=int, default=DEFAULT_MAX_BATCH_SIZE,
                        help="same-size requests waiting together are scored as one batch of "
                             "up to this many; on a CPU also at most 512x512 pixels in all, "
                             "which is faster there (default: %(default)s)")
    parser.add_argument("--max-images-per-request", type=int,
                        default=DEFAULT_MAX_IMAGES_PER_REQUEST,
                        help="v2 requests with more images get 413 (default: %(default)s)")
    parser.add_argument("--memory-budget-mib", type=int, default=DEFAULT_MEMORY_BUDGET_MIB,
                        help="memory for the images in flight (decoded pictures, logits, masks, "
                             "probabilities); requests above it wait (default: %(default)s, "
                             "what an image of the default --max-image-pixels needs; see "
                             "below)")
    parser.add_argument("--max-queued-requests", type=int, default=DEFAULT_MAX_QUEUED_REQUESTS,
                        help="requests waiting for memory beyond this many get 503 with "
                             "Retry-After (default: %(default)s)")
    _slow_client_arguments(parser)
    parser.add_argument("--workers", type=int, default=None,
                        help="threads decoding and encoding requests (default: CPUs + 4, "
                             "at most 32); forward passes run on one thread of their own")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--device", default=None,
                        help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--precision", choices=PRECISIONS, default="float32",
                        help="compute precision of the forward pass (default: %(default)s). "
                             "int8: the artifact's int8 model (kubeseg quantize) on ONNX "
                             "Runtime; bfloat16: CPUs with AVX512-BF16/AMX (refused elsewhere) "
                             "and GPUs; float16: GPUs; auto: int8 when its recorded argmax "
                             "agreement is >= 99%%, else native bfloat16, else float32")
    parser.add_argument("--backend", choices=BACKENDS, default=None,
                        help="runtime of the forward pass (default: pytorch on GPUs, "
                             f"{DEFAULT_CPU_BACKEND} on CPUs; onnxruntime runs the artifact's "
                             "model.onnx, exported at start when absent)")
    _monitoring_arguments(parser)


def _monitoring_arguments(parser: argparse.ArgumentParser) -> None:
    from kubeseg.monitoring.defaults import DEFAULT_WINDOW_IMAGES

    group = parser.add_argument_group(
        "monitoring", "what /metrics tells of the predictions: pixels per class, confidence, "
                      "image sizes, and drift against the training baseline (docs/monitoring.md)")
    group.add_argument("--no-monitoring", action="store_true",
                       help="count nothing of the predictions (/metrics keeps the request "
                            "metrics)")
    group.add_argument("--drift-window", type=int, default=DEFAULT_WINDOW_IMAGES,
                       metavar="IMAGES", help="recent images the drift gauges cover (default: "
                                              "%(default)s)")
    group.add_argument("--keep-images", metavar="URI", default="",
                       help="keep served images and their predicted masks for labelling "
                            "under this s3:// prefix or folder (four-channel layout plus an "
                            "augmented manifest; default: keep nothing)")
    group.add_argument("--keep-rate", type=float, default=0.0, metavar="SHARE",
                       help="share of images kept at random, in [0, 1] (default: %(default)s)")
    group.add_argument("--keep-low-confidence", type=float, default=None, metavar="SHARE",
                       help="also keep every image with more than this share of low-confidence "
                            "pixels (default: the validation share plus the drift alert's "
                            "excess; 0.5 without a baseline; 1: never)")
    group.add_argument("--keep-budget-mib", type=int, default=1024,
                       help="stop keeping once the prefix holds this much (default: "
                            "%(default)s)")
    group.add_argument("--keep-queue", type=int, default=16, metavar="IMAGES",
                       help="images waiting to be written; more are dropped and counted "
                            "(default: %(default)s)")


def _memory_epilog() -> str:
    """What memory a pod needs for the defaults (kubeseg.serving.defaults derives them)."""
    from kubeseg.serving import defaults

    return textwrap.fill(
        f"Memory: with the defaults a pod needs about {defaults.DEFAULT_POD_MEMORY_MIB} MiB: "
        f"the {defaults.DEFAULT_MEMORY_BUDGET_MIB} MiB budget (one image of the default "
        f"--max-image-pixels answered as a mask, for models of up to "
        f"{defaults.SIZED_FOR_CLASSES} classes) and about {defaults.RUNTIME_MEMORY_MIB} MiB for "
        "Python, torch, the model and one forward pass. The manifests and 'kubeseg deploy' "
        f"request {defaults.SERVING_POD_MEMORY}. A larger --memory-budget-mib needs that much "
        "more memory; an image whose estimate is above the budget is refused with 413.",
        width=79, break_on_hyphens=False)


def _slow_client_arguments(parser: argparse.ArgumentParser) -> None:
    """--header-timeout and --min-body-rate: how slowly a client may send a request."""
    from kubeseg.serving.defaults import DEFAULT_HEADER_TIMEOUT_S, DEFAULT_MIN_BODY_RATE

    parser.add_argument("--header-timeout", type=float, default=DEFAULT_HEADER_TIMEOUT_S,
                        metavar="SECONDS",
                        help="a client whose request line and headers take longer gets 408 "
                             "and is disconnected; also the time a body may take before "
                             "--min-body-rate applies (default: %(default)g)")
    parser.add_argument("--min-body-rate", type=int, default=DEFAULT_MIN_BODY_RATE,
                        metavar="BYTES",
                        help="bytes per second a request body must keep up with on average "
                             "after --header-timeout; a slower client gets 408 and is "
                             "disconnected (default: %(default)s)")


def _export_arguments(parser: argparse.ArgumentParser) -> None:
    from kubeseg.serving.defaults import ONNX_OPSET

    parser.add_argument("model_uri", metavar="MODEL_URI", help="model artifact folder or s3:// "
                        "prefix; model.onnx is added to its current version")
    parser.add_argument("--format", choices=["onnx"], default="onnx",
                        help=f"(default: %(default)s, opset {ONNX_OPSET}, dynamic height/width)")
    parser.add_argument("--check-images", metavar="URI",
                        help="folder or s3:// prefix of images to compare ONNX Runtime with "
                             "PyTorch on (random images are always compared)")
    parser.add_argument("--max-images", type=int, default=4,
                        help="images of --check-images used (default: %(default)s)")


def _quantize_arguments(parser: argparse.ArgumentParser) -> None:
    from kubeseg.serving.defaults import (DEFAULT_CHECK_IMAGES, DEFAULT_MAX_IMAGES,
                                          DEFAULT_MAX_SIDE, DEFAULT_WEIGHT_RANGE,
                                          MIN_INT8_AGREEMENT, WEIGHT_RANGES)

    parser.add_argument("model_uri", metavar="MODEL_URI", help="model artifact folder or s3:// "
                        "prefix; model.int8.onnx and model.int8.json are added to it")
    parser.add_argument("--calibration", required=True, metavar="URI",
                        help="folder or s3:// prefix of training images to calibrate on")
    parser.add_argument("--validation", metavar="DATASET_URI",
                        help="dataset root with validation/ and validation_annotation/ (and "
                             "label_map/): agreement and the mIoU change are measured on all "
                             "its validation images (default: agreement on the calibration "
                             "images)")
    parser.add_argument("--max-images", type=int, default=DEFAULT_MAX_IMAGES,
                        help="calibration images used (default: %(default)s)")
    parser.add_argument("--max-side", type=int, default=None,
                        help="calibration and validation images are scaled down to this "
                             "long side (default: base_size for a model trained with "
                             f"inference_size=base_size, else {DEFAULT_MAX_SIDE})")
    parser.add_argument("--threads", type=int, default=None,
                        help="ONNX Runtime threads (default: its choice)")
    parser.add_argument("--weight-range", choices=WEIGHT_RANGES, default=DEFAULT_WEIGHT_RANGE,
                        help="weight bits (default: %(default)s). portable: 7 bits, except "
                             "depthwise convolutions' 8, exact on every CPU; full: 8 bits, "
                             "closer to float32 but only for CPUs with VNNI or AMX (ONNX "
                             "Runtime's int8 kernels can saturate on x86 CPUs without them) "
                             "and ARM; reduced: 7 bits everywhere")
    parser.add_argument("--float-layers", default="auto", metavar="N|auto",
                        help="keep the first N convolutions (and everything before them) in "
                             "float32, where int8 rounding hurts most; auto: the fewest that "
                             "reach --min-agreement on --check-images (default: %(default)s)")
    parser.add_argument("--min-agreement", type=float, default=MIN_INT8_AGREEMENT,
                        metavar="FRACTION",
                        help="argmax agreement with float32 that --float-layers auto aims at "
                             "(default: %(default)s; serving's --precision auto takes int8 "
                             f"only at or above {MIN_INT8_AGREEMENT})")
    parser.add_argument("--check-images", type=int, default=DEFAULT_CHECK_IMAGES,
                        help="training images besides the calibration ones that --float-layers "
                             "auto measures agreement on (default: %(default)s)")


def _float_layers(value: str):
    """--float-layers: None for "auto", else a count >= 0 (ConfigError otherwise)."""
    from kubeseg.errors import ConfigError

    if value == "auto":
        return None
    if not value.isdigit():
        raise ConfigError([f"--float-layers={value}: give a number of convolutions >= 0, "
                           "or auto"], what="option")
    return int(value)


def _run_export(args: argparse.Namespace) -> int:
    from kubeseg.errors import ConfigError
    from kubeseg.serving.onnx_model import ONNX_FILE, export_artifact

    if args.max_images < 1:
        raise ConfigError([f"--max-images={args.max_images}: must be >= 1"], what="option")
    result = export_artifact(args.model_uri, check_images=args.check_images,
                             max_images=args.max_images)
    print(f"wrote {result.folder}/{ONNX_FILE} (opset {result.opset})")
    for label, check in (("random", result.random), ("real", result.real)):
        if check is not None:
            print(f"{label} images ({check.images}): max abs logit difference "
                  f"{check.max_abs_logit_difference:.2e}, argmax agreement "
                  f"{100 * check.argmax_agreement:.4f}%")
    return 0


def _run_quantize(args: argparse.Namespace) -> int:
    from kubeseg.errors import ConfigError
    from kubeseg.serving.onnx_model import INT8_FILE, describe_int8, quantize_artifact

    problems = [f"--{name.replace('_', '-')}={getattr(args, name)}: must be >= {low}"
                for name, low in (("max_images", 1), ("max_side", 32), ("check_images", 1))
                if getattr(args, name) is not None and getattr(args, name) < low]
    if not 0 < args.min_agreement <= 1:
        problems.append(f"--min-agreement={args.min_agreement}: a fraction in (0, 1], e.g. 0.99")
    if problems:
        raise ConfigError(problems, what="option")
    result = quantize_artifact(args.model_uri, args.calibration, validation=args.validation,
                               max_images=args.max_images, max_side=args.max_side,
                               threads=args.threads, weight_range=args.weight_range,
                               float_layers=_float_layers(args.float_layers),
                               min_agreement=args.min_agreement,
                               check_images=args.check_images)
    print(f"wrote {result.folder}/{INT8_FILE}")
    print(describe_int8(result.report))
    return 0


def run(args: argparse.Namespace) -> int:
    if args.verb == "export":
        return _run_export(args)
    if args.verb == "quantize":
        return _run_quantize(args)
    from kubeseg.errors import ConfigError
    from kubeseg.serving.server import serve

    problems = []
    for name in ("max_request_bytes", "max_pixels", "max_image_pixels", "max_batch_size",
                 "max_images_per_request", "memory_budget_mib"):
        if getattr(args, name) < 1:
            problems.append(f"--{name.replace('_', '-')}={getattr(args, name)}: must be >= 1")
    if args.max_queued_requests < 0:
        problems.append(f"--max-queued-requests={args.max_queued_requests}: must be >= 0")
    if not args.header_timeout > 0:
        problems.append(f"--header-timeout={args.header_timeout}: must be > 0 seconds")
    if args.min_body_rate < 1:
        problems.append(f"--min-body-rate={args.min_body_rate}: must be >= 1 byte/s")
    if not 0 <= args.port <= 65535:
        problems.append(f"--port={args.port}: must be in [0, 65535]")
    settings = _server_settings(args)
    problems += settings.monitoring.problems()
    if problems:
        raise ConfigError(problems, what="option")
    serve(args.model_uri, settings)
    return 0


def _server_settings(args: argparse.Namespace):
    from kubeseg.serving.admission import ServerLimits
    from kubeseg.serving.keep import KeepSettings
    from kubeseg.serving.monitor import MonitoringSettings
    from kubeseg.serving.predictor import Runtime
    from kubeseg.serving.server import ServerSettings

    limits = ServerLimits(max_request_bytes=args.max_request_bytes,
                          max_image_pixels=args.max_image_pixels,
                          max_batch_size=args.max_batch_size, workers=args.workers,
                          memory_budget_mib=args.memory_budget_mib,
                          max_queued_requests=args.max_queued_requests,
                          max_images_per_request=args.max_images_per_request,
                          header_timeout_s=args.header_timeout,
                          min_body_rate=args.min_body_rate)
    runtime = Runtime(device=args.device, precision=args.precision, backend=args.backend,
                      threads=args.threads)
    return ServerSettings(host=args.host, port=args.port, model_name=args.model_name,
                          max_pixels=args.max_pixels, tile_size=args.tile_size or None,
                          runtime=runtime, limits=limits,
                          monitoring=MonitoringSettings(
                              enabled=not args.no_monitoring, window_images=args.drift_window,
                              keep=KeepSettings(uri=args.keep_images, rate=args.keep_rate,
                                                low_confidence=args.keep_low_confidence,
                                                budget_mib=args.keep_budget_mib,
                                                queue=args.keep_queue)))
