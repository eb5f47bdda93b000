"""Batch prediction throughput: ``kubeseg predict`` against a plain one-image-at-a-time loop.

Workload: ``--images`` JPEGs from CamVid (../shared/datasets/camvid, train then validation;
480x360, or rescaled to ``--width``), or generated shapes images when CamVid is not there,
in a local folder; one class-id mask PNG written per image into another folder.

Baseline ("plain loop"): for each image in turn, decode with Pillow, normalise, ``model.eval()``
forward under ``torch.no_grad()``, argmax, encode the PNG with Pillow, write the file.

Ours: :func:`kubeseg.serving.batch.batch_predict` with its defaults (or the flags given):
reading, decoding, encoding and writing on a thread pool while one thread runs the forward
passes, same-size images batched together, ``inference_mode``, BatchNorm folded into the
convolutions, channels-last.

Both run in this process on the same model artifact (randomly initialised: the benchmark
measures speed), after one warm-up pass each, in ``--rounds`` alternating rounds (plain then
ours, ours then plain, ...) so that a change in the machine's load touches both alike; the
totals give the ratio. The masks of the two are compared, so a fast wrong answer would show.

Beside the ratio it prints (bench/roofline.py) the CPU's capabilities, the model's FLOPs per
image at the images' size, the convolution limit calibrated in this run on the same threads,
and each side's achieved fraction of that limit.

    python bench/batch_predict.py                        # fcn / resnet-18, 200 images, CPU
    python bench/batch_predict.py --width 120 --images 100 --rounds 4
    python bench/batch_predict.py --device cuda --backbone resnet-50 --images 1000
"""
from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import roofline  # noqa: E402
from serve import make_artifact  # noqa: E402  (the same random-weights model as bench/serve)

CAMVID = REPO.parent / "shared" / "datasets" / "camvid"


def make_images(folder: Path, count: int, width: int) -> list:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    sources = []
    for split in ("train", "validation"):
        if (CAMVID / split).is_dir():
            sources += sorted((CAMVID / split).glob("*.png")) + sorted((CAMVID / split).glob("*.jpg"))
    names = []
    if sources:
        for i in range(count):
            image = Image.open(sources[i % len(sources)]).convert("RGB")
            if width and width != image.width:
                image = image.resize((width, round(image.height * width / image.width)),
                                     Image.BILINEAR)
            name = f"img_{i:05d}.jpg"
            image.save(folder / name, quality=90)
            names.append(name)
        return names
    import numpy as np

    from kubeseg.data.synthetic import make_sample

    rng = np.random.default_rng(0)
    for i in range(count):
        image, _ = make_sample(rng, width or 256, 3)
        name = f"img_{i:05d}.jpg"
        image.save(folder / name, quality=90)
        names.append(name)
    return names


class PlainLoop:
    """The straightforward loop: one image at a time, decode, forward, argmax, encode, write."""

    def __init__(self, model_uri: str, device: str):
        from kubeseg.artifact import load_model

        self.device = device
        self.model, self.info = load_model(model_uri, device=device)
        self.model.eval()

    def one(self, source: Path, name: str, out_dir: Path) -> None:
        import torch
        from PIL import Image

        from kubeseg.data.transforms import to_tensor

        image = Image.open(source / name).convert("RGB")
        x = to_tensor(image, self.info.mean, self.info.std)[None].to(self.device)
        with torch.no_grad():
            mask = self.model(x)["out"].argmax(dim=1)[0].to(torch.uint8).cpu().numpy()
        buf = io.BytesIO()
        Image.fromarray(mask, mode="L").save(buf, format="PNG")
        (out_dir / (Path(name).stem + ".png")).write_bytes(buf.getvalue())

    def run(self, source: Path, names: list, target: Path) -> float:
        target.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        for name in names:
            self.one(source, name, target)
        return time.perf_counter() - started


class Ours:
    """kubeseg's batch prediction, the model loaded once."""

    def __init__(self, model_uri: str, args):
        from kubeseg.serving.predictor import Runtime, SegmentationPredictor

        self.model_uri, self.args = model_uri, args
        runtime = Runtime(device=args.device, precision=args.precision)
        self.predictor = SegmentationPredictor(model_uri, runtime=runtime).load()

    def run(self, source: Path, names: list, target: Path) -> float:
        from kubeseg.serving.batch import BatchOptions, batch_predict

        started = time.perf_counter()
        summary = batch_predict(self.model_uri, str(source), str(target),
                                batch_size=self.args.batch_size,
                                options=BatchOptions(workers=self.args.workers, progress=False),
                                predictor=self.predictor)
        seconds = time.perf_counter() - started
        assert summary["failed"] == 0, summary["failures"][:3]
        assert summary["scored"] == len(names), summary
        return seconds


