"""Training on a CPU with dilated depthwise convolutions: phase-split (ours) vs plain dilated.

Past output stride 16, EfficientNet-Lite0, MobileNetV3 and ConvNeXt dilate their depthwise
convolutions, and PyTorch's CPU backward pass of a dilated depthwise convolution is several
times slower than of an undilated one. On a CPU, ``kubeseg.engine.step.build_parts`` switches
those layers to :mod:`kubeseg.models.phase_split` (the same convolution, undilated, on the
input's phase grids stacked along the batch axis).

Baseline ("plain"): the same parts with those layers switched back to ``nn.Conv2d``, i.e.
PyTorch's own dilated convolution. Both sides run the engine's ``train_step`` from the same
seed on the same batch (random crops of CamVid training images), each in its own process (so
peak resident memory is that side's alone), in alternating order over ``--repeat`` runs.
Printed: samples/s and peak RSS of each side, the ratio, and the loss after the timed steps
(the two agree to float rounding).

    python bench/phase_split.py                              # lraspp / efficientnet-lite0
    python bench/phase_split.py --backbones efficientnet-lite0,mobilenet-v3-large --repeat 3
    python bench/phase_split.py --algorithm deeplabv3plus --crop 256 --batch 4
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path
from statistics import median

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.train_step import NUM_CLASSES, child_result, load_batch  # noqa: E402
from bench.serve import round_order  # noqa: E402

SIDES = ("plain", "phase-split")


def measure(args) -> dict:
    """One side, in this process: samples/s, peak RSS and the last loss."""
    import torch
    from torch import nn

    from kubeseg.config import Hyperparameters
    from kubeseg.engine.step import build_parts, train_step
    from kubeseg.models import build_model
    from kubeseg.models.phase_split import PhaseSplitConv2d

    torch.manual_seed(0)
    hp = Hyperparameters.from_dict({
        "algorithm": args.algorithm, "backbone": args.backbone, "output_stride": 16,
        "num_classes": NUM_CLASSES, "num_training_samples": args.batch,
        "mini_batch_size": args.batch, "use_pretrained_model": False, "optimizer": "adam",
        "learning_rate": 0.001, "aux_loss_weight": 0.4})
    model = build_model(algorithm=hp.algorithm, backbone=hp.backbone, num_classes=NUM_CLASSES,
                        aux_loss=True, output_stride=16)
    parts = build_parts(model, hp, torch.device("cpu"),
                        iters_per_epoch=10 * (args.warmup + args.steps))
    split = [m for m in model.modules() if isinstance(m, PhaseSplitConv2d)]
    if args.side == "plain":
        for module in split:
            module.__class__ = nn.Conv2d
    x, y = load_batch(args.batch, args.crop)
    for _ in range(args.warmup):
        train_step(parts, x, y)
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = train_step(parts, x, y)
    elapsed = time.perf_counter() - start
    return {"samples_per_s": args.batch * args.steps / elapsed, "loss": float(loss),
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "layers": len(split)}


def run_side(args, backbone: str, side: str) -> dict:
    cmd = [sys.executable, __file__, "--child", "--side", side, "--backbone", backbone,
           "--algorithm", args.algorithm, "--batch", str(args.batch), "--crop", str(args.crop),
           "--warmup", str(args.warmup), "--steps", str(args.steps)]
    return child_result(cmd, f"{side} {backbone}")


def compare(args, backbone: str) -> None:
    runs = []
    for index in range(args.repeat):
        results = {side: run_side(args, backbone, side) for side in round_order(SIDES, index)}
        runs.append(results)
        plain, ours = results["plain"], results["phase-split"]
        print(f"run {index + 1}: plain {plain['samples_per_s']:.2f} samples/s, phase-split "
              f"{ours['samples_per_s']:.2f} ({ours['samples_per_s'] / plain['samples_per_s']:.2f}"
              f"x); loss {plain['loss']:.5f} / {ours['loss']:.5f}", flush=True)
    layers = runs[0]["phase-split"]["layers"]
    print(f"{args.algorithm}/{backbone}/16, crop {args.crop}, batch {args.batch}, "
          f"{layers} dilated depthwise layers split; median of {len(runs)} run(s):")
    for side in SIDES:
        rate = median(run[side]["samples_per_s"] for run in runs)
        memory = median(run[side]["peak_mb"] for run in runs)
        print(f"  {side}: {rate:.2f} samples/s, peak RSS {memory:.0f} MiB")
    ratios = [run["phase-split"]["samples_per_s"] / run["plain"]["samples_per_s"]
              for run in runs]
    memory = [run["phase-split"]["peak_mb"] / run["plain"]["peak_mb"] for run in runs]
    print(f"  ratio phase-split / plain: {median(ratios):.2f}x samples/s (runs: "
          + ", ".join(f"{r:.2f}x" for r in ratios) + f"), peak RSS {median(memory):.2f}x")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--backbones", default="efficientnet-lite0",
                        help="comma list of backbones with depthwise convolutions "
                             "(efficientnet-lite0, mobilenet-v3-large, convnext-tiny)")
    parser.add_argument("--algorithm", default="lraspp",
                        help="decoder (default: lraspp, cpu-fast's and cpu-pretrained's)")
    parser.add_argument("--batch", type=int, default=8, help="images a step (default: 8)")
    parser.add_argument("--crop", type=int, default=320,
                        help="square crop side (default: 320, cpu-pretrained's)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps (default: 1)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (default: 3)")
    parser.add_argument("--repeat", type=int, default=1, help="runs of both sides (default: 1)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--backbone", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(measure(args)))
        return 0
    from bench.roofline import cpu_capabilities, describe

    print(describe(cpu_capabilities()), flush=True)
    for backbone in args.backbones.split(","):
        compare(args, backbone.strip())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
