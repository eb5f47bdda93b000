"""The int8 recipe (kubeseg.serving.int8) on a tiny network with a stem, a depthwise-separable
block and a classifier: which weights get 7 or 8 bits, which nodes stay float32, and how the
float-layer search chooses; real ONNX export and ONNX Runtime quantization throughout."""
from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from kubeseg.serving import onnx_model
from kubeseg.serving.int8 import GraphLayout, Int8Recipe, Quantizer, search_float_layers


class TinySeparable(torch.nn.Module):
    """stem 3x3 -> depthwise 3x3 -> pointwise 1x1 -> expand 1x1 -> depthwise -> pointwise ->
    classifier 1x1, logits upsampled to the input: seven convolutions, two depthwise."""

    def __init__(self, classes: int = 3):
        super().__init__()
        act = torch.nn.ReLU6
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, stride=2, padding=1), act(),
            torch.nn.Conv2d(8, 8, 3, padding=1, groups=8), act(),
            torch.nn.Conv2d(8, 16, 1),
            torch.nn.Conv2d(16, 32, 1), act(),
            torch.nn.Conv2d(32, 32, 3, padding=1, groups=32), act(),
            torch.nn.Conv2d(32, 16, 1))
        self.classifier = torch.nn.Conv2d(16, classes, 1)

    def forward(self, x):
        logits = self.classifier(self.features(x))
        return {"out": torch.nn.functional.interpolate(logits, size=x.shape[-2:],
                                                       mode="bilinear", align_corners=False)}


@pytest.fixture(scope="module")
def float_data():
    torch.manual_seed(0)
    return onnx_model.export_bytes(TinySeparable().eval())


def _images(count: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(3, 32, 40, generator=generator) for _ in range(count)]


@pytest.fixture(scope="module")
def quantizer(float_data):
    with Quantizer(float_data, [t[None].numpy() for t in _images(4, 1)],
                   onnx_model.INPUT_NAME) as q:
        yield q


def _conv_weights(data: bytes):
    """{conv node name: its int8 weights as a numpy array, or None where the weight is float}"""
    model = onnx.load_from_string(data)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    dequantized = {n.output[0]: n.input[0] for n in model.graph.node
                   if n.op_type == "DequantizeLinear"}
    return {n.name: (inits[dequantized[n.input[1]]] if n.input[1] in dequantized else None)
            for n in model.graph.node if n.op_type == "Conv"}


def _depthwise_convs(data: bytes):
    model = onnx.load_from_string(data)
    return {n.name for n in model.graph.node if n.op_type == "Conv"
            and any(a.name == "group" and a.i > 1 for a in n.attribute)}


def test_the_layout_finds_convolutions_depthwise_weights_and_the_logits_path(quantizer):
    layout = quantizer.layout
    assert len(layout.conv_positions) == 7 and len(layout.depthwise_weights) == 2
    convs = [layout.node_names[i] for i in layout.conv_positions]
    # from the output back to the classifier: the upsampling and the classifier, nothing before
    assert convs[-1] in layout.logits_nodes and convs[-2] not in layout.logits_nodes
    assert any("Resize" in n for n in layout.logits_nodes)
    assert layout.float_nodes(0) == []
    assert layout.float_nodes(2) == layout.node_names[:layout.conv_positions[2]]
    assert layout.ladder() == [0, 1, 2, 3]  # never more than half the convolutions


@pytest.mark.parametrize("weight_range, depthwise_max, dense_max",
                         [("portable", 127, 64), ("full", 127, 127), ("reduced", 64, 64)])
def test_weight_range_sets_the_bits_of_depthwise_and_dense_weights(quantizer, weight_range,
                                                                   depthwise_max, dense_max):
    data = quantizer.quantize(Int8Recipe(weight_range, float_layers=0, float_logits=False))
    weights = _conv_weights(data)
    depthwise = _depthwise_convs(data)
    assert len(depthwise) == 2 and all(w is not None for w in weights.values())
    for name, w in weights.items():
        top = int(np.abs(w.astype(np.int32)).max())
        # per channel and symmetric: each channel's largest weight takes the top code
        assert top == (depthwise_max if name in depthwise else dense_max), name


def test_float_layers_and_float_logits_keep_those_convolutions_float32(quantizer):
    data = quantizer.quantize(Int8Recipe("portable", float_layers=2, float_logits=True))
    weights = _conv_weights(data)
    convs = [quantizer.layout.node_names[i] for i in quantizer.layout.conv_positions]
    assert [weights[c] is None for c in convs] == [True, True, False, False, False, False, True]
    model = onnx.load_from_string(data)
    # the input reaches the first convolution unquantized
    first = next(n for n in model.graph.node if n.name == convs[0])
    assert first.input[0] == onnx_model.INPUT_NAME


def test_the_int8_model_stays_close_to_float32(quantizer, float_data):
    images = _images(3, 2)
    reference = onnx_model.OnnxRuntimeModel(onnx_model.session(float_data, 1))
    int8 = onnx_model.OnnxRuntimeModel(onnx_model.session(
        quantizer.quantize(Int8Recipe()), 1))
    assert onnx_model.compare(reference, int8, images).argmax_agreement > 0.8


def _float_conv_share(data: bytes) -> float:
    weights = _conv_weights(data)
    return sum(w is None for w in weights.values()) / len(weights)


def test_the_search_takes_the_first_step_that_reaches_the_target(quantizer):
    # the agreement stand-in is the share of float32 convolutions, read from the real model:
    # k float layers plus the classifier give (k + 1) / 7
    chosen, data, steps = search_float_layers(quantizer, Int8Recipe(), _float_conv_share, 0.4)
    assert [s.float_layers for s in steps] == [0, 1, 2] and chosen == 2
    assert _float_conv_share(data) == pytest.approx(3 / 7)


def test_the_search_keeps_the_best_step_and_warns_when_none_reaches_it(quantizer, caplog):
    with caplog.at_level(logging.WARNING, logger="kubeseg.serving.int8"):
        chosen, data, steps = search_float_layers(quantizer, Int8Recipe(), _float_conv_share,
                                                  0.99)
    assert [s.float_layers for s in steps] == [0, 1, 2, 3] and chosen == 3
    assert _float_conv_share(data) == pytest.approx(4 / 7)
    assert "no int8 model reached 99.00%" in caplog.text


def test_quantize_model_records_the_recipe_and_the_search(float_data):
    images = _images(6, 3)
    data, made = onnx_model.quantize_model(float_data, images[:4], images[4:], threads=1,
                                           min_agreement=0.0)
    assert made["weight_range"] == "portable" and made["per_channel"] is True
    assert made["float_layers"] == 0 and made["float_layers_chosen"] == "searched"
    assert made["convolutions"] == 7 and made["float_logits"] is True
    assert made["check_images"] == 2 and len(made["search"]) == 1
    assert _float_conv_share(data) == pytest.approx(1 / 7)  # the classifier only
    data, made = onnx_model.quantize_model(float_data, images[:4], images[4:], threads=1,
                                           weight_range="full", float_layers=3,
                                           float_logits=False)
    assert made["float_layers_chosen"] == "given" and made["search"] == []
    assert _float_conv_share(data) == pytest.approx(3 / 7)
