"""Data loading throughput: kubeseg's loaders against a straightforward baseline.

Measures training samples/s (SPEC transforms: long side base_size x U(0.5, 2), pad, random crop,
flip, normalise) on CamVid (../shared/datasets/camvid, read by path) for:

  (a) folder loader    FolderDataset + TrainTransform in a DataLoader with --workers processes
      vs baseline      Pillow opens each file, full decode, full-size resize, pad, crop, flip,
                       torchvision to_tensor/normalize, one sample at a time in one process
  (b) shard streaming  the same images ingested into Parquet shards on a local S3 server
                       (SeaweedFS), streamed with ShardDataset in a DataLoader
      vs baseline      the baseline above reading each object from the same S3 server

Each kubeseg loader runs four ways: 0 workers (all in this process); --workers processes
yielding normalised float32 images and int64 masks; --workers processes yielding uint8 images
and masks (TrainTransform(normalise=False), what ``kubeseg train`` uses), normalised here with
normalise_batch, whose cost is counted; and the same over --epochs epochs with workers that
persist between epochs, as ``kubeseg train`` keeps them (start-up paid once).

Per core, two ways: samples per CPU-second (user + system time of this process and its
DataLoader workers, from getrusage; robust to other load on a shared machine; the S3 server's
own time is left out on both sides), and samples/s divided by the worker count (wall clock;
what a quiet machine shows). The baseline uses one core either way.

Last, the DataLoader's own cost: the same workers shipping uint8 zeros of the same shapes (no
reading, decoding or transforming), in CPU milliseconds per sample, start-up included. It is
what separates the in-process figures from the worker figures.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Tuple

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "camvid"


def baseline_sample(image_bytes: bytes, mask_bytes: bytes, lut: np.ndarray, rng, base_size: int,
                    crop: int, mean, std):
    """The straightforward way: decode everything, transform the whole image, then crop."""
    import io

    import torch
    import torchvision.transforms.functional as TF
    from PIL import Image

    image = Image.open(io.BytesIO(image_bytes)).convert("RGB")
    mask = Image.fromarray(lut[np.asarray(Image.open(io.BytesIO(mask_bytes)))])
    w, h = image.size
    long_side = base_size * rng.uniform(0.5, 2.0)
    tw, th = int(round(w * long_side / max(w, h))), int(round(h * long_side / max(w, h)))
    image = image.resize((tw, th), Image.BILINEAR)
    mask = mask.resize((tw, th), Image.NEAREST)
    if tw < crop or th < crop:
        padded = Image.new("RGB", (max(tw, crop), max(th, crop)))
        padded.paste(image, (0, 0))
        padded_mask = Image.new("L", padded.size, 255)
        padded_mask.paste(mask, (0, 0))
        image, mask = padded, padded_mask
    x0 = int(rng.integers(0, image.size[0] - crop + 1))
    y0 = int(rng.integers(0, image.size[1] - crop + 1))
    image = image.crop((x0, y0, x0 + crop, y0 + crop))
    mask = mask.crop((x0, y0, x0 + crop, y0 + crop))
    if rng.random() < 0.5:
        image, mask = TF.hflip(image), TF.hflip(mask)
    x = TF.normalize(TF.to_tensor(image), mean, std)
    y = torch.as_tensor(np.array(mask), dtype=torch.int64)
    return x, y


class Measure:
    """Wall and CPU seconds (this process and its reaped children: the DataLoader workers)."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), _cpu_seconds()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.wall
        self.cpu = _cpu_seconds() - self.cpu


def _cpu_seconds() -> float:
    import resource

    own, children = (resource.getrusage(w) for w in (resource.RUSAGE_SELF,
                                                      resource.RUSAGE_CHILDREN))
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run_baseline(pairs, read, lut, args) -> Tuple[float, float]:
    """(samples/s, samples per CPU-second) of the plain loop."""
    from kubeseg.config import round_crop_size
    from kubeseg.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    rng = np.random.default_rng(0)
    crop = round_crop_size(args.crop_size)
    baseline_sample(read(pairs[0][0]), read(pairs[0][1]), lut, rng, args.base_size, crop,
                    IMAGENET_MEAN, IMAGENET_STD)  # warm-up: imports, first-call costs
    with Measure() as m:
        for image_uri, mask_uri in pairs:
            baseline_sample(read(image_uri), read(mask_uri), lut, rng, args.base_size, crop,
                            IMAGENET_MEAN, IMAGENET_STD)
    return len(pairs) / m.wall, len(pairs) / m.cpu


