"""The defaults of serving, quantization and batch prediction that the command line shows.

Only constants, the memory estimate they are derived with, and no imports: ``kubeseg --help``
and each verb's ``--help`` read them from here without loading numpy or torch.
:mod:`kubeseg.serving.predictor`, :mod:`kubeseg.serving.admission` and
:mod:`kubeseg.serving.onnx_model` and :mod:`kubeseg.serving.int8` use these same objects.

The server's memory defaults agree by construction: the default memory budget is what the
largest image the default ``--max-image-pixels`` admits costs to answer (a mask) for a model of
up to ``SIZED_FOR_CLASSES`` classes, so that image is answered, not refused with 413; the
memory a pod needs is that budget plus the runtime's own (measured, ``RUNTIME_MEMORY_MIB``).
"""

# kubeseg.serving.predictor: how images are scored
DEFAULT_MAX_PIXELS = 2048 * 2048
DEFAULT_MAX_IMAGE_PIXELS = 8192 * 8192
DEFAULT_TILE_SIZE = 1024
PRECISIONS = ("float32", "bfloat16", "float16", "int8", "auto")
BACKENDS = ("pytorch", "onnxruntime")
# bench/serve.py (README): ONNX Runtime float32 on a CPU was not clearly faster than PyTorch
# (0.96x-1.06x req/s in steady runs), so PyTorch, the path for every precision and device,
# stays the default
DEFAULT_CPU_BACKEND = "pytorch"

# kubeseg.serving.admission: what one server accepts
DEFAULT_MAX_REQUEST_BYTES = 32 * 1024 * 1024
DEFAULT_MAX_BATCH_SIZE = 4
DEFAULT_MAX_IMAGES_PER_REQUEST = 16
DEFAULT_MAX_QUEUED_REQUESTS = 32
# slow clients: the request line and headers must arrive within DEFAULT_HEADER_TIMEOUT_S; the
# body, after that long again, at DEFAULT_MIN_BODY_RATE bytes per second on average
DEFAULT_HEADER_TIMEOUT_S = 20.0
DEFAULT_MIN_BODY_RATE = 10 * 1024
STRIP_ELEMENTS = 1 << 22  # elements per strip when resizing logits back (16 MiB of float32)
MIB = 2**20


def image_memory_bytes(pixels: int, *, classes: int, max_pixels: int,
                       probabilities: bool = False) -> int:
    """Bytes one image of ``pixels`` pixels holds while it is answered (an upper estimate).

    At full size: the decoded RGB picture and one conversion copy, the mask and its encoding,
    and with probabilities twice ``classes`` floats (the array and its encoding). At the scored
    size (at most ``max_pixels``): the normalised input and twice the logits (sliding-window
    sum). Plus the strips that resize logits back.
    """
    scored = min(pixels, max_pixels)
    per_pixel = 3 + 3 + 1 + 1 + (2 * 4 * classes if probabilities else 0)
    per_scored = 3 * 4 + 2 * 4 * classes
    strips = 3 * 4 * min(STRIP_ELEMENTS, classes * pixels)
    return pixels * per_pixel + scored * per_scored + strips


def _mib_rounded_up(nbytes: int, step_mib: int) -> int:
    return -(-nbytes // (step_mib * MIB)) * step_mib


# the class count the memory defaults are sized for: PASCAL VOC's 21 (the reference product's
# examples), CamVid's 11 and other smaller sets fit with room to spare
SIZED_FOR_CLASSES = 21
# request memory (decoded pictures, masks, logits, probabilities) in flight: one image of the
# default --max-image-pixels, answered with a mask (1280 MiB)
DEFAULT_MEMORY_BUDGET_MIB = _mib_rounded_up(
    image_memory_bytes(DEFAULT_MAX_IMAGE_PIXELS, classes=SIZED_FOR_CLASSES,
                       max_pixels=DEFAULT_MAX_PIXELS), 64)
# what the server holds besides the budget: Python, torch, KServe, the model and one forward
# pass of a --tile-size tile with 2 threads (peak RSS measured on a CPU with 21 classes: 1546 MiB
# for FCN/ResNet-50, 1604 MiB for DeepLabV3/ResNet-101, 1957 MiB for PSPNet/ResNet-101)
RUNTIME_MEMORY_MIB = 2048
# the memory a serving pod needs with the defaults
DEFAULT_POD_MEMORY_MIB = DEFAULT_MEMORY_BUDGET_MIB + RUNTIME_MEMORY_MIB
# the memory request and limit of serving pods (manifests/serving, kubeseg deploy): that need,
# rounded up to whole GiB
SERVING_POD_MEMORY = f"{-(-DEFAULT_POD_MEMORY_MIB // 1024)}Gi"

# kubeseg.serving.onnx_model: export and int8 quantization
ONNX_OPSET = 17  # the one opset every export pins (ONNX Runtime 1.17+ runs it)
DEFAULT_MAX_IMAGES = 32  # calibration images
DEFAULT_MAX_SIDE = 512  # long side calibration and validation images are scaled down to
DEFAULT_CHECK_IMAGES = 16  # other training images the float-layer search checks agreement on
MIN_INT8_AGREEMENT = 0.99  # the search's target; precision "auto" takes int8 only at or above it
# kubeseg.serving.int8: weight bits (portable: 7 bits except depthwise convolutions' 8)
WEIGHT_RANGES = ("portable", "full", "reduced")
DEFAULT_WEIGHT_RANGE = "portable"

# kubeseg.serving.batch: batch prediction
DEFAULT_BATCH_SIZE = 16
SUMMARY_FILE = "_batch_summary.json"
