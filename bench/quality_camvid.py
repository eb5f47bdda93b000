"""Quality benchmark on CamVid: kubeseg's training recipe against torchvision's
deeplabv3_resnet50 trained with a plain recipe, on the same data and the same number of epochs.

Both train on the train split (367 images) of ../shared/datasets/camvid, read in place, and are
scored the same way on its validation split (101 images): the whole 480x360 image, resized by
the mode's scale for the network, logits upsampled back, one confusion matrix over the split
(void pixels ignored), mIoU over the 11 classes.

Modes (--mode) and presets (--preset):
  cpu  quarter resolution (120x90 network input), from scratch, a few epochs: about 15-20
       minutes on 2 CPU cores.
  gpu  full resolution (480x360), more epochs; with --pretrained-weights (a torchvision
       ResNet-50 state dict) both models start from the same ImageNet backbone.
  --preset cpu-quality
       kubeseg's side trains with a named preset of kubeseg.presets (what `kubeseg train
       --preset NAME` uses): its resolution (scale = base_size / 480), epochs and batch size;
       the torchvision side gets the same scale, epochs and batch size. Prints validation
       mIoU, per-class IoU, pixel accuracy and wall time.

Every run also prints the CPU's capabilities, kubeseg's model FLOPs per image, the calibrated
convolution limit (bench/roofline.py) and the fraction of it each side's training reached.

The two recipes:
  kubeseg      kubeseg.engine.train.train with the Hyperparameters of the mode's preset (the
               recipe we recommend: algorithm/backbone for the budget, poly schedule, scale
               augmentation with random crops, class_weights=auto against imbalance, auxiliary
               loss).
  torchvision  torchvision.models.segmentation.deeplabv3_resnet50 (weights=None,
               weights_backbone=None), SGD (momentum 0.9) at a fixed learning rate, images
               simply resized to the network size, plain cross entropy.

kubeseg's side also writes a full evaluation (metrics, confusion matrix, report, overlays) into
the run folder. Example::

    python bench/quality_camvid.py --mode cpu
    python bench/quality_camvid.py --mode cpu --epochs 2 --skip-baseline --set optimizer=sgd
    python bench/quality_camvid.py --preset cpu-quality --skip-baseline
    python bench/quality_camvid.py --preset cpu-pretrained --skip-baseline --pretrained-arm \\
        --pretrained-weights efficientnet-lite0-57934424.pth   # scratch and ImageNet side by side
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "camvid"
CAMVID_CLASSES = ["Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence",
                  "Car", "Pedestrian", "Bicyclist"]
# SPEC section 7: CamVid 11 classes at 360x480, test split, void excluded (mIoU, %).
REFERENCE = [("SegNet-Basic", 46.3), ("SegNet", 50.2), ("Bayesian SegNet", 63.1),
             ("FC-DenseNet103 (no pretraining)", 66.9)]

# kubeseg's cpu recipe, chosen by changing one thing at a time (validation mIoU; one seed
# unless said; differences near 1 point are within noise). 2 epochs, DeepLab/Adam 2e-3:
# median-frequency class weights +4.5 points over none, poly schedule +6.2 over a constant
# rate, Adam +1.5 over SGD 0.01, FCN head +1.7 over DeepLab's ASPP (at 120x90 input the 15x12
# feature map leaves the 12/24/36 dilations reading mostly padding). 2 epochs, FCN: Adam 1e-3
# +0.9 over 2e-3 and +3.0 over 4e-3; crop 96 +1.7 over 120. 4 epochs, FCN, seeds 0 and 1:
# square-root median-frequency weights 0.351/0.319 against full ones 0.274/0.301 (+4.7 on
# average: full weights make the model paint buildings and trees as rare classes). The
# square-root form is what class_weights=auto computes from the training split.
PRESETS = {
    "cpu": {
        "scale": 0.25, "epochs": 4, "batch": 8, "baseline_lr": 0.01, "class_weights": "auto",
        "kubeseg": {"algorithm": "fcn", "backbone": "resnet-18", "base_size": 120,
                    "crop_size": 96, "optimizer": "adam", "learning_rate": 0.001,
                    "lr_scheduler": "poly", "weight_decay": 0.0001, "aux_loss_weight": 0.4},
    },
    "gpu": {
        "scale": 1.0, "epochs": 60, "batch": 8, "baseline_lr": 0.01, "class_weights": "auto",
        "kubeseg": {"algorithm": "deeplab", "backbone": "resnet-50", "base_size": 480,
                    "crop_size": 360, "optimizer": "sgd", "learning_rate": 0.02,
                    "momentum": 0.9, "lr_scheduler": "poly", "weight_decay": 0.0001,
                    "aux_loss_weight": 0.4},
    },
}

# The torchvision side's fixed rate (SGD, momentum 0.9) in --preset runs, as in both modes.
BASELINE_LR = 0.01
CAMVID_LONG_SIDE = 480

logger = logging.getLogger("quality_camvid")


# --------------------------------------------------------------------------------------------
# data
def _pairs(data: Path, split: str) -> List[tuple]:
    images = sorted(p for p in (data / split).iterdir() if p.suffix.lower() in
                    (".jpg", ".jpeg", ".png"))
    return [(p, data / f"{split}_annotation" / f"{p.stem}.png") for p in images]


class ResizedFolder(torch.utils.data.Dataset):
    """Images and masks of one split, plainly resized to ``size`` (w, h): the baseline's data."""

    def __init__(self, data: Path, split: str, size, label_map_dir: Path, mean, std):
        from kubeseg.data.labelmap import LabelMap

        self.pairs = _pairs(data, split)
        self.size = size
        self.label_map = LabelMap.load(str(label_map_dir), split="train")
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int):
        from PIL import Image

        image_path, mask_path = self.pairs[i]
        image = Image.open(image_path).convert("RGB").resize(self.size, Image.BILINEAR)
        mask = Image.open(mask_path).resize(self.size, Image.NEAREST)
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        y = torch.from_numpy(self.label_map.apply(np.asarray(mask, dtype=np.uint8)).astype(
            np.int64))
        return (x - self.mean) / self.std, y


