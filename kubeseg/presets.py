"""Named hyperparameter presets: tested starting points that explicit values override.

A preset fills in the recipe (network, resolution, schedule, optimiser, loss weighting) but never
the dataset's own numbers (``num_classes``, ``num_training_samples``). Precedence, lowest first:
the :class:`~kubeseg.config.Hyperparameters` defaults, the preset, a hyperparameter JSON file,
``--set name=value``.
"""
from __future__ import annotations

import difflib
import textwrap
from types import MappingProxyType
from typing import Any, Mapping, Optional

from kubeseg.config import Hyperparameters, json_values
from kubeseg.errors import ConfigError

# cpu-quality: from scratch on 2 CPU cores, well within an hour, judged on CamVid's validation
# split (bench/quality_camvid.py --preset cpu-quality; figures in the README: 0.536 mIoU after
# 27 minutes of training on 2 quiet AVX2 cores, about 66 s an epoch). Half resolution
# (base_size 240: 240x180 for a 480x360 image) gives poles, signs and pedestrians a few pixels;
# FCN over DeepLab's ASPP, Adam with a poly decay and square-root median-frequency class weights
# each won several mIoU points when tried one at a time at 120x90 and are kept. Crop 128 keeps
# an epoch near a minute at this resolution (the output stride is fixed at 8, so stages 3-4
# dominate); 24 epochs instead of 8 took validation mIoU from 0.381 to 0.536, and leave room
# for a machine twice as slow inside the hour. inference_size=base_size scores whole images at
# the centre of the training scales (240 px long): after 8 epochs that gave 0.374 validation
# mIoU against 0.325 at CamVid's own 480x360, in a third of the time.
#
# cpu-pretrained and cpu-fast start from EfficientNet-Lite0's published ImageNet weights (pass
# efficientnet-lite0-57934424.pth with --pretrained-weights; there is no download). At output
# stride 16 the backbone costs a fraction of a stride-8 ResNet-18, so they afford CamVid's full
# 480x360 (cpu-pretrained) or two thirds of it (cpu-fast): thin classes keep their pixels.
# Both use Lite R-ASPP (it fuses the stride-8 features) with Adam at 1e-3. Measured with
# bench/quality_camvid.py on 2 quiet AVX512 cores: cpu-pretrained's 22 epochs took 1153 s of
# training (about 52 s an epoch) for 0.671 CamVid validation mIoU (Pole 0.11, SignSymbol 0.42,
# Pedestrian 0.41); the same recipe for 12 epochs gave 0.621. A DeepLabV3+ variant (stride-4
# fusion, learning rate 5e-4) costs about 3.3 minutes an epoch (9 epochs in 30 minutes) and
# reached 0.419 after 3 epochs; it was not trained longer. Lite R-ASPP fusing the stride-4
# features instead (0.661, Pole 0.09) and base_size 720 (0.657, Pole 0.14) did no better, each
# in about 1100 s. On 2 AVX2 cores (no AVX512) an epoch of cpu-pretrained took about 141 s,
# so its 22 epochs took about 52 minutes there (130 s an epoch, about 48 minutes, once
# training computed the dilated depthwise convolutions phase-split); crop 256 for 18 epochs
# fit 30 minutes (1815 s) but reached 0.613. cpu-fast, measured on 2 quiet AVX2 cores (the
# kind cpu-quality's figure came from): 8 epochs at base_size 320 took 815 s of training for
# 0.577 CamVid validation mIoU (Pole 0.02, SignSymbol 0.28, Pedestrian 0.27), above
# cpu-quality's 0.536; the recipe before it, 6 epochs at base_size 360, took 622 s for 0.565
# there (0.566 on the AVX512 machine).
# Trained again once a CPU trained the dilated depthwise convolutions phase-split
# (kubeseg/models/phase_split.py): 659 s for 0.581 (Pole 0.02, SignSymbol 0.28, Pedestrian
# 0.26) on the same cores.
# Scoring at 320 also serves faster: its int8 model at 4.1x cpu-quality's float32 req/s with
# bench/serve.py's rounds paired side by side on those cores (docs/models.md).
#
# cpu-serve is cpu-fast's recipe at long side 256, for when serving costs more than accuracy:
# the cheapest model measured that still scores above cpu-quality. On the same AVX2 cores, 8
# epochs took 750 s of training for 0.558 CamVid validation mIoU (Pole 0.01, SignSymbol 0.16,
# Pedestrian 0.25); its int8 model (99.40% argmax agreement) served at 5.19x and 5.30x
# cpu-quality's float32 req/s in two runs with paired rounds, where cpu-fast's gave 4.06x and
# base_size 288 4.67x (docs/models.md).
#
# cpu-scratch: cpu-quality's recipe at three quarters of CamVid's resolution (base_size 360,
# crop 192) for 40 epochs, for an hour from scratch. Measured with bench/quality_camvid.py on 2
# quiet AVX512 cores: 2924 s of training (about 72 s an epoch) for 0.599 CamVid validation mIoU
# (Pole 0.03, SignSymbol 0.25, Pedestrian 0.23). A machine much slower than that one runs past
# the hour; cpu-quality, at 27 minutes, leaves room for a machine twice as slow.
_CPU_QUALITY = {
    "algorithm": "fcn", "backbone": "resnet-18", "use_pretrained_model": False,
    "base_size": 240, "crop_size": 128, "epochs": 24, "mini_batch_size": 8,
    "validation_mini_batch_size": 1, "optimizer": "adam", "learning_rate": 0.001,
    "lr_scheduler": "poly", "weight_decay": 0.0001, "class_weights": "auto",
    "aux_loss_weight": 0.4, "inference_size": "base_size",
}
_CPU_FAST = {
    "algorithm": "lraspp", "backbone": "efficientnet-lite0", "output_stride": 16,
    "use_pretrained_model": True, "base_size": 320, "crop_size": 256, "epochs": 8,
    "mini_batch_size": 8, "validation_mini_batch_size": 1, "optimizer": "adam",
    "learning_rate": 0.001, "lr_scheduler": "poly", "weight_decay": 0.0001,
    "class_weights": "auto", "aux_loss_weight": 0.4, "inference_size": "base_size",
}
PRESETS: Mapping[str, Mapping[str, Any]] = MappingProxyType({
    "cpu-fast": MappingProxyType(_CPU_FAST),
    "cpu-serve": MappingProxyType({**_CPU_FAST, "base_size": 256}),
    "cpu-pretrained": MappingProxyType({
        "algorithm": "lraspp", "backbone": "efficientnet-lite0", "output_stride": 16,
        "use_pretrained_model": True, "base_size": 480, "crop_size": 320, "epochs": 22,
        "mini_batch_size": 8, "validation_mini_batch_size": 1, "optimizer": "adam",
        "learning_rate": 0.001, "lr_scheduler": "poly", "weight_decay": 0.0001,
        "class_weights": "auto", "aux_loss_weight": 0.4, "inference_size": "base_size",
    }),
    "gpu-quality": MappingProxyType({
        "algorithm": "deeplabv3plus", "backbone": "convnext-tiny", "output_stride": 16,
        "use_pretrained_model": True, "crop_size": 480, "epochs": 60, "mini_batch_size": 16,
        "validation_mini_batch_size": 1, "optimizer": "adam", "learning_rate": 0.0001,
        "lr_scheduler": "poly", "weight_decay": 0.0001, "class_weights": "auto",
        "aux_loss_weight": 0.4, "precision_dtype": "bfloat16",
    }),
    "cpu-quality": MappingProxyType(_CPU_QUALITY),
    "cpu-scratch": MappingProxyType({**_CPU_QUALITY, "base_size": 360, "crop_size": 192,
                                     "epochs": 40}),
})

