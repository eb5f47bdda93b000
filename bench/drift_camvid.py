"""Drift statistics on CamVid: false alarms on validation images, detections on shifted ones.

A trained CamVid model (e.g. ``kubeseg train --preset cpu-quality --set epochs=6 ...``) scores
every validation image as serving scores it (whole image, at the artifact's inference size,
logits back at the image's size), once as it is and once under each shift below; each image's
predicted pixels per class and per confidence bin are kept. Windows of N consecutive images
(a camera's stream: CamVid's validation split is one drive) then give, per statistic:

- the *false-alarm rate*: windows of unshifted validation images above the threshold;
- the *detection rate*: windows of shifted images above it.

Statistics (kubeseg.monitoring.drift): the Jensen-Shannon distance (JS) and the population
stability index (PSI) of the window's predicted class shares against the training split's label
shares (the artifact's baseline), the same two against the model's predicted shares on
validation, and the low-confidence excess (share of pixels below LOW_CONFIDENCE_BELOW, minus
the validation share). Where the reference comes from validation itself, it is taken from the
other half of the split than the window's (two folds), so a clean window is never compared with
itself.

Shifts (deterministic per image): night (dark, blue, sensor noise), dusk (half the light), fog
(veiling grey, low contrast), colour cast (warm white balance), blur (defocus), rain (streaks
and drops), noise (strong sensor noise), zoom (a narrower lens: the centre two thirds), jpeg
(quality 8), and shapes (another dataset: kubeseg's synthetic shapes).

Prints the table for the thresholds in kubeseg.monitoring.drift (or --thresholds), the largest
value each statistic reached on unshifted windows per window size, and the machine load.
Example::

    python bench/drift_camvid.py --model /tmp/camvid-6/model
    python bench/drift_camvid.py --model /tmp/camvid-6/model --cache /tmp/drift.npz \\
        --windows 1,8,16,32,64
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

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


def validation_images(data: Path, limit: int = 0) -> List:
    from PIL import Image

    paths = sorted(p for p in (data / "validation").iterdir()
                   if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    return [Image.open(p).convert("RGB") for p in paths[:limit or None]]


def shapes_images(count: int) -> List:
    from kubeseg.data.synthetic import make_sample

    rng = np.random.default_rng(7)
    return [make_sample(rng, 360, 4)[0].resize((480, 360)) for _ in range(count)]


def per_image_counts(model, info, data: Path, cache: Path, limit: int = 0) -> Dict[str, Tuple]:
    """``condition -> (class counts, confidence counts)``, from ``cache`` when it holds them."""
    if cache and cache.is_file():
        stored = np.load(cache)
        names = sorted({k.rsplit("/", 1)[0] for k in stored.files})
        print(f"per-image counts read from {cache}")
        return {n: (stored[f"{n}/classes"], stored[f"{n}/confidence"]) for n in names}
    clean = validation_images(data, limit)
    out = {}
    for name, images in [("clean", lambda: clean),
                         *[(s, (lambda f=f: [f(im, i) for i, im in enumerate(clean)]))
                           for s, f in SHIFTS.items()],
                         ("shapes", lambda: shapes_images(len(clean)))]:
        start = time.perf_counter()
        out[name] = score(model, info, images())
        print(f"  scored {name}: {len(clean)} images in {time.perf_counter() - start:.1f} s",
              flush=True)
    if cache:
        np.savez_compressed(cache, **{f"{n}/{k}": v for n, (c, b) in out.items()
                                      for k, v in (("classes", c), ("confidence", b))})
    return out


# -- windows -------------------------------------------------------------------------------------

def window_statistics(classes: np.ndarray, confidence: np.ndarray, size: int,
                      reference: Dict[str, Tuple]) -> Dict[str, List[float]]:
    """Each statistic over every window of ``size`` consecutive images of each fold, against
    the reference of the other fold (``reference[fold]``: predicted shares and low-confidence
    fraction) and the training label pixels (``reference["train"]``)."""
    from kubeseg.monitoring import drift

    out = {name: [] for name in STATISTICS}
    train_pixels = reference["train"]
    for fold, (lo, hi) in enumerate(folds(len(classes))):
        predicted, low = reference[1 - fold]
        for start in range(lo, hi - size + 1):
            c = classes[start:start + size].sum(axis=0)
            b = confidence[start:start + size].sum(axis=0)
            out["js_train"].append(drift.jensen_shannon_distance(train_pixels, c))
            out["psi_train"].append(drift.population_stability_index(train_pixels, c))
            out["js_validation"].append(drift.jensen_shannon_distance(predicted, c))
            out["psi_validation"].append(drift.population_stability_index(predicted, c))
            out["low_conf_excess"].append(drift.low_confidence_fraction(b) - low)
    return out


def folds(n: int) -> List[Tuple[int, int]]:
    return [(0, n // 2), (n // 2, n)]


def references(baseline, clean: Tuple[np.ndarray, np.ndarray]) -> Dict:
    """Per fold: the unshifted images' predicted class pixels and low-confidence fraction;
    ``train``: the artifact's training label pixels."""
    from kubeseg.monitoring import drift

    classes, confidence = clean
    out: Dict = {"train": np.asarray(baseline.class_pixels)}
    for fold, (lo, hi) in enumerate(folds(len(classes))):
        out[fold] = (classes[lo:hi].sum(axis=0),
                     drift.low_confidence_fraction(confidence[lo:hi].sum(axis=0)))
    return out


