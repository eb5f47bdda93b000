"""The model table: for each algorithm x backbone pair worth training, its parameters and GFLOPs
at 512x512, merged with what bench/quality_camvid.py and bench/serve.py measured for it.

Parameters and FLOPs are counted here (torch's FlopCounterMode, one forward pass in eval mode,
the auxiliary head left out: it only runs in training). CamVid results come from the
``result.json`` files that bench/quality_camvid.py writes into its run folders
(``--quality``), serving rates from bench/serve.py's ``--models`` table saved to a file
(``--serving``). Prints a Markdown table (docs/models.md holds the one measured last)::

    python bench/model_table.py
    python bench/model_table.py --quality /tmp/kubeseg-quality-camvid/*/result.json \\
        --serving serve-models.md
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

CAMVID_CLASSES = ["Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence",
                  "Car", "Pedestrian", "Bicyclist"]
# (algorithm, backbone, output stride): the reference's families on the CPU-sized ResNet, and
# the new decoders on the efficient backbones, at the strides they are meant for
PAIRS: Tuple[Tuple[str, str, int], ...] = (
    ("fcn", "resnet-18", 8), ("deeplab", "resnet-18", 8), ("fcn", "resnet-50", 8),
    ("deeplab", "resnet-50", 8), ("deeplabv3plus", "resnet-50", 16),
    ("lraspp", "mobilenet-v3-large", 16), ("deeplabv3plus", "mobilenet-v3-large", 16),
    ("lraspp", "efficientnet-lite0", 16), ("deeplabv3plus", "efficientnet-lite0", 16),
    ("deeplabv3plus", "efficientnet-lite0", 8), ("fcn", "efficientnet-lite0", 16),
    ("deeplabv3plus", "convnext-tiny", 16), ("lraspp", "convnext-tiny", 16),
)


def count(algorithm: str, backbone: str, output_stride: int, size: int,
          num_classes: int) -> Tuple[float, float]:
    """(parameters, FLOPs of one forward pass at size x size) of a model without aux head."""
    import torch
    from roofline import model_flops

    from kubeseg.models import build_model

    model = build_model(algorithm=algorithm, backbone=backbone, num_classes=num_classes,
                        aux_loss=False, output_stride=output_stride).eval()
    params = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        flops = model_flops(model, (1, 3, size, size))
    return float(params), float(flops)


def read_quality(paths: Sequence[str]) -> Dict[Tuple[str, str, int], dict]:
    """The best CamVid result per (algorithm, backbone, output stride, pretrained)."""
    best: Dict[tuple, dict] = {}
    for path in paths:
        result = json.loads(Path(path).read_text())
        # "kubeseg", and "kubeseg-imagenet" of a --pretrained-arm run
        for ours in (v for k, v in result.items() if k.startswith("kubeseg") and v):
            hp = ours["hyperparameters"]
            key = (hp["algorithm"], hp["backbone"], hp.get("output_stride", 8))
            entry = {"miou": ours["mIOU"], "per_class": ours["per_class_iou"],
                     "train_s": ours["train_s"], "epochs": hp["epochs"],
                     "pretrained": hp["use_pretrained_model"], "preset": result.get("preset"),
                     "source": str(path)}
            if key not in best or entry["miou"] > best[key]["miou"]:
                best[key] = entry
    return best


def read_serving(path: Optional[str]) -> Dict[Tuple[str, str, int], Dict[str, float]]:
    """req/s by model and precision from bench/serve.py --models' Markdown table."""
    rates: Dict[Tuple[str, str, int], Dict[str, float]] = {}
    if not path:
        return rates
    for line in Path(path).read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 7 or cells[0] in ("model", "---"):
            continue
        algorithm, backbone, stride = cells[0].split(" ")[0].split("/")
        rates.setdefault((algorithm, backbone, int(stride)), {})[cells[1]] = float(cells[4])
    return rates


def rows(size: int, quality: dict, serving: dict) -> List[str]:
    out = [f"| algorithm | backbone | output stride | parameters (M) | GFLOPs at {size}x{size} "
           "| float32 req/s | int8 req/s | CamVid val mIoU | Pole / SignSymbol / Pedestrian IoU "
           "| training (epochs, s) |", "|" + "---|" * 10]
    for algorithm, backbone, stride in PAIRS:
        params, flops = count(algorithm, backbone, stride, size, len(CAMVID_CLASSES))
        key = (algorithm, backbone, stride)
        rate = serving.get(key, {})
        q = quality.get(key)
        miou = thin = train = ""
        if q:
            per = dict(zip(CAMVID_CLASSES, q["per_class"]))
            miou = f"{q['miou']:.3f}" + (" (ImageNet)" if q["pretrained"] else "")
            thin = " / ".join(f"{per[c]:.2f}" for c in ("Pole", "SignSymbol", "Pedestrian"))
            train = f"{q['epochs']}, {q['train_s']:.0f}"
        out.append(f"| {algorithm} | {backbone} | {stride} | {params / 1e6:.2f} | "
                   f"{flops / 1e9:.1f} | {rate.get('float32', '')} | {rate.get('int8', '')} | "
                   f"{miou} | {thin} | {train} |")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512, help="image side for the FLOPs")
    parser.add_argument("--quality", nargs="*", default=[], metavar="RESULT_JSON",
                        help="result.json files of bench/quality_camvid.py runs")
    parser.add_argument("--serving", metavar="FILE",
                        help="the Markdown table bench/serve.py --models printed")
    args = parser.parse_args(argv)
    print("\n".join(rows(args.size, read_quality(args.quality), read_serving(args.serving))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