DESCRIPTIONS: Mapping[str, str] = MappingProxyType({
    "cpu-fast": "Lite R-ASPP / EfficientNet-Lite0 at output stride 16 from ImageNet weights "
                "(--pretrained-weights efficientnet-lite0-57934424.pth), two thirds of "
                "CamVid's resolution (long side 320): sized for 15 minutes of training on 2 "
                "CPU cores for a CamVid-sized dataset (367 images); measured: 0.577 CamVid "
                "validation mIoU after 14 minutes (815 s) of training on 2 quiet AVX2 cores "
                "(0.581 after 11 minutes with training's phase-split dilated convolutions).",
    "cpu-serve": "cpu-fast's recipe (and its weights file) at long side 256: the cheapest to "
                 "serve on a CPU that still scores above cpu-quality; measured: 0.558 CamVid "
                 "validation mIoU after 750 s of training on 2 quiet AVX2 cores, its int8 "
                 "model serving at 5.2x-5.3x cpu-quality's float32 requests a second there.",
    "cpu-pretrained": "Lite R-ASPP / EfficientNet-Lite0 at output stride 16 from ImageNet "
                      "weights (--pretrained-weights efficientnet-lite0-57934424.pth) at "
                      "CamVid's full 480x360: sized for 30 minutes of training on 2 CPU cores "
                      "for a CamVid-sized dataset (367 images); measured: 0.671 CamVid "
                      "validation mIoU after 19 minutes of training on 2 quiet AVX512 cores "
                      "(2 AVX2 cores take about 48 minutes).",
    "gpu-quality": "DeepLabV3+ / ConvNeXt-Tiny at output stride 16 from torchvision's "
                   "ImageNet weights (downloaded, or --pretrained-weights), bfloat16 mixed "
                   "precision: the recipe to start from on one GPU. Not measured: no GPU was "
                   "available where the presets were tuned.",
    "cpu-quality": "FCN/ResNet-18 from scratch at half resolution, and scored there "
                   "(validation, evaluation and serving rescale an image's long side to "
                   "base_size): under an hour of training on 2 CPU cores for a CamVid-sized "
                   "dataset (367 images); measured: 0.536 CamVid validation mIoU after 27 "
                   "minutes on 2 quiet AVX2 cores.",
    "cpu-scratch": "FCN/ResNet-18 from scratch at three quarters of CamVid's resolution "
                   "(base_size 360), scored there, 40 epochs: an hour of training on 2 CPU "
                   "cores for a CamVid-sized dataset (367 images); measured: 0.599 CamVid "
                   "validation mIoU after 49 minutes on 2 quiet AVX512 cores.",
})


