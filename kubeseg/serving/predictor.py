"""The segmentation predictor: load once, then image -> logits -> mask / probabilities.

:class:`SegmentationPredictor` follows KServe's predictor shape (``load`` / ``preprocess`` /
``predict`` / ``postprocess``) without depending on kserve; the HTTP server wraps it.
The forward pass runs on PyTorch or, with ``backend="onnxruntime"``, on the artifact's ONNX
export (float32, or the int8 model of ``kubeseg quantize``); see :func:`choose_runtime` and
:mod:`kubeseg.serving.onnx_model`.

Large inputs never crash the process: an image above ``max_pixels`` is scored downscaled (so its
area fits) and its logits are resized back to the input size in strips of rows, each resized
from the small grid (what ``F.interpolate(mode="bilinear")`` computes, without ever holding
``C x H x W`` or ``C x h x W`` when only the mask is asked for); an image side above
``tile_size`` is scored with a sliding window (:func:`kubeseg.inference.predict_logits`).
Images above ``max_image_pixels`` are refused before decoding (see
:mod:`kubeseg.serving.codecs`). Sides below ``MIN_SIDE`` are padded by repeating the edge pixels
and the answer is cropped back, so a 1x1 image gets a 1x1 mask.

:class:`BatchRunner` runs the forward passes on one thread: requests of the same size that are
waiting when the model becomes free are scored together as one batch (up to ``max_batch_size``,
and on a CPU up to :data:`CPU_MAX_BATCH_PIXELS` pixels in all).
Decoding and encoding happen on other threads meanwhile, so on a CPU the cores stay busy with
the convolutions, and no request waits for a timer.
"""
from __future__ import annotations

import concurrent.futures
import copy
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Deque, List, Optional, Sequence, Tuple

import numpy as np

from kubeseg.device import int8_pairs_saturate, native_bfloat16_cpu
from kubeseg.serving.defaults import (BACKENDS, DEFAULT_CPU_BACKEND, DEFAULT_MAX_IMAGE_PIXELS,
                                      DEFAULT_MAX_PIXELS, DEFAULT_TILE_SIZE, PRECISIONS,
                                      STRIP_ELEMENTS)

if TYPE_CHECKING:  # torch is imported where it is used, so importing this module stays light
    import torch

logger = logging.getLogger(__name__)

MIN_SIDE = 8  # smaller sides are padded (edge pixels repeated) and the answer cropped back


@dataclass
class OutputCounts:
    """What monitoring counts of one answer: pixels per predicted class, pixels per confidence
    bin (:data:`kubeseg.monitoring.drift.CONFIDENCE_EDGES`) and the sum of the confidences."""

    class_pixels: np.ndarray       # [C] int64
    confidence_pixels: np.ndarray  # [B] int64
    confidence_sum: float

    @classmethod
    def of(cls, mask: torch.Tensor, confidence: torch.Tensor, classes: int) -> "OutputCounts":
        """From a mask and its confidences (tensors of the same shape)."""
        import torch

        from kubeseg.inference import confidence_bins, pixel_counts

        class_pixels, bins = pixel_counts(mask[None], confidence_bins(confidence)[None], classes)
        return cls(class_pixels[0].cpu().numpy(), bins[0].cpu().numpy(),
                   float(confidence.sum(dtype=torch.float64)))

    def add(self, other: "OutputCounts") -> "OutputCounts":
        return OutputCounts(self.class_pixels + other.class_pixels,
                            self.confidence_pixels + other.confidence_pixels,
                            self.confidence_sum + other.confidence_sum)


@dataclass
class Prediction:
    """One image's answer at its input size."""

    mask: np.ndarray                       # [H, W] uint8 class ids
    probabilities: Optional[np.ndarray]    # [1, C, H, W] float32, when asked for
    counts: Optional[OutputCounts] = None  # when asked for (monitoring)


