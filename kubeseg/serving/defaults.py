"""The defaults of serving, quantization and batch prediction that the command line shows.

Only constants, and no imports: ``kubeseg --help`` and each verb's ``--help`` read them from
here without loading numpy or torch. :mod:`kubeseg.serving.predictor`,
:mod:`kubeseg.serving.admission` and :mod:`kubeseg.serving.onnx_model` use these same objects.
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
# request memory (decoded pictures, masks, logits, probabilities) in flight; with the runtime,
# the model and one forward pass this fits a 2 GiB pod for the ResNet-50 models
DEFAULT_MEMORY_BUDGET_MIB = 768
DEFAULT_MAX_QUEUED_REQUESTS = 32

# kubeseg.serving.onnx_model: export and int8 quantization
ONNX_OPSET = 17  # the one opset every export pins (ONNX Runtime 1.17+ runs it)
DEFAULT_MAX_IMAGES = 32  # calibration images
DEFAULT_MAX_SIDE = 512  # long side calibration and validation images are scaled down to

# kubeseg.serving.batch: batch prediction
DEFAULT_BATCH_SIZE = 16
SUMMARY_FILE = "_batch_summary.json"