def preset_values(name: str) -> "dict[str, Any]":
    """The hyperparameter values of preset ``name``; a ConfigError names the presets there are."""
    if name not in PRESETS:
        close = difflib.get_close_matches(name, list(PRESETS), n=1, cutoff=0.6)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError([f"preset {name!r} is unknown{hint}; choose one of "
                           f"{', '.join(PRESETS)}"], what="option")
    return dict(PRESETS[name])


def hyperparameters_with_preset(name: Optional[str], overrides: Mapping[str, Any],
                                json_text: Optional[str] = None,
                                source: str = "hyperparameter JSON") -> Hyperparameters:
    """Hyperparameters from preset ``name`` (or none), then ``json_text``, then ``overrides``.

    Every value is parsed and checked by :meth:`Hyperparameters.from_dict`, so a bad one is
    reported with its allowed range whichever layer it came from.
    """
    values = preset_values(name) if name else {}
    if json_text is not None:
        values.update(json_values(json_text, source))
    values.update(overrides)
    return Hyperparameters.from_dict(values)



def describe_presets() -> str:
    """One paragraph per preset: what it is for and its values (for --help and the docs)."""
    return "\n".join(
        textwrap.fill(f"{name}: {DESCRIPTIONS[name]} "
                      + ", ".join(f"{key}={value}" for key, value in values.items()),
                      width=90, subsequent_indent="  ")
        for name, values in PRESETS.items())
