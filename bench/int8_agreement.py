"""int8 settings side by side: argmax agreement with float32, mIoU and speed, in one run.

For a trained model artifact and a dataset root (default: ../shared/datasets/camvid), each
setting quantizes the artifact's model (kubeseg's own quantization, not stored in the artifact)
and is measured against float32 on ONNX Runtime:

- agreement and mIoU over the whole validation split, as ``kubeseg quantize --validation``
  measures them (images at the model's scoring side, logits resized to the annotation);
- speed: ms per image of the float32 and the int8 model on ``--timing-images`` validation
  images, the two sessions alternating round by round (``--rounds``), medians; the ratio is the
  reading to trust on a shared machine.

A setting is ``WEIGHT_RANGE/FLOAT_LAYERS[/int8-logits]``: a weight range of ``kubeseg quantize``
(portable, full, reduced), a number of float32 convolutions or ``auto`` (the search of
``kubeseg quantize``, on ``--check-images`` training images), and ``int8-logits`` to quantize
the logits' layers too. ``reduced/0/int8-logits`` is what ``kubeseg quantize`` made before it
had these choices::

    python bench/int8_agreement.py --model-uri /path/to/model
    python bench/int8_agreement.py --model-uri M --settings full/0 portable/12 portable/auto
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CAMVID = REPO.parent / "shared" / "datasets" / "camvid"
DEFAULT_SETTINGS = ("reduced/0/int8-logits", "full/0/int8-logits", "portable/0/int8-logits",
                    "portable/0", "reduced/auto", "full/auto", "portable/auto")


def parse_setting(text: str) -> dict:
    from kubeseg.serving.defaults import WEIGHT_RANGES

    parts = text.split("/")
    if (len(parts) not in (2, 3) or parts[0] not in WEIGHT_RANGES
            or not (parts[1] == "auto" or parts[1].isdigit())
            or parts[2:] not in ([], ["int8-logits"])):
        raise SystemExit(f"setting {text!r}: WEIGHT_RANGE/FLOAT_LAYERS[/int8-logits] with "
                         f"WEIGHT_RANGE in {WEIGHT_RANGES}, FLOAT_LAYERS a number or auto")
    return {"weight_range": parts[0],
            "float_layers": None if parts[1] == "auto" else int(parts[1]),
            "float_logits": len(parts) == 2}


def ms_per_image(sessions: dict, images: list, rounds: int) -> dict:
    """Median ms per image of each ONNX Runtime session, alternating them round by round."""
    from kubeseg.serving.onnx_model import INPUT_NAME

    times = {name: [] for name in sessions}
    for run in sessions.values():
        run.run(None, {INPUT_NAME: images[0]})  # warm-up
    for _ in range(rounds):
        for name, run in sessions.items():
            start = time.perf_counter()
            for image in images:
                run.run(None, {INPUT_NAME: image})
            times[name].append(1000 * (time.perf_counter() - start) / len(images))
    return {name: statistics.median(values) for name, values in times.items()}


def measure(setting: str, float_data: bytes, data: dict, args, info) -> dict:
    from kubeseg.serving import onnx_model as om

    started = time.perf_counter()
    int8_data, made = om.quantize_model(float_data, data["calibration"], data["checks"],
                                        threads=args.threads, **parse_setting(setting))
    seconds = time.perf_counter() - started
    float_session, int8_session = (om.session(d, args.threads) for d in (float_data, int8_data))
    miou, agreement = om.validation_scores(
        om.OnnxRuntimeModel(float_session), om.OnnxRuntimeModel(int8_session), args.data_root,
        mean=info.mean, std=info.std, num_classes=info.num_classes, max_side=data["side"])
    speed = ms_per_image({"float32": float_session, "int8": int8_session}, data["timing"],
                         args.rounds)
    return {"setting": setting, "float_layers": made["float_layers"],
            "convolutions": made["convolutions"], "agreement": agreement.argmax_agreement,
            "miou_float32": miou[0], "miou_int8": miou[1], "float32_ms": speed["float32"],
            "int8_ms": speed["int8"], "quantize_s": seconds}


def load_images(args, info) -> dict:
    from kubeseg.serving import onnx_model as om

    side = args.max_side or info.hyperparameters.inference_long_side or om.DEFAULT_MAX_SIDE
    load = lambda uri: om.load_tensor(uri, info.mean, info.std, side)  # noqa: E731
    calibration, checks = om.calibration_and_check_images(
        os.path.join(args.data_root, "train"), args.calibration_images, args.check_images, load)
    timing = [load(u)[None].numpy()
              for u in om.image_uris(os.path.join(args.data_root, "validation"),
                                     args.timing_images)]
    return {"side": side, "calibration": calibration, "checks": checks, "timing": timing}


def print_table(rows: list, header: str) -> None:
    print(header)
    print("| setting | float32 layers | argmax agreement | mIoU float32 -> int8 | "
          "float32 ms/image | int8 ms/image | int8 speed-up |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['setting']} | {r['float_layers']} of {r['convolutions']} | "
              f"{100 * r['agreement']:.2f}% | {r['miou_float32']:.4f} -> {r['miou_int8']:.4f} | "
              f"{r['float32_ms']:.1f} | {r['int8_ms']:.1f} | "
              f"{r['float32_ms'] / r['int8_ms']:.2f}x |", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-uri", required=True, help="trained model artifact")
    parser.add_argument("--data-root", default=str(CAMVID),
                        help="dataset root with train/, validation/ and validation_annotation/ "
                             "(default: %(default)s)")
    parser.add_argument("--settings", nargs="+", default=list(DEFAULT_SETTINGS),
                        help="WEIGHT_RANGE/FLOAT_LAYERS[/int8-logits] (default: %(default)s)")
    parser.add_argument("--calibration-images", type=int, default=32)
    parser.add_argument("--check-images", type=int, default=16)
    parser.add_argument("--timing-images", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-side", type=int, default=None,
                        help="long side images are scored at (default: the model's)")
    args = parser.parse_args(argv)
    for setting in args.settings:
        parse_setting(setting)
    sys.path.insert(0, str(REPO))
    import logging

    from kubeseg.artifact import read_info
    from kubeseg.device import cpu_description
    from kubeseg.serving.onnx_model import float_onnx

    logging.basicConfig(level=logging.WARNING)
    info = read_info(args.model_uri)
    float_data = float_onnx(args.model_uri)
    data = load_images(args, info)
    header = (f"{args.model_uri}: {info.hyperparameters.algorithm} / "
              f"{info.hyperparameters.backbone}, images at long side {data['side']}; "
              f"{cpu_description()[0]}, {args.threads} threads, load average before "
              f"{os.getloadavg()[0]:.1f}")
    print(header, flush=True)
    rows = []
    for setting in args.settings:
        rows.append(measure(setting, float_data, data, args, info))
        print(f"{setting}: {rows[-1]}", flush=True)
    print_table(rows, f"load average after {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