def run_loader(dataset, args, workers: int, on_batch=None, epochs: int = 1) -> Tuple[float, float]:
    """(samples/s, samples per CPU-second) through a DataLoader, worker start-up included;
    ``on_batch(images, masks)`` runs on each batch here (counted). With ``epochs`` > 1 the
    workers persist from epoch to epoch (``set_epoch`` between), as in ``kubeseg train``."""
    from torch.utils.data import DataLoader

    n = 0
    with Measure() as m:
        loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=workers,
                            shuffle=False, persistent_workers=epochs > 1 and workers > 0)
        for epoch in range(epochs):
            if hasattr(dataset, "set_epoch"):
                dataset.set_epoch(epoch)
            for images, masks in loader:
                if on_batch is not None:
                    on_batch(images, masks)
                n += images.shape[0]
        del loader  # its workers are joined now: their CPU time is counted
    return n / m.wall, n / m.cpu


class _Zeros:
    """``count`` uint8 samples of zeros shaped like the transform's output: what is left when
    a DataLoader only ships samples from its workers (no file reading, decoding or transform)."""

    def __init__(self, count: int, crop: int):
        self.count, self.crop = count, crop

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int):
        import torch

        return (torch.zeros(3, self.crop, self.crop, dtype=torch.uint8),
                torch.zeros(self.crop, self.crop, dtype=torch.uint8))


def transfer_cost(count: int, args) -> float:
    """CPU milliseconds per sample of a DataLoader with ``--workers`` workers shipping uint8
    zeros (worker start-up and shared-memory transfer only), median of the runs."""
    from kubeseg.config import round_crop_size

    dataset = _Zeros(count, round_crop_size(args.crop_size))
    per_cpu_s = _median_runs(lambda: run_loader(dataset, args, args.workers), args.repeat)[1]
    return 1000.0 / per_cpu_s


def _median_runs(fn, repeat: int) -> Tuple[float, float]:
    runs = [fn() for _ in range(repeat)]
    return (statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs))


def measure_source(name: str, baseline, make_dataset, args) -> list:
    """Rows (name, variant, samples/s, samples per CPU-s, cores) for one data source."""
    from kubeseg.data.transforms import normalise_batch

    def on_uint8(images, masks):
        normalise_batch(images)
        masks.long()

    w, r = args.workers, max(1, args.repeat)
    cores = max(1, min(w, os.cpu_count() or 1))  # the cores the workers can keep busy
    return [(name, "baseline (1 process)", *_median_runs(baseline, r), 1),
            (name, "ours, 0 workers", *_median_runs(
                lambda: run_loader(make_dataset(True), args, 0), r), 1),
            (name, f"ours, {w} wkr, float", *_median_runs(
                lambda: run_loader(make_dataset(True), args, w), r), cores),
            (name, f"ours, {w} wkr, uint8", *_median_runs(
                lambda: run_loader(make_dataset(False), args, w, on_uint8), r), cores),
            (name, f"ours, {w} wkr, uint8, {args.epochs} ep", *_median_runs(
                lambda: run_loader(make_dataset(False), args, w, on_uint8, args.epochs), r),
             cores)]


def print_table(rows) -> None:
    print()
    print(f"{'source':<10} {'loader':<26} {'samples/s':>10} {'per CPU-s':>10} "
          f"{'ratio per CPU-s':>16} {'ratio per core (wall)':>22}")
    base = {}
    for name, variant, per_s, per_cpu, cores in rows:
        if variant.startswith("baseline"):
            base[name] = (per_s, per_cpu)
        b_s, b_cpu = base[name]
        print(f"{name:<10} {variant:<26} {per_s:>10.1f} {per_cpu:>10.1f} "
              f"{per_cpu / b_cpu:>15.2f}x {per_s / cores / b_s:>21.2f}x")