def agreement(a: Path, b: Path, names: list) -> float:
    import numpy as np
    from PIL import Image

    same = total = 0
    for name in names:
        stem = Path(name).stem + ".png"
        x = np.asarray(Image.open(a / stem))
        y = np.asarray(Image.open(b / stem))
        same += int((x == y).sum())
        total += x.size
    return same / total


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200, help="images per round")
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternating rounds of both (default: %(default)s)")
    parser.add_argument("--width", type=int, default=0,
                        help="rescale the images to this width (default: CamVid's 480)")
    parser.add_argument("--algorithm", default="fcn")
    parser.add_argument("--backbone", default="resnet-18")
    parser.add_argument("--num-classes", type=int, default=11)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--precision", default="float32")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (both)")
    return parser


def _warm_up(plain, ours, source: Path, names: list, batch_size: int, tmp: Path) -> None:
    """One batch through both, so that neither pays its first-call costs in the rounds."""
    warm = names[:batch_size]
    warm_dir = tmp / "warm-up-in"
    warm_dir.mkdir()
    for name in warm:
        (warm_dir / name).write_bytes((source / name).read_bytes())
    plain.run(warm_dir, warm, tmp / "warm-plain")
    ours.run(warm_dir, warm, tmp / "warm-ours")


def _rounds(plain, ours, source: Path, names: list, rounds: int, tmp: Path) -> dict:
    """Seconds of each side over ``rounds`` alternating rounds (the order swaps each round)."""
    totals = {"plain": 0.0, "ours": 0.0}
    for k in range(rounds):
        order = [("plain", plain), ("ours", ours)]
        for label, runner in (order if k % 2 == 0 else order[::-1]):
            seconds = runner.run(source, names, tmp / f"{label}-{k}")
            totals[label] += seconds
            print(f"round {k + 1} {label:5s}: {len(names) / seconds:8.2f} images/s", flush=True)
    return totals


def main() -> int:
    args = build_parser().parse_args()

    import torch
    from PIL import Image

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="kubeseg-bench-batch-") as tmp:
        tmp = Path(tmp)
        model_uri = make_artifact(str(tmp / "model"), args.algorithm, args.backbone,
                                  args.num_classes)
        source = tmp / "in"
        names = make_images(source, args.images, args.width)
        size = Image.open(source / names[0]).size
        print(f"{len(names)} images of {size[0]}x{size[1]} px x {args.rounds} rounds, "
              f"{args.algorithm}/{args.backbone}, {args.num_classes} classes, device "
              f"{args.device}, torch threads {torch.get_num_threads()}", flush=True)
        plain, ours = PlainLoop(model_uri, args.device), Ours(model_uri, args)
        flops = roofline.model_flops(plain.model, (1, 3, size[1], size[0]))
        by_precision = roofline.calibrate_limits(args.device, [args.precision])
        limits = {"plain": by_precision["float32"], "ours": by_precision[args.precision]}
        print(roofline.describe(roofline.cpu_capabilities(), limits["plain"], flops,
                                args.device), flush=True)
        extra = roofline.describe_limits(by_precision, args.device)
        if extra:
            print(extra)
        _warm_up(plain, ours, source, names, args.batch_size, tmp)
        totals = _rounds(plain, ours, source, names, args.rounds, tmp)
        count = len(names) * args.rounds
        print(f"plain loop:      {count / totals['plain']:8.2f} images/s")
        print(f"kubeseg predict: {count / totals['ours']:8.2f} images/s (batch "
              f"{args.batch_size}, precision {args.precision})")
        print(f"mask agreement with the plain loop: "
              f"{100 * agreement(tmp / 'plain-0', tmp / 'ours-0', names):.3f}% of pixels")
        for label, name, precision in (("plain", "plain loop", "float32"),
                                       ("ours", "kubeseg predict", args.precision)):
            print(roofline.report_line(name, flops, count / totals[label], limits[label])
                  + roofline.limit_note(precision))
        print(f"ratio: {totals['plain'] / totals['ours']:.2f}x images/s (kubeseg predict over "
              "the plain loop)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