# --------------------------------------------------------------------------------------------
# scoring shared by both sides
@torch.inference_mode()
def score(model: torch.nn.Module, data: Path, scale: float, num_classes: int,
          device: torch.device) -> Dict[str, float]:
    """Whole validation images, network input resized by ``scale``, logits back to the label
    size, one confusion matrix: exactly what kubeseg.engine.evaluate does for kubeseg's side."""
    from kubeseg.data.channels import Channels
    from kubeseg.data.datasets import build_dataset
    from kubeseg.data.transforms import EvalTransform
    from kubeseg.inference import predict_logits
    from kubeseg.metrics import ConfusionMatrix

    channels = Channels(validation=str(data / "validation"),
                        validation_annotation=str(data / "validation_annotation"),
                        label_map=str(data / "label_map"))
    dataset = build_dataset(channels, "validation", EvalTransform(crop_size=None))
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, num_workers=1)
    model.eval()
    cm = ConfusionMatrix(num_classes, device=device)
    for image, mask in loader:
        logits = predict_logits(model, image.to(device), scales=(scale,))
        cm.update(logits.argmax(1), mask.to(device))
    return cm.compute()


# --------------------------------------------------------------------------------------------
# torchvision baseline
def train_baseline(data: Path, preset: dict, epochs: int, device: torch.device, seed: int,
                   pretrained: Optional[str], workers: int) -> torch.nn.Module:
    from torchvision.models.segmentation import deeplabv3_resnet50

    from kubeseg.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    torch.manual_seed(seed)
    model = deeplabv3_resnet50(weights=None, weights_backbone=None,
                               num_classes=len(CAMVID_CLASSES), aux_loss=False)
    if pretrained:
        from kubeseg import storage
        import io

        state = torch.load(io.BytesIO(storage.read_bytes(pretrained)), map_location="cpu",
                           weights_only=True)
        missing, unexpected = model.backbone.load_state_dict(state, strict=False)
        logger.info("torchvision backbone initialised from %s (unused keys: %s)", pretrained,
                    ", ".join(unexpected) or "none")
    model.to(device)
    scale = preset["scale"]
    size = (int(round(480 * scale)), int(round(360 * scale)))
    dataset = ResizedFolder(data, "train", size, data / "label_map", IMAGENET_MEAN,
                            IMAGENET_STD)
    generator = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=preset["batch"], shuffle=True,
                                         drop_last=True, num_workers=workers,
                                         generator=generator)
    optimizer = torch.optim.SGD(model.parameters(), lr=preset["baseline_lr"], momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss(ignore_index=255)
    for epoch in range(1, epochs + 1):
        model.train()
        start, total, steps = time.perf_counter(), 0.0, 0
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            loss = loss_fn(model(x)["out"], y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item()
            steps += 1
            if steps % 15 == 0:
                logger.info("torchvision epoch %d/%d iter %d/%d loss %.4f", epoch, epochs,
                            steps, len(loader), total / steps)
        logger.info("torchvision epoch %d/%d: loss %.4f, %.1f s", epoch, epochs,
                    total / max(steps, 1), time.perf_counter() - start)
    return model


# --------------------------------------------------------------------------------------------
def kubeseg_hyperparameters(preset: dict, epochs: int, class_weights: str,
                            num_train: int, pretrained: bool, seed: int,
                            overrides: Dict[str, str]):
    from kubeseg.config import Hyperparameters

    values = dict(preset["kubeseg"])
    values.update({"num_classes": len(CAMVID_CLASSES), "num_training_samples": num_train,
                   "epochs": epochs, "mini_batch_size": preset["batch"],
                   "validation_mini_batch_size": 1, "use_pretrained_model": pretrained,
                   "class_weights": "" if class_weights == "none" else class_weights,
                   "seed": seed})
    values.update(overrides)
    return Hyperparameters.from_dict(values)


def preset_recipe(name: str, epochs: Optional[int], class_weights: Optional[str],
                  num_train: int, pretrained: bool, seed: int, overrides: Dict[str, str]):
    """kubeseg's Hyperparameters from the named preset (as `kubeseg train --preset` builds
    them), and the budget both sides share: the preset's scale, epochs and batch size."""
    from kubeseg.presets import hyperparameters_with_preset

    values = {"num_classes": len(CAMVID_CLASSES), "num_training_samples": num_train,
              "seed": seed, "use_pretrained_model": pretrained}
    if epochs:
        values["epochs"] = epochs
    if class_weights:
        values["class_weights"] = "" if class_weights == "none" else class_weights
    hp = hyperparameters_with_preset(name, {**values, **overrides})
    recipe = {"scale": hp.base_size / CAMVID_LONG_SIDE, "epochs": hp.epochs,
              "batch": hp.mini_batch_size, "baseline_lr": BASELINE_LR}
    return hp, recipe


def build_parser() -> argparse.ArgumentParser:
    from kubeseg.presets import PRESETS as NAMED_PRESETS

    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Modes: " + "; ".join(f"{m}: scale {p['scale']}, {p['epochs']} epochs, batch "
                                      f"{p['batch']}, kubeseg {p['kubeseg']}"
                                      for m, p in PRESETS.items()))
    parser.add_argument("--mode", choices=tuple(PRESETS), default="cpu",
                        help="cpu: quarter resolution, from scratch (default); gpu: full "
                             "resolution")
    parser.add_argument("--preset", choices=tuple(NAMED_PRESETS),
                        help="train kubeseg's side with this kubeseg preset instead of a mode "
                             "(both sides get its scale, epochs and batch size)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help=f"CamVid folder (default: {DEFAULT_DATA})")
    parser.add_argument("--work", type=Path, default=Path("/tmp/kubeseg-quality-camvid"),
                        help="run folders go here (default: /tmp/kubeseg-quality-camvid)")
    parser.add_argument("--epochs", type=int, help="override the preset's epochs (both sides)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda (default: auto)")
    parser.add_argument("--workers", type=int, default=1, help="data-loading processes")
    parser.add_argument("--seed", type=int, default=0, help="random seed of both sides")
    parser.add_argument("--pretrained-weights", metavar="URI",
                        help="the backbone's published ImageNet state dict (kubeseg's "
                             "backbone; the torchvision baseline's too when it is a ResNet-50 "
                             "one); default: both from scratch")
    parser.add_argument("--pretrained-arm", action="store_true",
                        help="with --pretrained-weights: train kubeseg's recipe twice, from "
                             "scratch and from the weights, side by side in this run")
    parser.add_argument("--class-weights", choices=("auto", "none"),
                        help="kubeseg's class_weights: auto (square-root median frequency "
                             "from the training split) or none (default: the preset's)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        dest="assignments", help="override a kubeseg hyperparameter")
    parser.add_argument("--skip-baseline", action="store_true",
                        help="train only kubeseg (for trying recipes)")
    return parser


def roofline_lines(caps: dict, device: torch.device, sides: Sequence[tuple]) -> List[str]:
    """The hardware block: capabilities, calibrated limit, and per side (label, model, input
    shape (N, C, H, W), training images/s) the FLOPs per image and the fraction of the limit
    reached. Training FLOPs are taken as 3x the forward pass (forward + backward)."""
    from roofline import calibrate_conv, describe, model_flops, report_line

    limit = calibrate_conv(str(device))
    lines = [describe(caps, limit, device=str(device))]
    for label, model, shape, images_per_s in sides:
        model.eval()
        flops = 3 * model_flops(model, shape)
        lines.append(f"{label}: {flops / 1e9:.2f} GFLOPs per training image "
                     f"({shape[2]}x{shape[3]}, 3x forward), {images_per_s:.2f} images/s")
        lines.append(report_line(label, flops, images_per_s, limit))
    return lines


def run_kubeseg(hp, args, run_dir: Path, device: torch.device, scale: float,
                pretrained_uri: Optional[str] = None, name: str = "kubeseg"):
    """Train kubeseg on the train channels only with ``kubeseg train``'s engine (the backbone
    from ``pretrained_uri`` when given), then score the artifact once on the validation split
    at ``scale``. Files go to ``run_dir/name``. Returns (TrainResult, metrics, training
    seconds, evaluation seconds)."""
    from kubeseg.data.channels import Channels
    from kubeseg.engine.evaluate import EvalOptions, Scoring, evaluate
    from kubeseg.engine.train import TrainOptions, train

    start = time.perf_counter()
    channels = Channels(train=str(args.data / "train"),
                        train_annotation=str(args.data / "train_annotation"),
                        label_map=str(args.data / "label_map"))
    result = train(hp, channels, str(run_dir / name), pretrained_uri=pretrained_uri,
                   device=str(device), class_names=CAMVID_CLASSES,
                   options=TrainOptions(workers=args.workers, log_every=15))
    train_s = time.perf_counter() - start
    val_channels = Channels(validation=str(args.data / "validation"),
                            validation_annotation=str(args.data / "validation_annotation"),
                            label_map=str(args.data / "label_map"))
    start = time.perf_counter()
    # a model trained with inference_size=base_size is scored at its scale already
    scales = (1.0,) if hp.inference_long_side else (scale,)
    metrics = evaluate(result.artifact_uri, val_channels, str(run_dir / name / "eval"),
                       scoring=Scoring(tile_size=None, scales=scales), device=str(device),
                       options=EvalOptions(num_overlays=4, workers=args.workers)).metrics
    return result, metrics, train_s, time.perf_counter() - start


def kubeseg_arms(hp, args) -> List[tuple]:
    """(name, hyperparameters, pretrained weights URI) of each kubeseg side to train: one, or
    with --pretrained-arm the same recipe from scratch and from the ImageNet weights."""
    if not args.pretrained_arm:
        return [("kubeseg", hp, args.pretrained_weights)]
    return [("kubeseg", hp.replace(use_pretrained_model=False), None),
            ("kubeseg-imagenet", hp.replace(use_pretrained_model=True),
             args.pretrained_weights)]


def train_arms(hp, args, run_dir: Path, device: torch.device, scale: float) -> List[dict]:
    """Train and score every kubeseg arm; one dict per arm (what result_lines prints)."""
    from kubeseg.artifact import read_info

    arms = []
    for name, arm_hp, weights in kubeseg_arms(hp, args):
        result, scores, train_s, eval_s = run_kubeseg(arm_hp, args, run_dir, device, scale,
                                                      weights, name)
        arms.append({"name": name, "hp": arm_hp, "result": result, "scores": scores,
                     "train_s": train_s, "eval_s": eval_s, "pretrained": weights,
                     "class_weights": read_info(result.artifact_uri).class_weights})
    return arms


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    from roofline import cpu_capabilities, describe

    if not (args.data / "train").is_dir():
        parser.error(f"CamVid not found at {args.data} (expected train/, train_annotation/, "
                     "validation/, validation_annotation/, label_map/)")
    if args.pretrained_arm and not args.pretrained_weights:
        parser.error("--pretrained-arm needs --pretrained-weights (the ImageNet state dict)")
    caps = cpu_capabilities()
    logger.info("%s", describe(caps))
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    num_train = len(_pairs(args.data, "train"))
    label, preset, hp = resolve_recipe(args, num_train)
    run_dir = args.work / time.strftime(f"{label}-%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    logger.info("run folder %s; kubeseg hyperparameters: %s", run_dir,
                json.dumps(hp.to_dict(), sort_keys=True))

    arms = train_arms(hp, args, run_dir, device, preset["scale"])
    crop = hp.effective_crop_size
    trained_images = hp.epochs * (num_train // hp.mini_batch_size) * hp.mini_batch_size
    sides = [(arm["name"], arm["result"].model, (1, 3, crop, crop),
              trained_images / arm["train_s"]) for arm in arms]
    baseline = None
    if not args.skip_baseline:
        baseline = run_baseline(args, preset, hp, device, num_train)
        sides.append(baseline["side"])
    lines = ["", *roofline_lines(caps, device, sides)]
    lines += result_lines(label, preset, hp, num_train, args, device, arms, baseline)
    lines.append(f"kubeseg report: {run_dir / arms[0]['name'] / 'eval' / 'report.html'}; "
                 f"model: {arms[0]['result'].artifact_uri}")
    print("\n".join(lines), flush=True)
    _write_atomic(run_dir / "result.json",
                  json.dumps(summary(args, hp, device, caps, arms, baseline), indent=2))
    return 0


def resolve_recipe(args, num_train: int):
    """(label, preset dict with scale/epochs/batch, kubeseg Hyperparameters) from --preset or
    --mode, --epochs, --class-weights and --set."""
    from kubeseg.config import parse_assignments

    overrides = parse_assignments(args.assignments)
    if args.preset:
        hp, preset = preset_recipe(args.preset, args.epochs, args.class_weights, num_train,
                                   bool(args.pretrained_weights), args.seed, overrides)
        return args.preset, preset, hp
    preset = PRESETS[args.mode]
    hp = kubeseg_hyperparameters(preset, args.epochs or preset["epochs"],
                                 args.class_weights or preset["class_weights"], num_train,
                                 bool(args.pretrained_weights), args.seed, overrides)
    return args.mode, preset, hp


def run_baseline(args, preset: dict, hp, device: torch.device, num_train: int) -> dict:
    """Train and score torchvision's deeplabv3_resnet50 (with --pretrained-weights only when
    they are a ResNet-50's, as kubeseg's backbone is then)."""
    weights = args.pretrained_weights if hp.backbone == "resnet-50" else None
    start = time.perf_counter()
    model = train_baseline(args.data, preset, hp.epochs, device, args.seed, weights,
                           args.workers)
    train_s = time.perf_counter() - start
    scores = score(model, args.data, preset["scale"], len(CAMVID_CLASSES), device)
    images = hp.epochs * (num_train // preset["batch"]) * preset["batch"]
    shape = (1, 3, int(round(360 * preset["scale"])), int(round(480 * preset["scale"])))
    return {"scores": scores, "train_s": train_s,
            "side": ("torchvision", _BaselineOut(model), shape, images / train_s)}


def summary(args, hp, device, caps, arms: List[dict], baseline: Optional[dict]) -> dict:
    """What result.json records: each side's scores, times and settings."""
    def side(arm: dict) -> dict:
        ours = arm["scores"]
        return {"mIOU": ours["mIOU"], "pixel_accuracy": ours["pixel_accuracy"],
                "train_s": arm["train_s"], "eval_s": arm["eval_s"],
                "pretrained_weights": arm["pretrained"],
                "hyperparameters": arm["hp"].to_dict(), "class_weights": arm["class_weights"],
                "per_class_iou": ours["per_class_iou"]}

    out = {"mode": args.mode if not args.preset else None, "preset": args.preset,
           "epochs": hp.epochs, "device": str(device), "cpu": caps}
    for arm in arms:
        out[arm["name"]] = side(arm)
    out["torchvision"] = None if baseline is None else {
        "mIOU": baseline["scores"]["mIOU"],
        "pixel_accuracy": baseline["scores"]["pixel_accuracy"],
        "train_s": baseline["train_s"], "per_class_iou": baseline["scores"]["per_class_iou"]}
    return out


class _BaselineOut(torch.nn.Module):
    """torchvision's model returns a dict; FLOP counting only needs a forward pass."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)["out"]


def result_lines(label: str, preset: dict, hp, num_train: int, args, device,
                 arms: List[dict], torchvision: Optional[dict]) -> List[str]:
    """The printed result: mIoU, pixel accuracy, wall times, per-class IoU, the references.
    ``arms``: one dict per kubeseg side (name, hp, scores, train_s, eval_s, pretrained,
    class_weights); ``torchvision``: scores, train_s."""
    baseline = torchvision and torchvision["scores"]
    # the scale images are scored at: the model's own base_size, else the mode's
    scale = hp.base_size / CAMVID_LONG_SIDE if hp.inference_long_side else preset["scale"]
    res = f"{int(round(480 * scale))}x{int(round(360 * scale))}"
    init = ("from scratch and ImageNet backbone" if args.pretrained_arm else
            "ImageNet backbone" if args.pretrained_weights else "from scratch")
    recipe = f"preset {label}" if args.preset else "our recipe"
    lines = [
        f"CamVid quality benchmark, {'preset' if args.preset else 'mode'} {label}: network "
        f"input {res}, {hp.epochs} epochs, batch {hp.mini_batch_size}, {num_train} train / 101 "
        f"validation images, {init}, device {device}",
        f"{'model':52s} {'mIoU':>7s} {'pix acc':>8s} {'train s':>8s} {'eval s':>7s}"]
    for arm in arms:
        start = "ImageNet" if arm["pretrained"] else "scratch"
        name = f"kubeseg {hp.algorithm}/{hp.backbone}/{hp.output_stride} ({recipe}, {start})"
        ours = arm["scores"]
        lines.append(f"{name:52s} {ours['mIOU']:7.4f} {ours['pixel_accuracy']:8.4f} "
                     f"{arm['train_s']:8.0f} {arm['eval_s']:7.0f}")
    if baseline is not None:
        ours = arms[0]["scores"]
        lines.append(f"{'torchvision deeplabv3_resnet50 (plain recipe)':52s} "
                     f"{baseline['mIOU']:7.4f} {baseline['pixel_accuracy']:8.4f} "
                     f"{torchvision['train_s']:8.0f}")
        lines.append(f"ratio kubeseg / torchvision mIoU: {ours['mIOU'] / baseline['mIOU']:.2f}x"
                     f"  (training time ratio "
                     f"{arms[0]['train_s'] / torchvision['train_s']:.2f}x)")
    if len(arms) == 2:
        scratch, imagenet = (arm["scores"]["mIOU"] for arm in arms)
        lines.append(f"ImageNet / from scratch: mIoU {imagenet:.4f} / {scratch:.4f} "
                     f"({100 * (imagenet - scratch):+.1f} points), training time "
                     f"{arms[1]['train_s'] / arms[0]['train_s']:.2f}x")
    lines.append("published CamVid mIoU (SPEC section 7; test split at 360x480, void excluded): "
                 + ", ".join(f"{ref} {value:.1f}" for ref, value in REFERENCE))
    sides = [(arm["name"], arm["scores"]) for arm in arms] + [("torchvision", baseline)]
    for side, scores in sides:
        if scores is not None:
            lines.append(f"per-class IoU ({side}): " + ", ".join(
                f"{n} {'n/a' if v is None else format(v, '.2f')}"  # None: class never seen
                for n, v in zip(CAMVID_CLASSES, scores["per_class_iou"])))
    weights = arms[0]["class_weights"]
    lines.append(f"kubeseg class_weights={hp.to_dict()['class_weights'] or 'none'}: " + (
        ", ".join(f"{n} {w:.4f}" for n, w in zip(CAMVID_CLASSES, weights))
        if weights else "unweighted"))
    return lines


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