def rates(values: Dict[str, Dict[int, Dict[str, List[float]]]], thresholds: Dict[str, float],
          size: int, statistic: str) -> Dict[str, float]:
    """Share of windows above the threshold, per condition (``either``: the two alerting
    statistics, class shift or low confidence)."""
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


def print_tables(values, thresholds: Dict[str, float], sizes: Sequence[int]) -> None:
    conditions = list(values)
    print("\nlargest value on unshifted validation windows (and the median of each shift):")
    print(f"{'window':>6} {'statistic':<16} {'clean max':>9} " +
          " ".join(f"{c[:8]:>8}" for c in conditions[1:]))
    for size in sizes:
        for name in STATISTICS:
            clean = values["clean"][size][name]
            medians = [float(np.median(values[c][size][name])) for c in conditions[1:]]
            print(f"{size:>6} {name:<16} {max(clean):>9.3f} " +
                  " ".join(f"{m:>8.3f}" for m in medians))
    print("\nthresholds: " + ", ".join(f"{k} {v:.3g}" for k, v in thresholds.items()))
    print("share of windows above the threshold: 'clean' = false alarms, the rest = "
          "detections ('either' = js_train or low_conf_excess, what the alert fires on)")
    print(f"{'window':>6} {'statistic':<16} " + " ".join(f"{c[:8]:>8}" for c in conditions))
    for size in sizes:
        for name in (*STATISTICS, "either"):
            row = rates(values, thresholds, size, name)
            print(f"{size:>6} {name:<16} " + " ".join(f"{row[c]:>8.2f}" for c in conditions))


def default_thresholds(values, window: int, margin: float) -> Dict[str, float]:
    """The module's thresholds for the two alerting statistics; for the others, ``margin``
    times the largest value on unshifted windows of ``window`` images (for comparison)."""
    from kubeseg.monitoring import drift

    out = {name: margin * max(values["clean"][window][name]) for name in STATISTICS}
    out["js_train"] = drift.DEFAULT_CLASS_SHIFT_THRESHOLD
    out["low_conf_excess"] = drift.DEFAULT_LOW_CONFIDENCE_EXCESS_THRESHOLD
    return out


def main() -> int:
    from kubeseg.monitoring import drift

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:]))
    parser.add_argument("--model", required=True, help="a CamVid model artifact (folder/URI)")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="CamVid (four channels)")
    parser.add_argument("--windows", default="1,4,8,16,32",
                        help="window sizes in images (default: %(default)s)")
    parser.add_argument("--cache", help="npz file keeping the per-image counts (reused when "
                                        "it exists)")
    parser.add_argument("--margin", type=float, default=1.25,
                        help="for the non-alerting statistics: threshold = margin x largest "
                             "clean value at the default window (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--images", type=int, default=0,
                        help="only the first N validation images (a quick check; default: all)")
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
    sizes = [int(s) for s in args.windows.split(",")]
    reference = references(baseline, counts["clean"])
    print(f"low-confidence share (< {drift.LOW_CONFIDENCE_BELOW}) on validation: artifact "
          f"{baseline.low_confidence_fraction:.3f}, first half {reference[0][1]:.3f}, second "
          f"half {reference[1][1]:.3f}")
    values = {name: {size: window_statistics(c, b, size, reference) for size in sizes}
              for name, (c, b) in counts.items()}
    window = drift.DEFAULT_WINDOW_IMAGES if drift.DEFAULT_WINDOW_IMAGES in sizes else sizes[-1]
    print_tables(values, default_thresholds(values, window, args.margin), sizes)
    print(f"\n{time.perf_counter() - start:.0f} s; load {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
