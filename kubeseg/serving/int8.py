"""How ``kubeseg quantize`` turns a float32 ONNX model into int8: the recipe and its search.

ONNX Runtime's static QDQ quantization, activations uint8 (per tensor, min/max calibrated),
weights int8 per output channel. Two choices decide how close the int8 model stays to float32:

**Weight range** (``weight_range``). ONNX Runtime's x86 int8 convolutions multiply uint8
activations by int8 weights. On CPUs without VNNI (AVX2, AVX512 before Cascade Lake) the dense
kernels add each pair of products in 16 bits with saturation (``vpmaddubsw``), which full-range
8-bit weights can overflow; 7-bit weights cannot (255 * 64 * 2 < 2**15). Its depthwise kernels
widen to 32 bits first and cannot overflow. (ONNX Runtime's quantization guide, "When to use
reduce-range"; MLAS ``ConvSymKernelAvx2.S`` and ``qdwconv_avx2.cpp``.)

- ``portable`` (default): 7 bits in every weight that is not a depthwise convolution's, 8 bits
  in depthwise ones. Exact on every x86 CPU, with or without VNNI, and on ARM.
- ``full``: 8 bits everywhere. Closest to float32, but only for CPUs with VNNI or AMX, or ARM.
- ``reduced``: 7 bits everywhere (ONNX Runtime's ``reduce_range``).

**Float logits** (``float_logits``, on by default). The convolutions that compute the logits,
and the nodes between them and the output (adding, upsampling), stay float32: rounding the
logits to 8 bits moves the argmax wherever two classes are close, and these layers cost little.

**Float layers** (``float_layers``). Rounding errors made near the input grow through the
network: the first convolutions are the most sensitive. The first N convolutions of the graph
(with every node before them, such as the input's normalisation) stay float32; the rest runs in
int8. ``None`` chooses N: the first of :data:`FLOAT_LAYER_LADDER` whose argmax agreement with
float32 on check images reaches a target (:func:`search_float_layers`).
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from kubeseg.serving.defaults import WEIGHT_RANGES

logger = logging.getLogger(__name__)

# float_layers tried by the search, in order; never more than half of the model's convolutions
FLOAT_LAYER_LADDER = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
WEIGHT_RANGE_TEXT = {
    "portable": "int8 per channel: 7 bits except depthwise convolutions (8 bits); exact on "
                "x86 CPUs with or without VNNI, and ARM",
    "full": "int8 per channel, 8 bits: for CPUs with VNNI or AMX, or ARM (x86 CPUs without "
            "VNNI can saturate)",
    "reduced": "int8 per channel, 7 bits",
}


@dataclass(frozen=True)
class Int8Recipe:
    """What to quantize and how: see the module documentation."""

    weight_range: str = "portable"
    float_layers: int = 0  # the first N convolutions, and every node before them, stay float32
    float_logits: bool = True  # the logits' convolutions and the nodes after them stay float32


@dataclass
class GraphLayout:
    """The nodes of a (pre-processed) float32 ONNX graph that the recipe refers to."""

    node_names: List[str]        # in topological order
    conv_positions: List[int]    # index in node_names of every Conv, in order
    depthwise_weights: List[str] = field(default_factory=list)  # initializer names
    logits_nodes: List[str] = field(default_factory=list)  # the logits' convolutions and after

    @classmethod
    def of(cls, model) -> "GraphLayout":
        """The layout of an ``onnx.ModelProto``."""
        shapes = {init.name: list(init.dims) for init in model.graph.initializer}
        names, convs, depthwise = [], [], []
        for index, node in enumerate(model.graph.node):
            names.append(node.name or f"{node.op_type}_{index}")
            if node.op_type != "Conv":
                continue
            convs.append(index)
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            weight = shapes.get(node.input[1])
            if group > 1 and weight is not None and weight[1] == 1 and weight[0] == group:
                depthwise.append(node.input[1])
        return cls(names, convs, depthwise, _logits_nodes(model, names))

    def float_nodes(self, float_layers: int) -> List[str]:
        """The nodes before the convolution at ``float_layers`` (all of them past the last)."""
        if float_layers <= 0:
            return []
        stop = (self.conv_positions[float_layers] if float_layers < len(self.conv_positions)
                else len(self.node_names))
        return self.node_names[:stop]

    def ladder(self) -> List[int]:
        """The float_layers the search tries: :data:`FLOAT_LAYER_LADDER` up to half the convs."""
        return [n for n in FLOAT_LAYER_LADDER if n <= len(self.conv_positions) // 2] or [0]


def _logits_nodes(model, names: List[str]) -> List[str]:
    """The nodes from the graph's outputs back to the nearest convolutions (included), not
    through the inputs of Shape nodes (they read sizes, not values)."""
    producer = {out: index for index, node in enumerate(model.graph.node)
                for out in node.output}
    pending = [producer[o.name] for o in model.graph.output if o.name in producer]
    seen = set()
    while pending:
        index = pending.pop()
        if index in seen:
            continue
        seen.add(index)
        node = model.graph.node[index]
        if node.op_type not in ("Conv", "Shape"):
            pending.extend(producer[i] for i in node.input if i in producer)
    return [names[i] for i in sorted(seen)]


@contextlib.contextmanager
def _quiet_root_logger():
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        root.setLevel(level)


class _Reader:
    """ONNX Runtime's calibration data reader over ``[1, 3, h, w]`` arrays, one at a time."""

    def __init__(self, input_name: str, arrays: Sequence[np.ndarray]):
        self._name, self._items = input_name, iter(arrays)

    def get_next(self):
        item = next(self._items, None)
        return None if item is None else {self._name: item}


