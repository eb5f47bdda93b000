"""ONNX export, ONNX Runtime inference and int8 post-training quantization of a model artifact.

Files added to the artifact's current version (:func:`kubeseg.artifact.add_files`)::

    model.onnx        the float32 model: input "image" [N, 3, H, W] normalised with kubeseg.json's
                      mean/std, output "logits" [N, C, H, W]; N, H and W are dynamic
    model.int8.onnx   int8 weights (per output channel) and uint8 activations, static QDQ
                      quantization calibrated on training images, its first layers float32
                      where agreement with float32 needs it (:mod:`kubeseg.serving.int8`)
    model.int8.json   how it was made (weight range, float32 layers, the search) and what it
                      was checked against: its argmax agreement with the float32 model and,
                      with an annotated validation set, the mIoU of both

Any ONNX Runtime can run the files without kubeseg (``onnxruntime.InferenceSession``).
"""
from __future__ import annotations

import io
import json
import logging
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional, Sequence, Tuple

import numpy as np

from kubeseg.serving.defaults import (DEFAULT_CHECK_IMAGES, DEFAULT_MAX_IMAGES, DEFAULT_MAX_SIDE,
                                      DEFAULT_WEIGHT_RANGE, MIN_INT8_AGREEMENT, ONNX_OPSET)
from kubeseg.serving.int8 import WEIGHT_RANGE_TEXT, Int8Recipe, Quantizer, search_float_layers

if TYPE_CHECKING:  # torch and onnxruntime are imported where they are used
    import torch

logger = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
INT8_REPORT_FILE = "model.int8.json"
INPUT_NAME, OUTPUT_NAME = "image", "logits"
SPINNING_KEY = "session.intra_op.allow_spinning"  # ONNX Runtime's session option


def quantize_command(model_uri: str) -> str:
    return f"kubeseg quantize {model_uri} --calibration TRAINING_IMAGES_URI"


# -- export --------------------------------------------------------------------------------------

def export_bytes(model: "torch.nn.Module", opset: int = ONNX_OPSET) -> bytes:
    """The eval-mode ``model`` (returning ``{"out": logits}``) as ONNX bytes, sizes dynamic.

    The TorchScript exporter (``dynamo=False``) is used: it exports these models exactly and
    about ten times faster than the dynamo exporter on a small CPU.
    """
    import torch

    class LogitsOnly(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)["out"]

    wrapped = LogitsOnly(model).eval().cpu()
    dynamic = {0: "batch", 2: "height", 3: "width"}
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notices
        torch.onnx.export(wrapped, (torch.zeros(1, 3, 64, 64),), buffer, dynamo=False,
                          opset_version=opset, input_names=[INPUT_NAME],
                          output_names=[OUTPUT_NAME], do_constant_folding=True,
                          dynamic_axes={INPUT_NAME: dynamic, OUTPUT_NAME: dynamic})
    return buffer.getvalue()


def session(data: bytes, threads: Optional[int] = None):
    """An ONNX Runtime CPU session for the model ``data``, graph optimisations on.

    Its threads sleep between runs instead of spinning: in the server they share the cores
    with the threads that decode and encode images, and spinning ones cost the cpu-fast model
    40 ms a request on 2 cores (an int8 server answered one request at a time in 114 ms with
    spinning, 74 ms without; docs/models.md).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry(SPINNING_KEY, "0")
    if threads:
        options.intra_op_num_threads = int(threads)
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


class OnnxRuntimeModel:
    """An ONNX Runtime session called like a kubeseg model: ``logits = model(images)``."""

    def __init__(self, inference_session):
        self.session = inference_session

    def __call__(self, images: "torch.Tensor") -> "torch.Tensor":
        import torch

        pixels = np.ascontiguousarray(images.detach().cpu().float().numpy())
        (logits,) = self.session.run([OUTPUT_NAME], {INPUT_NAME: pixels})
        return torch.from_numpy(logits).to(images.device)


@dataclass
class Agreement:
    """How two models' answers compare on some images."""

    images: int
    max_abs_logit_difference: float
    argmax_agreement: float  # fraction of pixels with the same class