def _fuse_conv_bn(model: torch.nn.Module) -> torch.nn.Module:
    """Fold BatchNorm into the preceding convolutions (eval only); the model if it cannot."""
    import torch

    try:
        from torch.fx.experimental.optimization import fuse

        fused = fuse(copy.deepcopy(model))
    except Exception as exc:  # tracing is an optimisation; the plain model always works
        logger.info("serving the model without conv+BN folding (%s)", exc)
        return model
    x = torch.randn(1, 3, 37, 45, device=next(model.parameters()).device)
    with torch.inference_mode():
        a, b = model(x)["out"], fused(x)["out"]
    if a.shape != b.shape or not torch.allclose(a, b, rtol=1e-3, atol=1e-4):
        logger.info("serving the model without conv+BN folding (outputs differ)")
        return model
    return fused


def _source_index(out_size: int, in_size: int, device) -> Tuple[torch.Tensor, torch.Tensor,
                                                                torch.Tensor]:
    """Indices and weights of bilinear resizing, as F.interpolate(align_corners=False)."""
    import torch

    scale = in_size / out_size
    src = ((torch.arange(out_size, device=device, dtype=torch.float64) + 0.5) * scale - 0.5)
    src = src.clamp(min=0)
    i0 = src.floor().long().clamp(max=in_size - 1)
    i1 = (i0 + 1).clamp(max=in_size - 1)
    weight = (src - i0).float()
    return i0, i1, weight


