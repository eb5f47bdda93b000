"""Training-step throughput: kubeseg's shipped step vs torchvision's own models, plain step.

Baseline: torchvision's ``fcn_resnet50`` / ``deeplabv3_resnet50`` (aux head on, random weights)
trained with a plain float32 step (forward, cross entropy + 0.5 x auxiliary loss, backward,
SGD step). Ours: ``kubeseg.models.build_model`` with the same algorithm and backbone, trained
by the engine's own :func:`kubeseg.engine.step.train_step` on the parts
:func:`kubeseg.engine.step.build_parts` builds from the hyperparameters (``--precision``,
channels-last as the hyperparameter's default or ``--no-channels-last``, ``--compile``),
with the same SGD settings (momentum 0.9, weight decay 1e-4) and the same loss. Both get the
same batch (random square crops of CamVid training images).

Each measurement runs in its own process, so peak memory is that model's alone: peak CUDA memory
allocated on a GPU, peak resident set size (RSS) of the process on CPU. Printed beside the ratio:
the CPU's capabilities, each step's FLOPs per image (forward and backward, counted by
torch.utils.flop_counter over one whole step), the calibrated convolution limit of this machine
(bench/roofline.py) and the fraction of it each side reaches.

Several of our configurations can be measured against one baseline with ``--configs``: a comma
list, each entry a precision (float32, bfloat16, float16) joined by ``+`` to any of
``contiguous`` (instead of channels-last), ``compile`` and ``no-autotune`` (cuDNN's heuristics
instead of timing its algorithms, which the engine does on CUDA). ``--baseline-precision
float16`` gives the baseline the mixed precision of torchvision's reference script (``--amp``:
float16 autocast and a gradient scaler).

    python bench/train_step.py                 # CPU, float32, batch 2, crop 128
    python bench/train_step.py --precision bfloat16 --algorithms fcn
    python bench/train_step.py --repeat 3      # medians of three runs
    python bench/train_step.py --device cuda --batch 16 --crop 480 --compile
    python bench/train_step.py --device cuda --configs float32,float32+contiguous,bfloat16
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CAMVID = REPO.parent / "shared" / "datasets" / "camvid"
NUM_CLASSES = 11
TORCHVISION_BUILDERS = {"fcn": "fcn_resnet50", "deeplab": "deeplabv3_resnet50"}
LR, MOMENTUM, WEIGHT_DECAY, AUX_WEIGHT = 0.01, 0.9, 1e-4, 0.5


def load_batch(batch: int, crop: int, seed: int = 0):
    """``batch`` random ``crop`` x ``crop`` crops of CamVid training images (+ their masks)."""
    import numpy as np
    import torch
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = sorted((CAMVID / "train").glob("*.jpg"))
    if not images:
        raise SystemExit(f"no CamVid images under {CAMVID}/train: the benchmark reads "
                         "../shared/datasets/camvid")
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    xs, ys = [], []
    for _ in range(batch):
        path = images[int(rng.integers(len(images)))]
        img = Image.open(path).convert("RGB")
        mask = Image.open(CAMVID / "train_annotation" / (path.stem + ".png"))
        scale = max(crop / min(img.size), 1.0)
        if scale > 1:
            size = (int(img.width * scale) + 1, int(img.height * scale) + 1)
            img, mask = img.resize(size, Image.BILINEAR), mask.resize(size, Image.NEAREST)
        left = int(rng.integers(img.width - crop + 1))
        top = int(rng.integers(img.height - crop + 1))
        box = (left, top, left + crop, top + crop)
        x = torch.from_numpy(np.asarray(img.crop(box), dtype=np.float32) / 255).permute(2, 0, 1)
        xs.append((x - mean) / std)
        y = torch.from_numpy(np.asarray(mask.crop(box), dtype=np.int64).copy())
        y[y >= NUM_CLASSES] = 255
        ys.append(y)
    return torch.stack(xs), torch.stack(ys)


def our_step(args, device, x, y):
    """The engine's step on the parts it builds from the hyperparameters; (step, eager step)."""
    from kubeseg.config import Hyperparameters
    from kubeseg.engine.step import build_parts, train_step
    from kubeseg.models import build_model

    hp = Hyperparameters.from_dict({
        "algorithm": args.algorithm, "backbone": "resnet-50", "num_classes": NUM_CLASSES,
        "num_training_samples": args.batch, "mini_batch_size": args.batch,
        "use_pretrained_model": False, "optimizer": "sgd", "learning_rate": LR,
        "momentum": MOMENTUM, "weight_decay": WEIGHT_DECAY, "aux_loss_weight": AUX_WEIGHT,
        "precision_dtype": args.precision, "compile": args.compile,
        **({"channels_last": args.channels_last} if args.channels_last is not None else {})})
    model = build_model(algorithm=hp.algorithm, backbone=hp.backbone,
                        num_classes=hp.num_classes, aux_loss=True)
    # a schedule far longer than the run, so every timed step runs at a non-zero rate
    parts = build_parts(model, hp, device, iters_per_epoch=10 * (args.warmup + args.steps + 2))
    parts.autotune_convolutions &= args.autotune

    def eager_step():  # FLOPs are counted on the model itself, not on compiled code
        compiled, parts.net = parts.net, parts.model
        try:
            return train_step(parts, x, y)
        finally:
            parts.net = compiled

    return (lambda: train_step(parts, x, y)), eager_step


