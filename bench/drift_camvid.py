"""Drift statistics on CamVid: false alarms on unshifted images, detections on shifted ones.

A trained CamVid model (e.g. ``kubeseg train --preset cpu-quality --set epochs=6 ...``) scores
images as serving scores them (whole image, at the artifact's inference size, logits back at
the image's size), each as it is and under each shift below; every image's predicted pixels
per class and per confidence bin are kept (``--cache``). Windows of N consecutive images (a
camera's stream: each split is a few drives, frames in order) then give, per statistic:

- the *false-alarm rate*: windows of unshifted images above the threshold;
- the *detection rate*: windows of shifted images above it.

Two groups: the validation split (101 images, one drive; windows up to 32, ``--windows``), and
the training split (367 images, other drives of the same camera and city, seen in training;
windows up to 256, ``--train-windows``), each unshifted and under each shift (``tr_<shift>``).

Statistics (kubeseg.monitoring.drift): the Jensen-Shannon distance (JS) and the population
stability index (PSI) of the window's predicted class shares against the training split's label
shares (the artifact's baseline: what the alert uses), the same two against the model's
predicted shares on validation, and the low-confidence excess (share of pixels below
LOW_CONFIDENCE_BELOW, minus validation's). Where the reference comes from validation and the
windows are validation images, it is taken from the other half of the split (two halves), so a
window is never compared with itself.

Shifts (deterministic per image): night (dark, blue, sensor noise), dusk (half the light), fog
(veiling grey, low contrast), colour cast (warm white balance), blur (defocus), rain (streaks
and drops), noise (strong sensor noise), zoom (a narrower lens: the centre two thirds), jpeg
(quality 8), and shapes (another dataset: kubeseg's synthetic shapes; validation group only).

Prints, per group, the largest unshifted value and each condition's median per window size,
and the rates at the thresholds of kubeseg.monitoring.drift (for the statistics the alerts do
not use: 1.25 x the largest unshifted validation value, ``--margin``). On 2 CPU cores scoring
all conditions takes about 40 minutes; with ``--cache`` a rerun only prints. Example::

    python bench/drift_camvid.py --model /tmp/camvid-6/model --cache /tmp/drift.npz
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "camvid"
STATISTICS = ("js_train", "psi_train", "js_validation", "psi_validation", "low_conf_excess")


# -- the shifts ----------------------------------------------------------------------------------

def _rng(index: int, salt: int) -> np.random.Generator:
    return np.random.default_rng(1000 * salt + index)


def _array(image) -> np.ndarray:
    return np.asarray(image, dtype=np.float32)


def _image(values: np.ndarray):
    from PIL import Image

    return Image.fromarray(np.clip(values, 0, 255).astype(np.uint8), "RGB")


def night(image, index: int):
    x = 255 * (_array(image) / 255) ** 2.2 * 0.45
    x *= np.array([0.8, 0.9, 1.15], dtype=np.float32)
    return _image(x + _rng(index, 1).normal(0, 6, x.shape))


def dusk(image, index: int):
    return _image(_array(image) * 0.5)


def fog(image, index: int):
    x = _array(image)
    rows = np.linspace(0.75, 0.45, x.shape[0], dtype=np.float32)[:, None, None]  # thicker far
    return _image(x * (1 - rows) + 200 * rows)


def colour_cast(image, index: int):
    return _image(_array(image) * np.array([1.25, 1.05, 0.7], dtype=np.float32))


def blur(image, index: int):
    from PIL import ImageFilter

    return image.filter(ImageFilter.GaussianBlur(radius=4))


def rain(image, index: int):
    from PIL import ImageDraw, ImageFilter

    out = image.filter(ImageFilter.GaussianBlur(radius=1)).copy()
    draw = ImageDraw.Draw(out)
    rng = _rng(index, 2)
    w, h = out.size
    for _ in range(400):
        x, y = rng.integers(0, w), rng.integers(0, h)
        length = int(rng.integers(8, 25))
        draw.line([(x, y), (x - length // 4, y + length)], fill=(200, 200, 210), width=1)
    return _image(_array(out) * 0.8 + 25)


def noise(image, index: int):
    x = _array(image)
    return _image(x + _rng(index, 3).normal(0, 35, x.shape))


def zoom(image, index: int):
    w, h = image.size
    box = (w // 6, h // 6, w - w // 6, h - h // 6)
    return image.crop(box).resize((w, h))


def jpeg(image, index: int):
    from PIL import Image

    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=8)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


SHIFTS: Dict[str, Callable] = {"night": night, "dusk": dusk, "fog": fog,
                               "colour_cast": colour_cast, "blur": blur, "rain": rain,
                               "noise": noise, "zoom": zoom, "jpeg": jpeg}


# -- scoring -------------------------------------------------------------------------------------

def score(model, info, images: Sequence) -> Tuple[np.ndarray, np.ndarray]:
    """Per image: predicted pixels per class ``[N, C]`` and per confidence bin ``[N, B]``,
    scored as serving scores them (whole image, the artifact's inference size)."""
    import torch

    from kubeseg.data.transforms import EvalTransform
    from kubeseg.inference import output_counts, predict_logits

    transform = EvalTransform(mean=tuple(info.mean), std=tuple(info.std), crop_size=None)
    long_side = info.hyperparameters.inference_long_side
    classes, confidences = [], []
    for image in images:
        mask = np.zeros((image.size[1], image.size[0]), dtype=np.uint8)
        x, _ = transform(image, mask)
        with torch.inference_mode():
            logits = predict_logits(model, x[None], long_side=long_side)
        c, b = output_counts(logits)
        classes.append(c[0].numpy())
        confidences.append(b[0].numpy())
    return np.stack(classes), np.stack(confidences)


def split_images(data: Path, split: str, limit: int = 0) -> List:
    from PIL import Image

    paths = sorted(p for p in (data / split).iterdir()
                   if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    return [Image.open(p).convert("RGB") for p in paths[:limit or None]]


def shapes_images(count: int) -> List:
    from kubeseg.data.synthetic import make_sample

    rng = np.random.default_rng(7)
    return [make_sample(rng, 360, 4)[0].resize((480, 360)) for _ in range(count)]


def conditions(data: Path, limit: int) -> Dict[str, Callable[[], List]]:
    """Each condition's images, made when asked for: the validation images as they are, under
    each shift, the shapes, and the training split as it is and under each shift (``train``,
    ``tr_<shift>``: other drives of the same camera and city, seen in training, long enough
    for windows of hundreds of images)."""
    clean: List = []

    def validation() -> List:
        if not clean:
            clean.extend(split_images(data, "validation", limit))
        return clean

    out: Dict[str, Callable[[], List]] = {"clean": validation}
    for name, shift in SHIFTS.items():
        out[name] = lambda shift=shift: [shift(im, i) for i, im in enumerate(validation())]
    out["shapes"] = lambda: shapes_images(len(validation()))
    out["train"] = lambda: split_images(data, "train", limit)
    for name, shift in SHIFTS.items():
        out[f"tr_{name}"] = lambda shift=shift: [
            shift(im, i) for i, im in enumerate(split_images(data, "train", limit))]
    return out


def per_image_counts(model, info, data: Path, cache: Optional[Path],
                     limit: int = 0) -> Dict[str, Tuple]:
    """``condition -> (class counts, confidence counts)``; conditions already in ``cache`` are
    read from it, the others scored (and added to it)."""
    out: Dict[str, Tuple] = {}
    if cache and cache.is_file():
        stored = np.load(cache)
        for name in sorted({k.rsplit("/", 1)[0] for k in stored.files}):
            out[name] = (stored[f"{name}/classes"], stored[f"{name}/confidence"])
        print(f"per-image counts of {', '.join(out)} read from {cache}")
    for name, images in conditions(data, limit).items():
        if name in out:
            continue
        start = time.perf_counter()
        made = images()
        out[name] = score(model, info, made)
        print(f"  scored {name}: {len(made)} images in {time.perf_counter() - start:.1f} s",
              flush=True)
    if cache:
        np.savez_compressed(cache, **{f"{n}/{k}": v for n, (c, b) in out.items()
                                      for k, v in (("classes", c), ("confidence", b))})
    order = list(conditions(data, limit))
    return {name: out[name] for name in order if name in out}


# -- windows -------------------------------------------------------------------------------------

def window_statistics(classes: np.ndarray, confidence: np.ndarray, size: int,
                      segments: Sequence[Tuple], train_pixels: np.ndarray
                      ) -> Dict[str, List[float]]:
    """Each statistic over every window of ``size`` consecutive images inside each segment
    ``(lo, hi, predicted pixels, low-confidence fraction)``, against that segment's validation
    reference, and against the training label pixels."""
    from kubeseg.monitoring import drift

    out = {name: [] for name in STATISTICS}
    for lo, hi, predicted, low in segments:
        for start in range(lo, hi - size + 1):
            c = classes[start:start + size].sum(axis=0)
            b = confidence[start:start + size].sum(axis=0)
            out["js_train"].append(drift.jensen_shannon_distance(train_pixels, c))
            out["psi_train"].append(drift.population_stability_index(train_pixels, c))
            out["js_validation"].append(drift.jensen_shannon_distance(predicted, c))
            out["psi_validation"].append(drift.population_stability_index(predicted, c))
            out["low_conf_excess"].append(drift.low_confidence_fraction(b) - low)
    return out


def segments_of(group: str, n: int, baseline, clean: Tuple[np.ndarray, np.ndarray]) -> List:
    """Validation images: two halves, each compared with the other half's predicted classes
    and low-confidence share (never with itself). Training images: the whole sequence,
    compared with the artifact's validation figures."""
    from kubeseg.monitoring import drift

    if group == "train":
        return [(0, n, np.asarray(baseline.predicted_pixels), baseline.low_confidence_fraction)]
    classes, confidence = clean
    half = len(classes) // 2
    halves = [(0, half), (half, len(classes))]
    refs = [(classes[lo:hi].sum(axis=0),
             drift.low_confidence_fraction(confidence[lo:hi].sum(axis=0))) for lo, hi in halves]
    m = n // 2
    return [(0, m, *refs[1]), (m, n, *refs[0])]


def rates(values: Dict[str, Dict[int, Dict[str, List[float]]]], thresholds: Dict[str, float],
          size: int, statistic: str) -> Dict[str, float]:
    """Share of windows above the threshold, per condition (``either``: the two alerting
    statistics, class shift or low confidence); NaN where no window is that long."""
    out = {}
    for condition, by_size in values.items():
        stats = by_size[size]
        if statistic == "either":
            above = [a > thresholds["js_train"] or b > thresholds["low_conf_excess"]
                     for a, b in zip(stats["js_train"], stats["low_conf_excess"])]
        else:
            above = [v > thresholds[statistic] for v in stats[statistic]]
        out[condition] = float(np.mean(above)) if above else float("nan")
    return out


def _cell(values: List[float], how) -> str:
    return f"{how(values):>8.3f}" if values else f"{'-':>8}"


def print_tables(title: str, values, thresholds: Dict[str, float], sizes: Sequence[int]) -> None:
    conditions = list(values)
    first = conditions[0]
    print(f"\n{title}: largest value on {first} windows (and the median of each other "
          "condition):")
    print(f"{'window':>6} {'statistic':<16} {first[:5] + ' max':>9} " +
          " ".join(f"{c[:8]:>8}" for c in conditions[1:]))
    for size in sizes:
        for name in STATISTICS:
            print(f"{size:>6} {name:<16} {_cell(values[first][size][name], max):>9} " +
                  " ".join(_cell(values[c][size][name], np.median) for c in conditions[1:]))
    print(f"share of windows above the threshold ('{first}' = false alarms, the others = "
          "detections; 'either' = js_train or low_conf_excess, what the alerts fire on):")
    print(f"{'window':>6} {'statistic':<16} " + " ".join(f"{c[:8]:>8}" for c in conditions))
    for size in sizes:
        for name in (*STATISTICS, "either"):
            row = rates(values, thresholds, size, name)
            print(f"{size:>6} {name:<16} " + " ".join(f"{row[c]:>8.2f}" for c in conditions))


def default_thresholds(values, window: int, margin: float) -> Dict[str, float]:
    """The module's thresholds for the two alerting statistics; for the others, ``margin``
    times the largest value on unshifted validation windows of ``window`` images (for
    comparison)."""
    from kubeseg.monitoring import drift

    out = {name: margin * max(values["clean"][window][name]) for name in STATISTICS}
    out["js_train"] = drift.DEFAULT_CLASS_SHIFT_THRESHOLD
    out["low_conf_excess"] = drift.DEFAULT_LOW_CONFIDENCE_EXCESS_THRESHOLD
    return out


def group_values(group: str, counts: Dict[str, Tuple], baseline, sizes: Sequence[int]) -> Dict:
    """``condition -> window size -> statistic -> values`` for the conditions of ``group``."""
    names = [n for n in counts if (n == "train" or n.startswith("tr_")) == (group == "train")]
    out = {}
    for name in names:
        classes, confidence = counts[name]
        segments = segments_of(group, len(classes), baseline, counts["clean"])
        out[name] = {size: window_statistics(classes, confidence, size, segments,
                                             np.asarray(baseline.class_pixels))
                     for size in sizes}
    return out


def main() -> int:
    from kubeseg.monitoring import drift

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:]))
    parser.add_argument("--model", required=True, help="a CamVid model artifact (folder/URI)")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="CamVid (four channels)")
    parser.add_argument("--windows", default="1,4,8,16,32",
                        help="window sizes on the validation drive (default: %(default)s)")
    parser.add_argument("--train-windows", default="32,64,128,256",
                        help="window sizes on the training split (default: %(default)s)")
    parser.add_argument("--cache", help="npz file keeping the per-image counts (conditions "
                                        "found there are not scored again)")
    parser.add_argument("--margin", type=float, default=1.25,
                        help="for the non-alerting statistics: threshold = margin x largest "
                             "unshifted validation value at the largest --windows (default: "
                             "%(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--images", type=int, default=0,
                        help="only the first N images of each split (a quick check; default: "
                             "all)")
    args = parser.parse_args()
    import torch

    from kubeseg.artifact import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model, info = load_model(args.model)
    baseline = drift.TrainingBaseline.from_dict(info.training_baseline)
    if baseline is None:
        print(f"{args.model} records no training baseline (trained before kubeseg kept one): "
              "train it again", file=sys.stderr)
        return 1
    print(f"model {info.uri}: {info.algorithm}/{info.backbone}, epoch {info.epoch}, "
          f"validation mIoU {info.metrics.get('mIOU')}, inference size "
          f"{info.hyperparameters.inference_size}; load {os.getloadavg()[0]:.1f}")
    counts = per_image_counts(model, info, Path(args.data),
                              Path(args.cache) if args.cache else None, args.images)
    print(f"low-confidence share (< {drift.LOW_CONFIDENCE_BELOW}) on validation at training: "
          f"{baseline.low_confidence_fraction:.3f}")
    sizes = [int(s) for s in args.windows.split(",")]
    validation = group_values("validation", counts, baseline, sizes)
    thresholds = default_thresholds(validation, sizes[-1], args.margin)
    print("\nthresholds: " + ", ".join(f"{k} {v:.3g}" for k, v in thresholds.items()))
    print_tables("validation drive (unshifted = 'clean')", validation, thresholds, sizes)
    train_sizes = [int(s) for s in args.train_windows.split(",")]
    print_tables("training split (seen in training; unshifted = 'train')",
                 group_values("train", counts, baseline, train_sizes), thresholds, train_sizes)
    print(f"\n{time.perf_counter() - start:.0f} s; load {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