def _best_class(scores: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(uint8 class index, largest logit) per pixel of logits ``[C, h, w]``.

    ``max`` over the class axis, not ``argmax``: on a CPU, argmax across the strided class axis
    of contiguous NCHW logits (what ONNX Runtime returns) took 22 ms for 11 classes at 512x512
    on 2 cores where max took 4.4 ms; a loop over the class planes took 6.9 ms. Ties go to the
    lower class, as with argmax.
    """
    import torch

    best, index = scores.max(dim=0)
    return index.to(torch.uint8), best


def _confidence(scores: torch.Tensor, best: torch.Tensor) -> torch.Tensor:
    """The largest softmax probability of logits ``[C, h, w]`` whose maximum is ``best``."""
    return (scores - best).exp_().sum(dim=0).reciprocal_()


def _option_error(problem: str):
    from kubeseg.errors import ConfigError

    return ConfigError([problem], what="option")


def _int8_saturates(int8_report: Optional[dict]) -> bool:
    """Whether the int8 model's 8-bit weights can overflow this CPU's int8 products."""
    return (int8_report or {}).get("weight_range") == "full" and int8_pairs_saturate()


def choose_runtime(precision: str, backend: Optional[str], device: str,
                   int8_report: Optional[dict]) -> Tuple[str, str]:
    """``(precision, backend)`` to serve with, from the options asked for (``backend`` None:
    the default for the device), or a :class:`ConfigError` saying which option to change.

    int8 runs the stored int8 ONNX model on ONNX Runtime (CPU); bfloat16 and float16 run on
    PyTorch, bfloat16 on a CPU only with native support. ``auto``: int8 when the artifact holds
    an int8 model whose recorded argmax agreement is at least ``MIN_INT8_AGREEMENT`` and whose
    weights are exact on this CPU (``weight_range`` "full" is not where int8 products saturate),
    else bfloat16 where it is native, else float32.
    """
    from kubeseg.serving.defaults import MIN_INT8_AGREEMENT

    on_cpu = device.startswith("cpu")
    if backend == "onnxruntime" and not on_cpu:
        raise _option_error(f"--backend onnxruntime runs on the CPU; with --device {device} use "
                            "--backend pytorch")
    if precision == "auto":
        agreement = (int8_report or {}).get("agreement", {}).get("argmax_agreement", 0)
        if (on_cpu and backend != "pytorch" and agreement >= MIN_INT8_AGREEMENT
                and not _int8_saturates(int8_report)):
            precision = "int8"
        elif backend != "onnxruntime" and (native_bfloat16_cpu() if on_cpu else
                                           _cuda_bfloat16(device)):
            precision = "bfloat16"
        else:
            precision = "float32"
    if precision == "int8":
        if not on_cpu or backend == "pytorch":
            raise _option_error("--precision int8 runs the stored int8 ONNX model on ONNX "
                                "Runtime: use --device cpu and --backend onnxruntime")
        return precision, "onnxruntime"
    if precision in ("bfloat16", "float16"):
        if backend == "onnxruntime":
            raise _option_error(f"--precision {precision} runs on PyTorch: use --backend pytorch")
        if precision == "bfloat16" and on_cpu and not native_bfloat16_cpu():
            raise _option_error("--precision bfloat16: this CPU has no native bfloat16 "
                                "(AVX512-BF16 or AMX), where it is slower than float32; use "
                                "--precision float32, int8 or auto")
        return precision, "pytorch"
    return precision, backend or ("pytorch" if not on_cpu else DEFAULT_CPU_BACKEND)


def _cuda_bfloat16(device: str) -> bool:
    import torch

    return device.startswith("cuda") and torch.cuda.is_available() and \
        torch.cuda.is_bf16_supported()


@dataclass(frozen=True)
class Runtime:
    """Where and how the forward pass runs: ``device`` (None: cuda when available),
    ``precision`` and ``backend`` (None: the device's default; see :func:`choose_runtime`),
    ``threads`` of torch or ONNX Runtime (None: their choice), and PyTorch's channels-last layout
    and conv+BN folding."""

    device: Optional[str] = None
    precision: str = "float32"
    backend: Optional[str] = None
    threads: Optional[int] = None
    channels_last: bool = True
    fuse_batchnorm: bool = True

    def check(self) -> None:
        if self.precision not in PRECISIONS:
            raise _option_error(f"precision={self.precision!r}: choose one of "
                                f"{', '.join(PRECISIONS)}")
        if self.backend is not None and self.backend not in BACKENDS:
            raise _option_error(f"backend={self.backend!r}: choose one of {', '.join(BACKENDS)}")


class SegmentationPredictor:
    """A loaded kubeseg model artifact that turns RGB images into masks and probabilities."""

    def __init__(self, model_uri: str, *, name: str = "model", runtime: Runtime = Runtime(),
                 max_pixels: int = DEFAULT_MAX_PIXELS,
                 tile_size: Optional[int] = DEFAULT_TILE_SIZE):
        import torch

        runtime.check()
        if max_pixels < 64 * 64:
            from kubeseg.errors import ConfigError

            raise ConfigError([f"max_pixels={max_pixels}: must be at least {64 * 64}"],
                              what="option")
        self.model_uri = model_uri
        self.name = name
        from kubeseg.device import resolve_device

        self.device = resolve_device(runtime.device)
        self.max_pixels = int(max_pixels)
        self.tile_size = tile_size
        self.precision = runtime.precision
        self.backend = runtime.backend  # None: the device's default, settled by load()
        self.int8_report: Optional[dict] = None
        self.channels_last = runtime.channels_last
        self.fuse_batchnorm = runtime.fuse_batchnorm
        self.threads = runtime.threads
        self.model: Optional[torch.nn.Module] = None
        self.info = None
        self._mean = self._inv_std = None

    # -- KServe-style life cycle ------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.model is not None

    @property
    def class_names(self) -> List[str]:
        return list(self.info.class_names) if self.info is not None else []

    @property
    def num_classes(self) -> int:
        return int(self.info.num_classes) if self.info is not None else 0

    def load(self) -> "SegmentationPredictor":
        """Load the artifact (once) onto the device and warm it up."""
        import torch

        from kubeseg.artifact import read_info
        from kubeseg.serving.onnx_model import describe_int8, read_int8_report

        if self.threads:
            torch.set_num_threads(int(self.threads))
        started = time.perf_counter()
        self.int8_report = read_int8_report(self.model_uri)
        self.precision, self.backend = choose_runtime(self.precision, self.backend,
                                                      str(self.device), self.int8_report)
        if self.backend == "onnxruntime":
            self.model, self.info = self._onnx_model(), read_info(self.model_uri)
        else:
            self.model, self.info = self._torch_model()
        if self.precision == "int8" and self.int8_report:
            logger.info("%s", describe_int8(self.int8_report))
            if _int8_saturates(self.int8_report):
                logger.warning("the int8 model has 8-bit weights (kubeseg quantize "
                               "--weight-range full), which ONNX Runtime's int8 kernels can "
                               "saturate on this CPU (no VNNI or AMX): its answers may differ "
                               "from the recorded agreement; quantize with --weight-range "
                               "portable for this CPU")
        info = self.info
        self._mean = torch.tensor([255.0 * v for v in info.mean],
                                  device=self.device).view(3, 1, 1)
        self._inv_std = torch.tensor([1.0 / (255.0 * v) for v in info.std],
                                     device=self.device).view(3, 1, 1)
        self.predict(self.preprocess(np.zeros((64, 64, 3), dtype=np.uint8))[None])  # warm-up
        logger.info("model %s loaded from %s on %s in %.1f s (%s, %d classes; %s, %s)",
                    self.name, self.model_uri, self.device, time.perf_counter() - started,
                    info.algorithm, info.num_classes, self.backend, self.precision)
        return self

    def _torch_model(self):
        import torch

        from kubeseg.artifact import load_model

        model, info = load_model(self.model_uri, device=str(self.device))
        if self.fuse_batchnorm:
            model = _fuse_conv_bn(model)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model.eval(), info

    def _onnx_model(self):
        from kubeseg.artifact import read_added_file
        from kubeseg.serving import onnx_model

        if self.precision == "int8":
            data = read_added_file(self.model_uri, onnx_model.INT8_FILE)
            if data is None:
                raise _option_error(
                    f"--precision int8: {self.model_uri} holds no int8 model; create it with "
                    f"'{onnx_model.quantize_command(self.model_uri)}'")
        else:
            data = onnx_model.float_onnx(self.model_uri)
        return onnx_model.OnnxRuntimeModel(onnx_model.session(data, self.threads))

    def scaled_size(self, height: int, width: int) -> Tuple[int, int]:
        """The size an image is scored at: its own, or downscaled to fit ``max_pixels``."""
        if height * width <= self.max_pixels:
            return height, width
        factor = math.sqrt(self.max_pixels / (height * width))
        return max(1, int(height * factor)), max(1, int(width * factor))

    def preprocess(self, image) -> torch.Tensor:
        """RGB image (PIL or ``[H, W, 3]`` uint8 array) -> normalised ``[3, h, w]`` on the device.

        Images above ``max_pixels`` come out downscaled; :meth:`postprocess` resizes back.
        """
        import torch
        from PIL import Image

        from kubeseg.data.transforms import to_tensor

        if not isinstance(image, Image.Image):
            image = Image.fromarray(np.asarray(image, dtype=np.uint8))
        height, width = image.height, image.width
        if height < 1 or width < 1:
            from kubeseg.serving.codecs import RequestError

            raise RequestError(f"the image is {width}x{height} pixels: it has no pixels")
        target = self.scaled_size(height, width)
        if target != (height, width):
            image = image.resize((target[1], target[0]), Image.BILINEAR)
        if self.device.type == "cpu":
            tensor = to_tensor(image, self.info.mean, self.info.std)
        else:
            # elsewhere move the uint8 pixels (4x fewer bytes) and normalise on the device, with
            # the same arithmetic as to_tensor
            pixels = torch.from_numpy(np.array(image.convert("RGB"), dtype=np.uint8, order="C"))
            tensor = pixels.to(self.device, non_blocking=True).permute(2, 0, 1).float()
            tensor = (tensor - self._mean) * self._inv_std
        short_h, short_w = max(0, MIN_SIDE - tensor.shape[1]), max(0, MIN_SIDE - tensor.shape[2])
        if short_h or short_w:
            import torch.nn.functional as F

            tensor = F.pad(tensor[None], (0, short_w, 0, short_h), mode="replicate")[0]
        return tensor

    def predict(self, batch: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, C, h, w]`` (float32) for a normalised batch ``[N, 3, h, w]``."""
        import torch

        from kubeseg.inference import predict_logits

        if self.model is None:
            raise RuntimeError("SegmentationPredictor.load() was not called")
        if self.channels_last and self.backend == "pytorch":
            batch = batch.contiguous(memory_format=torch.channels_last)
        dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(self.precision)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=dtype,
                                                    enabled=dtype is not None):
            logits = predict_logits(self.model, batch, tile_size=self.tile_size,
                                    long_side=self.info.hyperparameters.inference_long_side)
        return logits.float()

    def postprocess(self, logits: torch.Tensor, size: Tuple[int, int], *,
                    probabilities: bool = False, counts: bool = False) -> Prediction:
        """Mask (and probabilities) at the input ``size`` from one image's logits ``[1|C, ...]``.

        The mask is the argmax of the probabilities, computed from the same resized logits.
        ``counts``: also count the mask's classes and confidences (:class:`OutputCounts`), at
        the input size, for monitoring.
        """
        import torch

        if logits.dim() == 3:
            logits = logits[None]
        height, width = size
        # drop the padding that preprocess added to sides below MIN_SIDE
        scored_h, scored_w = self.scaled_size(height, width)
        if scored_h < MIN_SIDE and logits.shape[-2] == MIN_SIDE:
            logits = logits[..., :scored_h, :]
        if scored_w < MIN_SIDE and logits.shape[-1] == MIN_SIDE:
            logits = logits[..., :scored_w]
        with torch.inference_mode():
            if tuple(logits.shape[-2:]) == (height, width):
                mask, best = _best_class(logits[0])
                counted = (OutputCounts.of(mask, _confidence(logits[0], best), logits.shape[1])
                           if counts else None)
                probs = (logits.softmax(dim=1).cpu().numpy() if probabilities else None)
                return Prediction(mask.cpu().numpy(), probs, counted)
            return self._resize_back(logits, height, width, probabilities, counts)

    def _resize_back(self, logits: torch.Tensor, height: int, width: int,
                     probabilities: bool, counts: bool = False) -> Prediction:
        classes, in_h, in_w = logits.shape[1:]
        r0, r1, rw = _source_index(height, in_h, logits.device)
        c0, c1, cw = _source_index(width, in_w, logits.device)
        mask = np.empty((height, width), dtype=np.uint8)
        probs = np.empty((1, classes, height, width), dtype=np.float32) if probabilities else None
        counted = None
        band = max(1, STRIP_ELEMENTS // max(1, classes * max(width, in_w)))
        for top in range(0, height, band):
            rows = slice(top, min(height, top + band))
            weight = rw[rows].view(1, 1, -1, 1)
            # rows first, on the small grid: [1, C, band, in_w]; then columns: [1, C, band, W]
            tall = (logits.index_select(2, r0[rows]) * (1 - weight)
                    + logits.index_select(2, r1[rows]) * weight)
            part = tall.index_select(3, c0) * (1 - cw) + tall.index_select(3, c1) * cw
            del tall
            index, best = _best_class(part[0])
            mask[rows] = index.cpu().numpy()
            if counts:
                strip = OutputCounts.of(index, _confidence(part[0], best), classes)
                counted = strip if counted is None else counted.add(strip)
            if probs is not None:
                probs[:, :, rows] = part.softmax(dim=1).cpu().numpy()
        return Prediction(mask, probs, counted)

    def __call__(self, images: Sequence, *, probabilities: bool = False) -> List[Prediction]:
        """Score images one after another (no batching): the simple, synchronous path."""
        results = []
        for image in images:
            size = (image.height, image.width) if hasattr(image, "height") else \
                tuple(np.asarray(image).shape[:2])
            logits = self.predict(self.preprocess(image)[None])
            results.append(self.postprocess(logits, size, probabilities=probabilities))
        return results


# On a CPU, one forward pass over more pixels than this is slower per image than passes one at
# a time (the activations leave the caches): FCN/ResNet-18, 2 AVX2 cores, forward per image,
# batch 4 vs batch 1: 0.86 vs 0.75 s at 512x512, 0.51 vs 0.45 s at 384x384, but 0.18 vs 0.22 s
# at 256x256; through this runner, 512x512 images one at a time gave 1.02x-1.16x the images/s
# of batches of 4 in three paired runs. So a CPU batch grows only while it holds at most this
# many pixels.
CPU_MAX_BATCH_PIXELS = 512 * 512


class BatchRunner:
    """Forward passes on one thread; same-size requests waiting together form one batch of up
    to ``max_batch_size`` images and, on a CPU, up to ``max_batch_pixels`` pixels in all
    (default :data:`CPU_MAX_BATCH_PIXELS`; no pixel limit on a GPU)."""

    def __init__(self, predictor: SegmentationPredictor, *, max_batch_size: int = 4,
                 max_batch_pixels: Optional[int] = None,
                 on_batch: Optional[Callable[[int], None]] = None):
        self.predictor = predictor
        self.on_batch = on_batch
        self.max_batch_size = max(1, int(max_batch_size))
        if max_batch_pixels is None and predictor.device.type == "cpu":
            max_batch_pixels = CPU_MAX_BATCH_PIXELS
        self.max_batch_pixels = max_batch_pixels
        self._queue: Deque[Tuple[torch.Tensor, concurrent.futures.Future]] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self.batches = 0
        self.items = 0
        self._thread = threading.Thread(target=self._loop, name="kubeseg-inference",
                                        daemon=True)
        self._thread.start()

    def submit(self, tensor: torch.Tensor) -> "concurrent.futures.Future[torch.Tensor]":
        """Queue a normalised image ``[3, h, w]``; the future gives its logits ``[1, C, h, w]``."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if self._closed:
                raise RuntimeError("the inference runner is closed")
            self._queue.append((tensor, future))
            self._cond.notify()
        return future

    def _take_batch(self) -> List[Tuple[torch.Tensor, concurrent.futures.Future]]:
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if not self._queue:
                return []
            first = self._queue.popleft()
            batch = [first]
            shape = first[0].shape
            size = self.max_batch_size
            if self.max_batch_pixels:
                size = min(size, max(1, self.max_batch_pixels // (shape[-2] * shape[-1])))
            kept = deque()
            while self._queue and len(batch) < size:
                item = self._queue.popleft()
                (batch if item[0].shape == shape else kept).append(item)
            self._queue.extendleft(reversed(kept))
            return batch

    def _loop(self) -> None:
        import torch

        while True:
            batch = self._take_batch()
            if not batch:
                return
            batch = [(t, f) for t, f in batch if f.set_running_or_notify_cancel()]
            if not batch:
                continue
            try:
                logits = self.predictor.predict(torch.stack([t for t, _ in batch]))
            except BaseException as exc:  # answer every waiting request, keep the thread alive
                logger.exception("inference failed for a batch of %d", len(batch))
                for _, future in batch:
                    future.set_exception(exc)
                continue
            self.batches += 1
            self.items += len(batch)
            if self.on_batch is not None:
                self.on_batch(len(batch))
            for index, (_, future) in enumerate(batch):
                future.set_result(logits[index:index + 1])

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=30)


__all__ = ["DEFAULT_MAX_PIXELS", "DEFAULT_MAX_IMAGE_PIXELS", "DEFAULT_TILE_SIZE", "MIN_SIDE",
           "PRECISIONS", "BACKENDS", "DEFAULT_CPU_BACKEND", "choose_runtime",
           "native_bfloat16_cpu",
           "Prediction", "OutputCounts", "Runtime", "SegmentationPredictor", "BatchRunner",
           "CPU_MAX_BATCH_PIXELS"]