def s3_rows(root: Path, pairs, label_map_dir: str, lut, args, tmp: str) -> list:
    """Shards ingested onto a local S3 server, streamed; the baseline reads the same server."""
    from kubeseg import storage
    from kubeseg.data.channels import Channels
    from kubeseg.data.datasets import ShardDataset
    from kubeseg.data.ingest import ingest_channels
    from kubeseg.data.transforms import TrainTransform

    sys.path.insert(0, str(REPO / "tests"))
    from s3server import start_s3_server

    server = start_s3_server(Path(tmp, "s3"))
    try:
        os.environ.update(server.env())
        storage.ensure_bucket("s3://bench")
        storage.upload_prefix(str(root), "s3://bench/camvid")
        storage.upload_prefix(label_map_dir, "s3://bench/camvid/label_map")
        start = time.perf_counter()
        ingest_channels(Channels(train="s3://bench/camvid/train",
                                 train_annotation="s3://bench/camvid/train_annotation",
                                 label_map="s3://bench/camvid/label_map"),
                        "s3://bench/shards", shard_size_mb=8)
        print(f"ingested {len(pairs)} samples into shards in "
              f"{time.perf_counter() - start:.1f} s")
        s3_pairs = [(f"s3://bench/camvid/train/{Path(p.image).name}",
                     f"s3://bench/camvid/train_annotation/{Path(p.annotation).name}")
                    for p in pairs]

        def shards(normalise: bool):
            transform = TrainTransform(args.base_size, args.crop_size, normalise=normalise)
            return ShardDataset("s3://bench/shards", "train", transform=transform, seed=0)

        return measure_source("S3 shards",
                              lambda: run_baseline(s3_pairs, storage.read_bytes, lut, args),
                              shards, args)
    finally:
        server.stop()


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help=f"CamVid root (default {DEFAULT_DATA})")
    parser.add_argument("--limit", type=int, default=367,
                        help="training images used (default 367: all of CamVid train)")
    parser.add_argument("--base-size", type=int, default=520, help="base_size (default 520)")
    parser.add_argument("--crop-size", type=int, default=240, help="crop_size (default 240)")
    parser.add_argument("--batch-size", type=int, default=8, help="loader batch size (default 8)")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                        help="DataLoader worker processes (default min(2, cores))")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs of each measurement; the median is shown (default 1)")
    parser.add_argument("--epochs", type=int, default=3,
                        help="epochs of the last row, whose workers persist between epochs as "
                             "in kubeseg train (default 3)")
    parser.add_argument("--skip-s3", action="store_true", help="only the folder comparison")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from kubeseg import storage
    from kubeseg.data.channels import list_pairs
    from kubeseg.data.datasets import FolderDataset
    from kubeseg.data.labelmap import LabelMap
    from kubeseg.data.transforms import TrainTransform

    sys.path.insert(0, str(REPO / "bench"))
    from roofline import cpu_capabilities, describe

    torch.set_num_threads(1)  # as in a DataLoader worker
    if not (args.data / "train").is_dir():
        print(f"CamVid not found at {args.data}", file=sys.stderr)
        return 2
    print(describe(cpu_capabilities()))
    label_map_dir = str(args.data / "label_map")
    lut = LabelMap.load(label_map_dir, "train").lut
    with tempfile.TemporaryDirectory() as tmp:
        # A subset in the four-channel layout (symlinks: CamVid is never copied).
        root = Path(tmp, "camvid")
        for channel in ("train", "train_annotation"):
            (root / channel).mkdir(parents=True)
        pairs = list_pairs(str(args.data / "train"), str(args.data / "train_annotation")).pairs
        pairs = pairs[: args.limit]
        for p in pairs:
            os.symlink(p.image, root / "train" / Path(p.image).name)
            os.symlink(p.annotation, root / "train_annotation" / Path(p.annotation).name)
        print(f"CamVid train subset: {len(pairs)} images 480x360, base_size {args.base_size}, "
              f"crop {TrainTransform(args.base_size, args.crop_size).crop_size}, batch "
              f"{args.batch_size}, {args.workers} workers, {os.cpu_count()} cores, median of "
              f"{args.repeat} run(s), load average {os.getloadavg()[0]:.2f} at the start")

        def folder(normalise: bool):
            transform = TrainTransform(args.base_size, args.crop_size, normalise=normalise)
            return FolderDataset(str(root / "train"), str(root / "train_annotation"),
                                 label_map=label_map_dir, transform=transform)

        rows = measure_source("folder", lambda: run_baseline(
            [(p.image, p.annotation) for p in pairs], storage.read_bytes, lut, args),
            folder, args)
        if not args.skip_s3:
            rows += s3_rows(root, pairs, label_map_dir, lut, args, tmp)
    print_table(rows)
    print(f"\nDataLoader overhead alone ({args.workers} workers shipping uint8 zeros of the "
          f"same shapes, {len(pairs)} samples, start-up included): "
          f"{transfer_cost(len(pairs), args):.2f} CPU ms per sample")
    print(f"\nbaseline: Pillow full decode + full-size transforms, one sample at a time, 1 "
          f"process. ours: kubeseg loaders in a DataLoader; 'float' yields normalised float32, "
          f"'uint8' (what kubeseg train uses) is normalised on the batch here (counted). Load "
          f"average at the end: {os.getloadavg()[0]:.2f}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