class Quantizer:
    """One float32 ONNX model, pre-processed once (constants folded, BatchNorm fused) and
    calibrated once where ONNX Runtime can cache calibration, quantized with any recipe.

    Use as a context manager: it keeps its files in a temporary folder.
    """

    def __init__(self, float_data: bytes, calibration: Sequence[np.ndarray], input_name: str):
        import onnx
        from onnxruntime.quantization.shape_inference import quant_pre_process

        self._tmp = tempfile.TemporaryDirectory(prefix="kubeseg-quantize-")
        folder = Path(self._tmp.name)
        source, self._prepared = folder / "float.onnx", folder / "prepared.onnx"
        source.write_bytes(float_data)
        quant_pre_process(str(source), str(self._prepared), skip_symbolic_shape=True)
        self.layout = GraphLayout.of(onnx.load(str(self._prepared)))
        self._calibration = [np.ascontiguousarray(a) for a in calibration]
        self._input_name = input_name
        self._cache = folder / "calibration.json"

    def __enter__(self) -> "Quantizer":
        return self

    def __exit__(self, *exc) -> None:
        self._tmp.cleanup()

    def float_nodes(self, recipe: Int8Recipe) -> List[str]:
        """The nodes ``recipe`` keeps in float32."""
        nodes = self.layout.float_nodes(recipe.float_layers)
        if recipe.float_logits:
            nodes += [n for n in self.layout.logits_nodes if n not in set(nodes)]
        return nodes

    def quantize(self, recipe: Int8Recipe) -> bytes:
        """The int8 model (bytes) of ``recipe``."""
        from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

        if recipe.weight_range not in WEIGHT_RANGES:
            raise ValueError(f"weight_range={recipe.weight_range!r}: one of {WEIGHT_RANGES}")
        target = Path(self._tmp.name) / "int8.onnx"
        extra: Dict[str, object] = {}
        if recipe.weight_range == "portable":  # depthwise weights keep their 8 bits
            extra["TensorQuantOverrides"] = {name: [{"axis": 0, "reduce_range": False}]
                                             for name in self.layout.depthwise_weights}
        cache = {}
        if "calibration_cache_path" in inspect.signature(quantize_static).parameters:
            cache["calibration_cache_path"] = str(self._cache)  # calibrate once, reuse ranges
        with _quiet_root_logger():  # ONNX Runtime logs every channel it rescales at INFO
            quantize_static(str(self._prepared), str(target),
                            _Reader(self._input_name, self._calibration),
                            quant_format=QuantFormat.QDQ, per_channel=True,
                            reduce_range=recipe.weight_range != "full",
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            nodes_to_exclude=self.float_nodes(recipe),
                            extra_options=extra, **cache)
        return target.read_bytes()


@dataclass
class SearchStep:
    float_layers: int
    argmax_agreement: float


def search_float_layers(quantizer: Quantizer, recipe: Int8Recipe,
                        agreement_of: Callable[[bytes], float], min_agreement: float
                        ) -> Tuple[int, bytes, List[SearchStep]]:
    """The first float_layers of the ladder whose int8 model (``recipe`` otherwise) reaches
    ``min_agreement`` (``agreement_of(int8 bytes)``), that model and the steps tried. When none
    does, the step with the highest agreement (the fewest float layers among equals)."""
    steps: List[SearchStep] = []
    best: Optional[Tuple[float, int, bytes]] = None
    for float_layers in quantizer.layout.ladder():
        data = quantizer.quantize(replace(recipe, float_layers=float_layers))
        agreement = agreement_of(data)
        steps.append(SearchStep(float_layers, agreement))
        logger.info("int8 with %d float32 layer(s): argmax agreement %.2f%%", float_layers,
                    100 * agreement)
        if best is None or agreement > best[0]:
            best = (agreement, float_layers, data)
        if agreement >= min_agreement:
            return float_layers, data, steps
    logger.warning("no int8 model reached %.2f%% argmax agreement with float32 on the check "
                   "images (best %.2f%% with %d float32 layers); serving --precision auto will "
                   "not choose it", 100 * min_agreement, 100 * best[0], best[1])
    return best[1], best[2], steps