def torchvision_step(args, device, x, y):
    """torchvision's model and a plain step: float32, or with ``--baseline-precision float16``
    the reference script's ``--amp`` (float16 autocast, gradient scaler); (step, the same)."""
    import torch
    import torchvision

    builder = getattr(torchvision.models.segmentation, TORCHVISION_BUILDERS[args.algorithm])
    model = builder(weights=None, weights_backbone=None, num_classes=NUM_CLASSES,
                    aux_loss=True).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM,
                                weight_decay=WEIGHT_DECAY)
    criterion = torch.nn.CrossEntropyLoss(ignore_index=255)
    amp = args.precision == "float16" and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)

    def step():
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp):
            out = model(x)
            loss = criterion(out["out"], y) + AUX_WEIGHT * criterion(out["aux"], y)
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return loss.detach()

    return step, step


def step_flops(step) -> float:
    """FLOPs of one whole step (forward and backward), counted by torch.utils.flop_counter."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return float(counter.get_total_flops())


def measure(args) -> dict:
    """One configuration, in this process: samples/s, FLOPs per image and peak memory."""
    import torch

    torch.manual_seed(0)
    device = torch.device(args.device)
    x, y = load_batch(args.batch, args.crop)
    x, y = x.to(device), y.to(device)
    build = our_step if args.variant == "ours" else torchvision_step
    step, eager_step = build(args, device, x, y)
    flops = step_flops(eager_step) / args.batch

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    sync()
    elapsed = time.perf_counter() - start
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"samples_per_s": args.batch * args.steps / elapsed, "peak_mb": peak_mb,
            "flops_per_image": flops, "loss": float(loss)}


@dataclass(frozen=True)
class Config:
    """One configuration of our step (an entry of ``--configs``)."""

    precision: str = "float32"
    channels_last: Optional[bool] = None  # None: the hyperparameter's default
    compile: bool = False
    autotune: bool = True

    @classmethod
    def parse(cls, text: str) -> "Config":
        words = [w.strip() for w in text.split("+") if w.strip()]
        precisions = [w for w in words if w in PRECISIONS]
        unknown = [w for w in words if w not in PRECISIONS + CONFIG_WORDS]
        if len(precisions) != 1 or unknown:
            raise SystemExit(f"--configs entry {text!r}: one of {', '.join(PRECISIONS)}, joined "
                             f"by '+' to any of {', '.join(CONFIG_WORDS)}")
        layout = (True if "channels-last" in words else False if "contiguous" in words
                  else None)
        return cls(precisions[0], layout, "compile" in words, "no-autotune" not in words)

    def flags(self) -> list:
        out = ["--precision", self.precision] + (["--compile"] if self.compile else [])
        if self.channels_last is not None:
            out.append("--channels-last" if self.channels_last else "--no-channels-last")
        return out + ([] if self.autotune else ["--no-autotune"])

    def label(self) -> str:
        words = [self.precision]
        if self.channels_last is not None:
            words.append("channels-last" if self.channels_last else "contiguous")
        words += (["compile"] if self.compile else []) + ([] if self.autotune else
                                                          ["no-autotune"])
        return "+".join(words)


PRECISIONS = ("float32", "bfloat16", "float16")
CONFIG_WORDS = ("channels-last", "contiguous", "compile", "no-autotune")


def child_result(cmd: list, what: str) -> dict:
    """Run ``cmd`` (a benchmark's own child process, with the repository importable) and return
    the JSON object on the last line it prints; its stderr's tail if it fails."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_child(args, variant: str, algorithm: str, flags: list) -> dict:
    cmd = [sys.executable, __file__, "--child", "--variant", variant, "--algorithm", algorithm,
           "--device", args.device, "--batch", str(args.batch), "--crop", str(args.crop),
           "--warmup", str(args.warmup), "--steps", str(args.steps), *flags]
    return child_result(cmd, f"{variant} {algorithm} {' '.join(flags)}")


def compare(args, algorithm: str, configs: list, limits: list, memory: str) -> list:
    """One run of torchvision's step, then ours in each configuration, each in its own
    process; printed with each side's fraction of ``limits`` (baseline first, then per config).
    Returns [baseline, ours per config]."""
    from bench import roofline

    base = run_child(args, "torchvision", algorithm, ["--precision", args.baseline_precision])
    sides = [base] + [run_child(args, "ours", algorithm, config.flags()) for config in configs]
    print(f"{algorithm}_resnet50: {base['flops_per_image'] / 1e9:.2f} (torchvision) / "
          f"{sides[1]['flops_per_image'] / 1e9:.2f} (kubeseg) GFLOPs per image per step "
          "(forward + backward)")
    labels = [f"  torchvision {args.baseline_precision}"] + [
        f"  kubeseg {config.label()}" for config in configs]
    for label, side, limit in zip(labels, sides, limits):
        print(roofline.report_line(label, side["flops_per_image"], side["samples_per_s"],
                                   limit) + f"; {side['samples_per_s']:.2f} samples/s, "
              f"{memory} {side['peak_mb']:.0f} MiB")
    for config, ours in zip(configs, sides[1:]):
        print(f"  ratio kubeseg {config.label()} / torchvision {args.baseline_precision}: "
              f"{ours['samples_per_s'] / base['samples_per_s']:.2f}x samples/s, memory "
              f"{ours['peak_mb'] / base['peak_mb']:.2f}x", flush=True)
    return sides


def print_medians(algorithm: str, configs: list, runs: list, limits: list) -> None:
    """Medians over the runs: each side's samples/s and fraction, and the per-run ratios."""
    from statistics import median

    from bench import roofline

    print(f"{algorithm}_resnet50, median of {len(runs)} runs:")
    labels = ["torchvision"] + [f"kubeseg {config.label()}" for config in configs]
    for i, label in enumerate(labels):
        rate = median(run[i]["samples_per_s"] for run in runs)
        fraction = roofline.fraction(runs[0][i]["flops_per_image"], rate, limits[i])
        print(f"  {label}: {rate:.2f} samples/s, {100 * fraction:.0f}% of the calibrated limit")
    for i, config in enumerate(configs, start=1):
        ratios = [run[i]["samples_per_s"] / run[0]["samples_per_s"] for run in runs]
        print(f"  ratio kubeseg {config.label()} / torchvision: {median(ratios):.2f}x samples/s "
              "(runs: " + ", ".join(f"{r:.2f}x" for r in ratios) + ")")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    parser.add_argument("--algorithms", default="fcn,deeplab", help="comma list of fcn,deeplab")
    parser.add_argument("--batch", type=int, default=None,
                        help="batch size (default: 2 on CPU, 16 on CUDA)")
    parser.add_argument("--crop", type=int, default=None,
                        help="square crop side (default: 128 on CPU, 480 on CUDA)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps first (default: 1 on CPU, 10 on CUDA)")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps (default: 4 on CPU, 30 on CUDA)")
    parser.add_argument("--precision", default="float32", choices=PRECISIONS,
                        help="our step's precision_dtype (default: float32)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                        help="our channels_last (default: the hyperparameter's default)")
    parser.add_argument("--compile", action="store_true", help="our compile=True")
    parser.add_argument("--autotune", action=argparse.BooleanOptionalAction, default=True,
                        help="cuDNN times its algorithms in our step on CUDA, as the engine "
                             "does (default: on)")
    parser.add_argument("--configs", metavar="LIST",
                        help="several of our configurations against one baseline, e.g. "
                             "float32,float32+contiguous,bfloat16+compile (instead of "
                             "--precision, --channels-last, --compile, --no-autotune)")
    parser.add_argument("--baseline-precision", default="float32", choices=("float32", "float16"),
                        help="float16: the baseline with torchvision's --amp (CUDA only; "
                             "default float32)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs of each comparison (a fresh process per side and run); "
                             "with more than one, the medians are printed (default 1)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=("ours", "torchvision"), help=argparse.SUPPRESS)
    parser.add_argument("--algorithm", choices=tuple(TORCHVISION_BUILDERS),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device is None:
        from kubeseg.device import resolve_device

        args.device = str(resolve_device(None))
    gpu = args.device.startswith("cuda")
    args.batch = args.batch or (16 if gpu else 2)
    args.crop = args.crop or (480 if gpu else 128)
    args.warmup = args.warmup if args.warmup is not None else (10 if gpu else 1)
    args.steps = args.steps or (30 if gpu else 4)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(measure(args)))
        return 0
    from bench import roofline
    from kubeseg.config import Hyperparameters

    gpu = args.device.startswith("cuda")
    if args.baseline_precision == "float16" and not gpu:
        raise SystemExit("--baseline-precision float16 needs --device cuda")
    if args.configs:
        configs = [Config.parse(entry) for entry in args.configs.split(",") if entry.strip()]
    else:
        configs = [Config(args.precision, args.channels_last, args.compile, args.autotune)]
    # each side's limit in the precision it computes in (float16 on a CPU runs in float32)
    precisions = [args.baseline_precision] + [config.precision for config in configs]
    by_precision = roofline.calibrate_limits(args.device, precisions)
    limits = [by_precision[p] for p in precisions]
    print(roofline.describe(roofline.cpu_capabilities(), by_precision["float32"],
                            device=args.device))
    extra = roofline.describe_limits(by_precision, args.device)
    if extra:
        print(extra)
    print(f"device {args.device}, batch {args.batch}, crop {args.crop}, {args.warmup} warm-up + "
          f"{args.steps} timed steps; ours: kubeseg.engine.step.train_step (channels-last "
          f"unless said: {Hyperparameters.channels_last}); baseline: torchvision "
          f"{args.baseline_precision}, plain step")
    memory = "peak CUDA memory" if gpu else "peak RSS"
    for algorithm in args.algorithms.split(","):
        runs = [compare(args, algorithm, configs, limits, memory)
                for _ in range(max(1, args.repeat))]
        if len(runs) > 1:
            print_medians(algorithm, configs, runs, limits)
    return 0


if __name__ == "__main__":
    sys.exit(main())
