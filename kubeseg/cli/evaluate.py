"""``kubeseg evaluate``: score a model artifact, write the report, apply the quality gate.

The data comes from ``--validation`` and ``--validation-annotation`` (plus ``--label-map``),
``--data-root`` (a folder or prefix holding validation/ and validation_annotation/), or
``--shards`` (an ingested shard set). Outputs go to ``--output``: metrics.json,
confusion_matrix.json/.png, report.md, report.html, overlays/*.png (and, with a gate option,
gate.json: the quality gate is applied after the evaluation).

Exit status: 0 when evaluation succeeded and the gate (if asked for) passed; 3 when the
gate failed (the outputs are still written); 1 on an error.

Examples::

    kubeseg evaluate s3://runs/camvid-1/model --data-root s3://data/camvid \\
        --output s3://runs/camvid-1/eval --min-miou 0.5
    kubeseg evaluate ./run/model --shards s3://data/shards --output ./eval \\
        --previous-metrics s3://runs/champion/eval --max-regression 0.01 --scales 0.75,1,1.25 --flip
"""
from __future__ import annotations

import argparse

from kubeseg.cli.options import (add_channel_arguments, add_device_arguments,
                                 channels_from_args, device_from_args)

GATE_FAILED_EXIT = 3


def add_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    from kubeseg.config import PipelineParameters

    gate = PipelineParameters.specs()
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (f"Exit status {GATE_FAILED_EXIT} means the quality gate failed (outputs "
                     "are written all the same); 1 means an error.")
    parser.add_argument("model", metavar="MODEL_URI",
                        help="model artifact folder or s3:// prefix (as written by train)")
    add_channel_arguments(parser, shards=True)
    data = parser.add_argument_group("what to score")
    data.add_argument("--split", default="validation", choices=("validation", "train"),
                      help="which split to score (default: validation)")
    inf = parser.add_argument_group("inference")
    inf.add_argument("--tile-size", type=int, default=1024, metavar="PX",
                     help="images with a longer side are scored with a sliding window of this "
                          "size; 0 = always whole images (default: 1024)")
    inf.add_argument("--tile-overlap", type=float, default=1 / 3, metavar="F",
                     help="overlap of neighbouring tiles, [0, 1) (default: 0.333)")
    inf.add_argument("--scales", default="1", metavar="S1,S2,...",
                     help="test-time scales whose logits are averaged, e.g. 0.75,1,1.25: "
                          "multiples of each image's own size, or of base_size for a model "
                          "trained with inference_size=base_size (default: 1)")
    inf.add_argument("--flip", action="store_true",
                     help="also average the horizontally flipped prediction")
    add_device_arguments(inf, workers=2, workers_help="data-loading processes")
    out = parser.add_argument_group("output and quality gate")
    out.add_argument("--output", metavar="URI", required=True,
                     help="folder/prefix for metrics.json, confusion matrix, report, overlays")
    out.add_argument("--overlays", type=int, default=4, metavar="N",
                     help="sample pictures (image | ground truth | prediction) (default: 4)")
    out.add_argument("--min-miou", type=float, metavar="F",
                     help="gate: the mIoU must be at least F, allowed "
                          f"{gate['min_miou'].describe()}")
    out.add_argument("--previous-metrics", metavar="URI",
                     help="gate: the champion's metrics (metrics.json, an evaluation output "
                          "folder, or a model artifact); the new mIoU must not be worse by more "
                          "than --max-regression")
    out.add_argument("--max-regression", type=float, default=0.0, metavar="F",
                     help=f"gate: allowed mIoU drop against --previous-metrics, absolute "
                          f"(0.01 = one point), allowed {gate['max_regression'].describe()} "
                          "(default: 0)")


def parse_scales(text: str):
    from kubeseg.errors import ConfigError

    try:
        scales = tuple(float(s) for s in str(text).split(",") if s.strip())
    except ValueError:
        raise ConfigError([f"--scales {text!r}: expected comma-separated numbers, e.g. "
                           "0.75,1,1.25"]) from None
    if not scales or any(not s > 0 for s in scales):
        raise ConfigError([f"--scales {text!r}: every scale must be a number > 0"])
    return scales


def run(args: argparse.Namespace) -> int:
    from kubeseg.engine.evaluate import EvalOptions, Scoring, evaluate
    from kubeseg.engine.gate import apply_gate, check_gate_options, read_metrics

    scoring = Scoring(tile_size=args.tile_size or None, tile_overlap=args.tile_overlap,
                      scales=parse_scales(args.scales), flip=args.flip)
    gated = args.min_miou is not None or args.previous_metrics is not None
    if gated:
        check_gate_options(args.min_miou or 0.0, args.max_regression)
    channels = channels_from_args(args, need=(args.split,))
    previous = read_metrics(args.previous_metrics) if args.previous_metrics else None
    result = evaluate(
        args.model, channels, args.output, split=args.split, scoring=scoring,
        device=device_from_args(args),
        options=EvalOptions(num_overlays=args.overlays, workers=args.workers))
    metrics = {key: "n/a" if value is None else f"{value:.4f}"  # None: undefined (no pixels)
               for key, value in result.metrics.items() if key in ("mIOU", "pixel_accuracy")}
    print(f"mIoU {metrics['mIOU']}  pixel accuracy {metrics['pixel_accuracy']}  "
          f"({result.metrics['images']} images); report: {args.output}")
    if not gated:
        return 0
    gate = apply_gate(result, min_miou=args.min_miou or 0.0, previous_metrics=previous,
                      max_regression=args.max_regression)
    print(f"quality gate: {gate.reason}")
    return 0 if gate.passed else GATE_FAILED_EXIT
