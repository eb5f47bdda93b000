"""Training-step throughput and peak memory: kubeseg's step vs torchvision's own models.

Baseline: torchvision's ``fcn_resnet50`` / ``deeplabv3_resnet50`` (aux head on, random weights)
trained with a plain float32 step. Ours: ``kubeseg.models.build_model`` with the same algorithm
and backbone, trained with the step ``kubeseg train`` uses: autocast at ``--precision`` (default
bfloat16: on CUDA, and on CPUs with AVX512-BF16/AMX), channels-last memory format on CUDA, and
optionally ``torch.compile``. Both get the same batch (random square crops of CamVid training
images), the same SGD optimizer (momentum 0.9, weight decay 1e-4) and the same loss (cross
entropy + 0.5 x auxiliary loss).

Each measurement runs in its own process, so peak memory is that model's alone: peak CUDA memory
allocated on a GPU, peak resident set size (RSS) of the process on CPU.

    /tmp/venv/bin/python bench/train_step.py                 # CPU, batch 2, crop 128
    python bench/train_step.py --device cuda --batch 16 --crop 480 --compile
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CAMVID = REPO.parent / "shared" / "datasets" / "camvid"
NUM_CLASSES = 11
TORCHVISION_BUILDERS = {"fcn": "fcn_resnet50", "deeplab": "deeplabv3_resnet50"}


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
    for i in range(batch):
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


def measure(args) -> dict:
    """One configuration, in this process: samples/s and peak memory."""
    import torch

    torch.manual_seed(0)
    device = torch.device(args.device)
    ours = args.variant == "ours"
    if ours:
        from kubeseg.models import build_model

        model = build_model(algorithm=args.algorithm, backbone="resnet-50",
                            num_classes=NUM_CLASSES)
    else:
        import torchvision

        builder = getattr(torchvision.models.segmentation, TORCHVISION_BUILDERS[args.algorithm])
        model = builder(weights=None, weights_backbone=None, num_classes=NUM_CLASSES,
                        aux_loss=True)
    model.to(device).train()
    channels_last = ours and device.type == "cuda"
    autocast_dtype = {"float32": None, "bfloat16": torch.bfloat16,
                      "float16": torch.float16}[args.precision] if ours else None
    if channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    scaler = torch.amp.GradScaler("cuda", enabled=autocast_dtype is torch.float16
                                  and device.type == "cuda")
    criterion = torch.nn.CrossEntropyLoss(ignore_index=255)
    forward = torch.compile(model) if (ours and args.compile) else model
    x, y = load_batch(args.batch, args.crop)
    x, y = x.to(device), y.to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    def step():
        with torch.autocast(device_type=device.type, dtype=autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None):
            out = forward(x)
        loss = criterion(out["out"].float(), y) + 0.5 * criterion(out["aux"].float(), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return loss

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
            "loss": float(loss)}


def run_child(args, variant: str, algorithm: str) -> dict:
    cmd = [sys.executable, __file__, "--child", "--variant", variant, "--algorithm", algorithm,
           "--device", args.device, "--batch", str(args.batch), "--crop", str(args.crop),
           "--warmup", str(args.warmup), "--steps", str(args.steps),
           "--precision", args.precision] + (["--compile"] if args.compile else [])
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{variant} {algorithm} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
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
    parser.add_argument("--precision", default="bfloat16",
                        choices=("float32", "bfloat16", "float16"),
                        help="our step's autocast precision (default: bfloat16; the baseline "
                             "is always float32)")
    parser.add_argument("--compile", action="store_true", help="torch.compile our model")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=("ours", "torchvision"), help=argparse.SUPPRESS)
    parser.add_argument("--algorithm", choices=tuple(TORCHVISION_BUILDERS),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = args.device.startswith("cuda")
    args.batch = args.batch or (16 if gpu else 2)
    args.crop = args.crop or (480 if gpu else 128)
    args.warmup = args.warmup if args.warmup is not None else (10 if gpu else 1)
    args.steps = args.steps or (30 if gpu else 4)
    if args.child:
        print(json.dumps(measure(args)))
        return 0

    memory = "peak CUDA memory" if gpu else "peak RSS"
    print(f"device {args.device}, batch {args.batch}, crop {args.crop}, {args.warmup} warm-up + "
          f"{args.steps} timed steps; ours: {args.precision} autocast"
          f"{', channels_last' if gpu else ''}{', torch.compile' if args.compile else ''}; "
          f"baseline: torchvision float32")
    for algorithm in args.algorithms.split(","):
        base = run_child(args, "torchvision", algorithm)
        ours = run_child(args, "ours", algorithm)
        ratio = ours["samples_per_s"] / base["samples_per_s"]
        print(f"{algorithm}_resnet50: torchvision {base['samples_per_s']:.2f} samples/s "
              f"({memory} {base['peak_mb']:.0f} MiB) | kubeseg {ours['samples_per_s']:.2f} "
              f"samples/s ({memory} {ours['peak_mb']:.0f} MiB) | speed ratio {ratio:.2f}x, "
              f"memory ratio {ours['peak_mb'] / base['peak_mb']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
