"""``kubeseg predict``: batch prediction over a prefix, a folder or a manifest.

Examples::

    kubeseg predict s3://runs/camvid-1/model --input s3://data/new-images \\
        --output s3://predictions/camvid-1
    kubeseg predict ./run/model --input ./photos --output ./masks \\
        --accept application/x-recordio-protobuf
    kubeseg predict ./run/model --manifest --input s3://data/batch.manifest --output ./masks
"""
from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    from kubeseg.cli.serve import add_image_size_arguments
    from kubeseg.serving.defaults import DEFAULT_BATCH_SIZE, PRECISIONS, SUMMARY_FILE

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "Each input KEY.jpg|.jpeg|.png gets OUTPUT/KEY.png (mask), .recordio (probabilities)\n"
        "or .json, the same bytes POST /invocations answers with that Accept. Outputs that\n"
        "exist are skipped (a rerun finishes an interrupted run); an unreadable image is\n"
        f"reported and skipped. The summary goes to OUTPUT/{SUMMARY_FILE}.")
    parser.add_argument("model_uri", metavar="MODEL_URI",
                        help="model artifact folder or s3:// prefix (written by kubeseg train)")
    parser.add_argument("--input", required=True, metavar="URI",
                        help="prefix or folder of images (or, with --manifest, a manifest file)")
    parser.add_argument("--output", required=True, metavar="URI",
                        help="prefix or folder receiving one output per image")
    parser.add_argument("--accept", default="image/png",
                        help="image/png (class-id mask, default), "
                             "application/x-recordio-protobuf (probabilities) or "
                             "application/json (add ';output=probabilities' for those)")
    parser.add_argument("--manifest", action="store_true",
                        help="--input is a manifest: a JSON list [{\"prefix\": URI}, \"key\", "
                             "...] or JSON Lines with source-ref")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                        help="same-size images scored together, at most; on a CPU a batch "
                             "also holds at most 512x512 pixels in all, which is faster there "
                             "(default: %(default)s)")
    parser.add_argument("--workers", type=int, default=None,
                        help="images in flight: reading, decoding, encoding, writing "
                             "(default: twice the batch size)")
    parser.add_argument("--device", default=None,
                        help="cpu, cuda, cuda:1 ... (default: cuda when available; cpu with "
                             "--precision int8)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch or ONNX Runtime intra-op threads (default: their choice)")
    parser.add_argument("--precision", choices=PRECISIONS, default="float32",
                        help="compute precision of the forward pass (default: %(default)s). "
                             "int8: the artifact's int8 model (kubeseg quantize) on ONNX "
                             "Runtime, on the CPU; auto: int8 on a CPU when its recorded "
                             "argmax agreement is >= 99%%, else native bfloat16, else float32")
    add_image_size_arguments(parser, too_large="are reported and skipped")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from kubeseg.serving.batch import BatchOptions, batch_predict
    from kubeseg.errors import ConfigError

    problems = [f"--{name.replace('_', '-')}={getattr(args, name)}: must be >= 1"
                for name in ("batch_size", "max_pixels", "max_image_pixels")
                if getattr(args, name) < 1]
    if args.workers is not None and args.workers < 1:
        problems.append(f"--workers={args.workers}: must be >= 1")
    device = args.device
    if args.precision == "int8":
        if device in (None, "", "auto"):
            device = "cpu"  # the int8 model runs on ONNX Runtime's CPU provider only
        elif not device.startswith("cpu"):
            problems.append(f"--precision int8 runs the artifact's int8 model on ONNX Runtime, "
                            f"on the CPU: use --device cpu (or leave --device out), not "
                            f"--device {device}")
    if problems:
        raise ConfigError(problems, what="option")
    options = BatchOptions(workers=args.workers, device=device, max_pixels=args.max_pixels,
                           tile_size=args.tile_size or None,
                           max_image_pixels=args.max_image_pixels, precision=args.precision,
                           threads=args.threads, progress=not args.no_progress)
    summary = batch_predict(
        args.model_uri, args.input, args.output, accept=args.accept, manifest=args.manifest,
        batch_size=args.batch_size, options=options)
    print(json.dumps(summary, indent=2))
    return 0
