"""``kubeseg serve``: serve a model artifact over HTTP (SageMaker-style and Open Inference v2)."""
from __future__ import annotations

import argparse


def add_image_size_arguments(parser: argparse.ArgumentParser, *, too_large: str) -> None:
    """How image size is handled when scoring, the same for the server and batch prediction:
    ``too_large`` says what happens to images above --max-image-pixels."""
    from kubeseg.serving.predictor import (DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_MAX_PIXELS,
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
    from kubeseg.serving.predictor import PRECISIONS
    from kubeseg.serving.server import (DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_IMAGES_PER_REQUEST,
                                        DEFAULT_MAX_QUEUED_REQUESTS, DEFAULT_MAX_REQUEST_BYTES,
                                        DEFAULT_MEMORY_BUDGET_MIB)

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
                             "up to this many (default: %(default)s)")
    parser.add_argument("--max-images-per-request", type=int,
                        default=DEFAULT_MAX_IMAGES_PER_REQUEST,
                        help="v2 requests with more images get 413 (default: %(default)s)")
    parser.add_argument("--memory-budget-mib", type=int, default=DEFAULT_MEMORY_BUDGET_MIB,
                        help="memory for the images in flight (decoded pictures, logits, masks, "
                             "probabilities); requests above it wait (default: %(default)s, "
                             "for a 2 GiB pod)")
    parser.add_argument("--max-queued-requests", type=int, default=DEFAULT_MAX_QUEUED_REQUESTS,
                        help="requests waiting for memory beyond this many get 503 with "
                             "Retry-After (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=None,
                        help="threads decoding and encoding requests (default: CPUs + 4, "
                             "at most 32); forward passes run on one thread of their own")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--device", default=None,
                        help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--precision", choices=PRECISIONS, default="float32",
                        help="compute precision of the forward pass (default: %(default)s; "
                             "bfloat16 is faster on CPUs with AVX512-BF16/AMX, float16 on GPUs)")


def run(args: argparse.Namespace) -> int:
    from kubeseg.errors import ConfigError
    from kubeseg.serving.server import serve

    problems = []
    for name in ("max_request_bytes", "max_pixels", "max_image_pixels", "max_batch_size",
                 "max_images_per_request", "memory_budget_mib"):
        if getattr(args, name) < 1:
            problems.append(f"--{name.replace('_', '-')}={getattr(args, name)}: must be >= 1")
    if args.max_queued_requests < 0:
        problems.append(f"--max-queued-requests={args.max_queued_requests}: must be >= 0")
    if not 0 <= args.port <= 65535:
        problems.append(f"--port={args.port}: must be in [0, 65535]")
    if problems:
        raise ConfigError(problems, what="option")
    serve(args.model_uri, host=args.host, port=args.port, model_name=args.model_name,
          max_request_bytes=args.max_request_bytes, max_pixels=args.max_pixels,
          max_image_pixels=args.max_image_pixels, tile_size=args.tile_size or None,
          max_batch_size=args.max_batch_size, workers=args.workers, device=args.device,
          precision=args.precision, threads=args.threads,
          memory_budget_mib=args.memory_budget_mib, max_queued_requests=args.max_queued_requests,
          max_images_per_request=args.max_images_per_request)
    return 0
