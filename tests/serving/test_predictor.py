"""The predictor in-process: model agreement, resizing back, batching of same-size requests."""
from __future__ import annotations

import concurrent.futures

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kubeseg.serving.predictor import (CPU_MAX_BATCH_PIXELS, BatchRunner, Runtime,
                                       SegmentationPredictor)
from serving_support import random_image


@pytest.fixture(scope="module")
def predictor(model_uri):
    return SegmentationPredictor(model_uri, max_pixels=64 * 64, tile_size=None,
                                 runtime=Runtime(threads=1)).load()


def test_matches_the_plain_model(predictor, reference):
    from kubeseg.data.transforms import to_tensor

    model, info = reference
    image = random_image(40, 30, seed=1)
    (prediction,) = predictor([image], probabilities=True)
    with torch.no_grad():
        logits = model(to_tensor(image, info.mean, info.std)[None])["out"]
    np.testing.assert_allclose(prediction.probabilities, logits.softmax(1).numpy(), atol=2e-4)
    np.testing.assert_array_equal(prediction.mask, prediction.probabilities[0].argmax(0))


@pytest.mark.parametrize("size", [(97, 61), (50, 300), (3, 2)])
def test_resize_back_equals_interpolate(predictor, size):
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 13, 17)
    prediction = predictor.postprocess(logits, size, probabilities=True)
    expected = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    np.testing.assert_allclose(prediction.probabilities, expected.softmax(1).numpy(), atol=1e-5)
    assert prediction.mask.shape == size
    assert (prediction.mask == expected.argmax(1)[0].numpy()).mean() > 0.999


def test_large_image_answered_at_its_size(predictor):
    image = random_image(200, 90, seed=2)  # above max_pixels: scored downscaled
    assert predictor.scaled_size(90, 200) != (90, 200)
    (prediction,) = predictor([image])
    assert prediction.mask.shape == (90, 200) and prediction.probabilities is None


def test_batch_runner_groups_same_size_requests(predictor):
    calls = []
    runner = BatchRunner(predictor, max_batch_size=4, on_batch=calls.append)
    try:
        with runner._cond:  # hold the queue so that all requests wait together
            futures = []
            for shape in [(32, 32)] * 5 + [(24, 40)] * 2:
                future = concurrent.futures.Future()
                runner._queue.append((torch.zeros(3, *shape), future))
                futures.append(future)
            runner._cond.notify()
        shapes = [tuple(f.result(timeout=120).shape) for f in futures]
    finally:
        runner.close()
    assert shapes == [(1, 3, 32, 32)] * 5 + [(1, 3, 24, 40)] * 2
    assert sorted(calls) == [1, 2, 4]  # 4 + 1 of one size, 2 of the other
    single = predictor.predict(torch.zeros(1, 3, 32, 32))
    batched = predictor.predict(torch.zeros(4, 3, 32, 32))
    torch.testing.assert_close(batched[:1], single, atol=1e-4, rtol=1e-4)


def test_a_cpu_batch_holds_at_most_max_batch_pixels(predictor):
    """On a CPU large images are scored one per forward pass (faster per image there); small
    ones are still batched up to max_batch_size."""
    calls = []
    runner = BatchRunner(predictor, max_batch_size=4, max_batch_pixels=2 * 32 * 32,
                         on_batch=calls.append)
    try:
        with runner._cond:
            futures = []
            for shape in [(32, 32)] * 3 + [(16, 16)] * 4 + [(48, 48)] * 2:
                future = concurrent.futures.Future()
                runner._queue.append((torch.zeros(3, *shape), future))
                futures.append(future)
            runner._cond.notify()
        for future in futures:
            future.result(timeout=120)
    finally:
        runner.close()
    # 32x32: 2 + 1 (two fit the pixels); 16x16: all 4; 48x48: one at a time (above the limit)
    assert calls == [2, 1, 4, 1, 1]
    default = BatchRunner(predictor)
    default.close()
    cpu = predictor.device.type == "cpu"
    assert default.max_batch_pixels == (CPU_MAX_BATCH_PIXELS if cpu else None)


@pytest.fixture(scope="module")
def base_size_model_uri(reference, tmp_path_factory):
    """The fixture model's weights in an artifact trained with inference_size=base_size."""
    from kubeseg.artifact import ClassInfo, save_artifact

    model, info = reference
    hp = info.hyperparameters.replace(base_size=32, inference_size="base_size")
    uri = str(tmp_path_factory.mktemp("base-size") / "model")
    save_artifact(uri, model=model, hyperparameters=hp,
                  classes=ClassInfo(names=list(info.class_names)), mean=info.mean, std=info.std)
    return uri


@pytest.mark.parametrize("backend", ["pytorch", "onnxruntime"])
def test_inference_size_base_size_scores_at_base_size(base_size_model_uri, reference, backend):
    from kubeseg.data.transforms import to_tensor
    from kubeseg.inference import predict_logits

    model, info = reference
    predictor = SegmentationPredictor(base_size_model_uri, tile_size=None,
                                      runtime=Runtime(threads=1, backend=backend)).load()
    image = random_image(64, 48, seed=3)
    (prediction,) = predictor([image], probabilities=True)
    assert prediction.mask.shape == (48, 64)
    x = to_tensor(image, info.mean, info.std)[None]
    with torch.no_grad():
        at_base = predict_logits(model, x, long_side=32).softmax(1).numpy()
        own_size = model(x)["out"].softmax(1).numpy()
    np.testing.assert_allclose(prediction.probabilities, at_base, atol=2e-4)
    assert np.abs(prediction.probabilities - own_size).max() > 1e-2
