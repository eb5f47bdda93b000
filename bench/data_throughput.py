"""Data loading throughput: kubeseg's loaders against a straightforward baseline.

Measures training samples/s (SPEC transforms: long side base_size x U(0.5, 2), pad, random crop,
flip, normalise) on CamVid (../shared/datasets/camvid, read by path) for:

  (a) folder loader    FolderDataset + TrainTransform in a DataLoader with --workers processes
      vs baseline      Pillow opens each file, full decode, full-size resize, pad, crop, flip,
                       torchvision to_tensor/normalize, one sample at a time in one process
  (b) shard streaming  the same images ingested into Parquet shards on a local S3 server
                       (SeaweedFS), streamed with ShardDataset in a DataLoader
      vs baseline      the baseline above reading each object from the same S3 server

Prints samples/s, samples/s per core used, and the ratios.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

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


def run_baseline(pairs, read, lut, args) -> float:
    from kubeseg.data.transforms import IMAGENET_MEAN, IMAGENET_STD, round_crop_size

    rng = np.random.default_rng(0)
    crop = round_crop_size(args.crop_size)
    baseline_sample(read(pairs[0][0]), read(pairs[0][1]), lut, rng, args.base_size, crop,
                    IMAGENET_MEAN, IMAGENET_STD)  # warm-up: imports, first-call costs
    start = time.perf_counter()
    for image_uri, mask_uri in pairs:
        baseline_sample(read(image_uri), read(mask_uri), lut, rng, args.base_size, crop,
                        IMAGENET_MEAN, IMAGENET_STD)
    return len(pairs) / (time.perf_counter() - start)


def run_loader(dataset, args, workers: int) -> float:
    """Samples/s through a DataLoader, worker start-up included."""
    from torch.utils.data import DataLoader

    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=workers,
                        shuffle=False)
    n = 0
    start = time.perf_counter()
    for images, _ in loader:
        n += images.shape[0]
    return n / (time.perf_counter() - start)


def main(argv=None) -> int:
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
    parser.add_argument("--skip-s3", action="store_true", help="only the folder comparison")
    args = parser.parse_args(argv)

    import torch

    from kubeseg import storage
    from kubeseg.data.channels import Channels, list_pairs
    from kubeseg.data.datasets import FolderDataset, ShardDataset
    from kubeseg.data.ingest import ingest_channels
    from kubeseg.data.labelmap import LabelMap
    from kubeseg.data.transforms import TrainTransform

    torch.set_num_threads(1)
    if not (args.data / "train").is_dir():
        print(f"CamVid not found at {args.data}", file=sys.stderr)
        return 2
    cores = os.cpu_count() or 1
    ours_cores = max(1, min(args.workers, cores))
    label_map_dir = str(args.data / "label_map")
    lut = LabelMap.load(label_map_dir, "train").lut
    transform = TrainTransform(args.base_size, args.crop_size)
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
              f"crop {transform.crop_size}, batch {args.batch_size}, {args.workers} workers, "
              f"{cores} cores")
        rows = []
        base = run_baseline([(p.image, p.annotation) for p in pairs], storage.read_bytes, lut,
                            args)
        folder = FolderDataset(str(root / "train"), str(root / "train_annotation"),
                               label_map=label_map_dir, transform=transform)
        rows.append(("folder", base, run_loader(folder, args, 0),
                     run_loader(folder, args, args.workers)))
        if not args.skip_s3:
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
                base_s3 = run_baseline(s3_pairs, storage.read_bytes, lut, args)
                shards = ShardDataset("s3://bench/shards", "train", transform=transform, seed=0)
                rows.append(("S3 shards", base_s3, run_loader(shards, args, 0),
                             run_loader(shards, args, args.workers)))
            finally:
                server.stop()
    w = args.workers
    print()
    print("samples/s (per core = samples/s divided by the cores the loader keeps busy)")
    print(f"{'source':<10} {'baseline':>9} {'ours 1 proc':>12} {f'ours {w} wkr':>12} "
          f"{f'per core ({w} wkr)':>18} {'ratio 1 proc':>13} {f'ratio {w} wkr':>12} "
          f"{'ratio per core':>15}")
    for name, b, one, many in rows:
        print(f"{name:<10} {b:>9.1f} {one:>12.1f} {many:>12.1f} {many / ours_cores:>18.1f} "
              f"{one / b:>12.2f}x {many / b:>11.2f}x {many / ours_cores / b:>14.2f}x")
    print(f"\nbaseline: Pillow full decode + full-size transforms, one sample at a time, 1 "
          f"process (1 core). ours: kubeseg loaders in a DataLoader with 0 workers (1 core) and "
          f"{w} workers ({ours_cores} of {cores} cores).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