def compare(reference, candidate, images: Sequence["torch.Tensor"]) -> Agreement:
    """Logits and argmax of two callables (``[1, 3, h, w]`` -> logits) on normalised images."""
    import torch

    worst, same, total = 0.0, 0, 0
    with torch.inference_mode():
        for image in images:
            a = _logits(reference, image[None])
            b = _logits(candidate, image[None])
            worst = max(worst, float((a - b).abs().max()))
            same += int((a.argmax(1) == b.argmax(1)).sum())
            total += a.shape[-1] * a.shape[-2]
    return Agreement(len(images), worst, same / max(1, total))


def _logits(model, batch: "torch.Tensor") -> "torch.Tensor":
    out = model(batch)
    return (out["out"] if isinstance(out, dict) else out).float()


# -- images for checks and calibration ----------------------------------------------------------

def image_uris(uri: str, limit: int) -> List[str]:
    """Up to ``limit`` images (.jpg/.jpeg/.png) below a folder or s3:// prefix, spread evenly
    over its sorted listing."""
    from kubeseg import storage
    from kubeseg.data.channels import IMAGE_EXTENSIONS, split_name
    from kubeseg.errors import DataError

    names = sorted(n for n in storage.list_files(uri) if split_name(n)[1] in IMAGE_EXTENSIONS)
    if not names:
        raise DataError(f"{uri}: no .jpg/.jpeg/.png images there; give a folder or s3:// prefix "
                        "of images (e.g. the train channel)")
    step = max(1, len(names) // max(1, limit))
    return [storage.join(uri, n) for n in names[::step][:limit]]


def load_tensor(uri: str, mean, std, max_side: int) -> "torch.Tensor":
    """One image, its long side scaled down to ``max_side``, normalised ``[3, h, w]``."""
    from PIL import Image

    from kubeseg import storage
    from kubeseg.data.transforms import to_tensor

    image = Image.open(io.BytesIO(storage.read_bytes(uri))).convert("RGB")
    scale = max_side / max(image.size)
    if scale < 1:
        image = image.resize((max(8, round(image.width * scale)),
                              max(8, round(image.height * scale))), Image.BILINEAR)
    return to_tensor(image, mean, std)


# -- the artifact verbs ---------------------------------------------------------------------------

@dataclass
class ExportResult:
    folder: str  # the artifact version the file was added to
    opset: int
    random: Agreement
    real: Optional[Agreement]  # on the images given for checking, when any


def export_artifact(model_uri: str, *, check_images: Optional[str] = None,
                    max_images: int = 4, opset: int = ONNX_OPSET) -> ExportResult:
    """Export the artifact's model to ``model.onnx`` in its current version, checked first
    against PyTorch on random images and (``check_images``: a folder or s3:// prefix) real ones.
    """
    import torch

    from kubeseg.artifact import add_files, load_model

    model, info = load_model(model_uri)
    data = export_bytes(model, opset)
    runtime = OnnxRuntimeModel(session(data))
    generator = torch.Generator().manual_seed(0)
    noise = [torch.randn(3, h, w, generator=generator) for h, w in ((37, 45), (64, 96))]
    random = compare(model, runtime, noise)
    real = None
    if check_images:
        real = compare(model, runtime, [load_tensor(u, info.mean, info.std, DEFAULT_MAX_SIDE)
                                        for u in image_uris(check_images, max_images)])
    folder = add_files(model_uri, {ONNX_FILE: data})
    return ExportResult(folder, opset, random, real)


def float_onnx(model_uri: str) -> bytes:
    """The artifact's ``model.onnx``, exported (in memory, not stored) when it has none."""
    from kubeseg.artifact import load_model, read_added_file

    data = read_added_file(model_uri, ONNX_FILE)
    if data is None:
        logger.info("%s has no %s: exporting the model now (run 'kubeseg export %s --format "
                    "onnx' once to store it)", model_uri, ONNX_FILE, model_uri)
        data = export_bytes(load_model(model_uri)[0])
    return data


def read_int8_report(model_uri: str) -> Optional[dict]:
    from kubeseg.artifact import read_added_file

    data = read_added_file(model_uri, INT8_REPORT_FILE)
    return None if data is None else json.loads(data)


def describe_int8(report: dict) -> str:
    """One line: how the int8 model was made and what its recorded checks say."""
    check = report.get("agreement", {})
    agreement = 100 * check.get("argmax_agreement", 0)
    made = [f"{report['calibration_images']} calibration images"] \
        if "calibration_images" in report else []
    if "weight_range" in report:
        made[:0] = [f"{report['weight_range']} weights",
                    f"{report['float_layers']} of {report['convolutions']} convolutions "
                    "float32"]
    text = (f"int8 model{' (' + ', '.join(made) + ')' if made else ''}: argmax agreement with "
            f"float32 {agreement:.2f}% on {check.get('images', 0)} {check.get('on', '')} images")
    if report.get("miou_change_points") is not None:
        text += (f"; mIoU {100 * report['miou_float32']:.2f} -> {100 * report['miou_int8']:.2f} "
                 f"({report['miou_change_points']:+.2f} points) on {report['validation']}")
    return text


def validation_scores(reference, candidate, validation: str, *, mean, std, num_classes: int,
                      max_side: int) -> Tuple[List[float], Agreement]:
    """mIoU of both models over the images and annotations of a dataset root's validation split,
    and how they agree: whole images scored with their long side scaled down to ``max_side`` (as
    in calibration), logits resized back to the annotation's size, one confusion matrix each."""
    import torch
    import torch.nn.functional as F
    from PIL import Image

    from kubeseg.data.channels import Channels
    from kubeseg.data.datasets import FolderDataset
    from kubeseg.data.transforms import to_tensor
    from kubeseg.errors import DataError
    from kubeseg.metrics import ConfusionMatrix

    channels = Channels.from_root(validation)
    dataset = FolderDataset(channels.validation, channels.validation_annotation,
                            label_map=channels.label_map, split="validation")
    if not len(dataset):
        raise DataError(f"{validation}: no image/annotation pairs in validation/ and "
                        "validation_annotation/; give a dataset root with both channels")
    matrices = [ConfusionMatrix(num_classes) for _ in range(2)]
    worst, same, total = 0.0, 0, 0
    with torch.inference_mode():
        for index in range(len(dataset)):
            image, mask = dataset.load(index)
            size = (image.height, image.width)
            scale = max_side / max(size)
            if scale < 1:
                image = image.convert("RGB").resize((max(8, round(size[1] * scale)),
                                                     max(8, round(size[0] * scale))),
                                                    Image.BILINEAR)
            x = to_tensor(image, mean, std)[None]
            target = torch.from_numpy(np.asarray(mask, dtype=np.int64))
            a, b = _logits(reference, x), _logits(candidate, x)
            worst = max(worst, float((a - b).abs().max()))
            a, b = (F.interpolate(v, size=size, mode="bilinear", align_corners=False).argmax(1)[0]
                    for v in (a, b))
            matrices[0].update(a, target)
            matrices[1].update(b, target)
            same, total = same + int((a == b).sum()), total + a.numel()
    return ([float(m.compute()["mIOU"]) for m in matrices],
            Agreement(len(dataset), worst, same / max(1, total)))


@dataclass
class QuantizeResult:
    folder: str
    report: dict


def quantize_artifact(model_uri: str, calibration: str, *, validation: Optional[str] = None,
                      max_images: int = DEFAULT_MAX_IMAGES, max_side: Optional[int] = None,
                      threads: Optional[int] = None,
                      weight_range: str = DEFAULT_WEIGHT_RANGE,
                      float_layers: Optional[int] = None,
                      min_agreement: float = MIN_INT8_AGREEMENT,
                      check_images: int = DEFAULT_CHECK_IMAGES,
                      float_logits: bool = True) -> QuantizeResult:
    """Quantize the artifact's model to int8 and store it with its checks (see module doc).

    ``calibration``: a folder or s3:// prefix of training images. ``weight_range``,
    ``float_layers`` and ``float_logits`` as in :class:`kubeseg.serving.int8.Int8Recipe`;
    ``float_layers=None``
    searches for the fewest float32 layers that reach ``min_agreement`` on ``check_images``
    other training images of the same folder (the calibration images when there are no
    others). Agreement with float32 and the mIoU change are then measured on the whole
    validation split of ``validation`` (a dataset root with validation/ and
    validation_annotation/), else on the check images. Images are scaled down to ``max_side``
    (their long side); by default the long side the model scores at
    (``inference_size=base_size``), else :data:`DEFAULT_MAX_SIDE`.
    """
    from kubeseg.artifact import add_files, read_added_file, read_info

    info = read_info(model_uri)
    if max_side is None:
        max_side = info.hyperparameters.inference_long_side or DEFAULT_MAX_SIDE
    stored = read_added_file(model_uri, ONNX_FILE)
    float_data = stored or float_onnx(model_uri)
    tensors, checks = calibration_and_check_images(calibration, max_images, check_images,
                                                    lambda u: load_tensor(u, info.mean,
                                                                          info.std, max_side))
    int8_data, made = quantize_model(float_data, tensors, checks, threads=threads,
                                     weight_range=weight_range, float_layers=float_layers,
                                     min_agreement=min_agreement, float_logits=float_logits)
    float_model = OnnxRuntimeModel(session(float_data, threads))
    report = {"format": "onnx static QDQ", "opset": ONNX_OPSET, **made,
              "activations": "uint8", "calibration": calibration,
              "calibration_images": len(tensors), "max_side": max_side,
              "validation": validation, "miou_float32": None, "miou_int8": None,
              "miou_change_points": None}
    int8_model = OnnxRuntimeModel(session(int8_data, threads))
    if validation:
        miou, agreement = validation_scores(float_model, int8_model, validation,
                                            mean=info.mean, std=info.std,
                                            num_classes=info.num_classes, max_side=max_side)
        report.update(miou_float32=miou[0], miou_int8=miou[1],
                      miou_change_points=100 * (miou[1] - miou[0]))
    else:
        agreement = compare(float_model, int8_model, checks)
    report["agreement"] = {**asdict(agreement), "on": "validation" if validation else "check"}
    files = {} if stored else {ONNX_FILE: float_data}  # float32 on ONNX Runtime, as exported
    files.update({INT8_FILE: int8_data, INT8_REPORT_FILE: json.dumps(report, indent=2).encode()})
    return QuantizeResult(add_files(model_uri, files), report)


def quantize_model(float_data: bytes, calibration: Sequence["torch.Tensor"],
                   checks: Sequence["torch.Tensor"], *, threads: Optional[int] = None,
                   weight_range: str = DEFAULT_WEIGHT_RANGE, float_layers: Optional[int] = None,
                   min_agreement: float = MIN_INT8_AGREEMENT, float_logits: bool = True
                   ) -> Tuple[bytes, dict]:
    """The int8 model of a float32 ONNX model, calibrated on ``calibration`` (normalised
    ``[3, h, w]`` images) with the recipe of :class:`kubeseg.serving.int8.Int8Recipe`
    (``float_layers=None``: searched on ``checks``), and what the report records of how it
    was made."""
    float_model = OnnxRuntimeModel(session(float_data, threads))
    references = [_argmax(float_model, image) for image in checks]

    def agreement_of(data: bytes) -> float:
        int8_model = OnnxRuntimeModel(session(data, threads))
        same = sum(int((_argmax(int8_model, image) == ref).sum())
                   for image, ref in zip(checks, references))
        return same / max(1, sum(ref.numel() for ref in references))

    with Quantizer(float_data, [t[None].numpy() for t in calibration], INPUT_NAME) as quantizer:
        recipe = Int8Recipe(weight_range, float_layers or 0, float_logits)
        if float_layers is None:
            chosen, int8_data, steps = search_float_layers(quantizer, recipe, agreement_of,
                                                           min_agreement)
        else:
            chosen, steps = float_layers, []
            int8_data = quantizer.quantize(recipe)
        convolutions = len(quantizer.layout.conv_positions)
    return int8_data, {
        "per_channel": True, "weight_range": weight_range,
        "weights": WEIGHT_RANGE_TEXT[weight_range],
        "float_layers": min(chosen, convolutions), "convolutions": convolutions,
        "float_logits": float_logits,
        "float_layers_chosen": "searched" if float_layers is None else "given",
        "min_agreement": min_agreement, "check_images": len(checks),
        "search": [asdict(step) for step in steps]}


def _argmax(model, image: "torch.Tensor") -> "torch.Tensor":
    import torch

    with torch.inference_mode():
        return _logits(model, image[None]).argmax(1)


def calibration_and_check_images(uri: str, calibration: int, checks: int, load
                                  ) -> Tuple[list, list]:
    """``calibration`` images spread over the folder, and up to ``checks`` others from it (the
    calibration images themselves when it has no others), each loaded with ``load``."""
    chosen = image_uris(uri, calibration)
    taken = set(chosen)
    others = [u for u in image_uris(uri, calibration + checks) if u not in taken]
    tensors = [load(u) for u in chosen]
    return tensors, ([load(u) for u in others[:checks]] if others else tensors[:checks])
