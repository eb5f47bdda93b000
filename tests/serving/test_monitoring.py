"""What serving counts of its predictions: the predictor's counts agree with the answers it
gives (mask and probabilities, at the image's size and when resized back), the real server's
/metrics on both backends counts what it answered, the drift gauges follow the window against
the artifact's baseline, ``--no-monitoring`` counts nothing, and batch prediction's summary holds
the same figures."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import requests
from PIL import Image

from kubeseg.monitoring import alerts, drift
from serving_support import CLASS_NAMES, encode, random_image


def _metrics(url: str) -> dict:
    """``{(name, labels as a sorted tuple): value}`` of a /metrics page."""
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(url + "/metrics", timeout=30).text
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def _model_series(metrics: dict, name: str, model: str = "shapes", **labels) -> float:
    key = (name, tuple(sorted({"model": model, **labels}.items())))
    return metrics.get(key, 0.0)


def _probabilities(url: str, jpeg: bytes) -> np.ndarray:
    from kubeseg.serving.codecs import decode_probabilities_recordio

    response = requests.post(url + "/invocations", data=jpeg, timeout=60,
                             headers={"Content-Type": "image/jpeg",
                                      "Accept": "application/x-recordio-protobuf"})
    assert response.status_code == 200, response.text
    return decode_probabilities_recordio(response.content)


@pytest.mark.parametrize("size, max_pixels", [((40, 56), 64 * 64), ((90, 120), 64 * 64)])
def test_the_predictors_counts_are_those_of_its_answer(model_uri, size, max_pixels):
    """At the input size, and resized back in strips from a downscaled score."""
    from kubeseg.serving.predictor import Runtime, SegmentationPredictor

    predictor = SegmentationPredictor(model_uri, runtime=Runtime(device="cpu"),
                                      max_pixels=max_pixels).load()
    image = np.asarray(random_image(size[1], size[0], seed=3))
    logits = predictor.predict(predictor.preprocess(image)[None])
    answer = predictor.postprocess(logits, size, probabilities=True, counts=True)
    assert answer.counts.class_pixels.tolist() == np.bincount(answer.mask.ravel(),
                                                              minlength=3).tolist()
    confidence = answer.probabilities[0].max(axis=0)
    expected = drift.confidence_counts(confidence)
    assert np.abs(answer.counts.confidence_pixels - expected).sum() <= 2  # float32 at edges
    assert answer.counts.confidence_sum == pytest.approx(float(confidence.sum()), rel=1e-5)
    plain = predictor.postprocess(logits, size)
    assert plain.counts is None and np.array_equal(plain.mask, answer.mask)


def test_metrics_count_what_the_server_answered(server):
    """Both backends: images, pixels per class (from the masks answered), the confidence
    histogram (from the probabilities answered) and the image sizes."""
    before = _metrics(server.url)
    sizes = [(40, 56), (33, 47), (100, 90)]  # the last is scored downscaled and resized back
    masks, confidences = [], []
    for index, (height, width) in enumerate(sizes):
        jpeg = encode(random_image(width, height, seed=10 + index))
        probabilities = _probabilities(server.url, jpeg)
        masks.append(probabilities[0].argmax(axis=0))
        confidences.append(probabilities[0].max(axis=0).ravel())
    after = _metrics(server.url)

    def delta(name, **labels):
        return _model_series(after, name, **labels) - _model_series(before, name, **labels)

    assert delta(alerts.IMAGES) == 3
    for c, name in enumerate(CLASS_NAMES):
        expected = sum(int((mask == c).sum()) for mask in masks)
        assert delta(alerts.PREDICTED_PIXELS, **{"class": name}) == pytest.approx(expected,
                                                                                  abs=2)
    pixels = sum(h * w for h, w in sizes)
    assert delta(alerts.PIXEL_CONFIDENCE + "_count") == pixels
    counts = drift.confidence_counts(np.concatenate(confidences))
    assert delta(alerts.PIXEL_CONFIDENCE + "_bucket", le="0.5") == pytest.approx(
        counts[:10].sum(), abs=3)
    assert delta(alerts.IMAGE_PIXELS + "_sum") == pixels
    assert delta(alerts.IMAGE_PIXELS + "_bucket", le="4096.0") == 2  # 56x40 and 47x33
    # the session's model has no training baseline: counted, no drift
    assert _model_series(after, alerts.DRIFT_BASELINE) == 0
    assert math.isnan(_model_series(after, alerts.DRIFT_CLASS_SHIFT))


@pytest.fixture(scope="module")
def baseline_model(model_uri, tmp_path_factory):
    """The session's model with a baseline: training labels all of class 0, validation
    confidence all in the top bin."""
    from kubeseg.artifact import ClassInfo, load_model, save_artifact

    model, info = load_model(model_uri)
    confidence = [0] * drift.CONFIDENCE_BINS
    confidence[-1] = 100
    baseline = drift.TrainingBaseline(class_pixels=(90.0, 5.0, 5.0), train_images=4,
                                      confidence_pixels=tuple(confidence),
                                      predicted_pixels=(90, 5, 5), validation_images=2)
    uri = str(tmp_path_factory.mktemp("baseline") / "model")
    save_artifact(uri, model=model, hyperparameters=info.hyperparameters,
                  classes=ClassInfo(names=info.class_names), mean=info.mean, std=info.std,
                  baseline=baseline.to_dict())
    return uri, baseline


def _serve(model_uri, tmp_path, *args):
    from kubeseg.serving.process import model_server
    from serving_support import free_port

    return model_server(model_uri, free_port(), log_path=tmp_path / "server.log",
                        env=dict(os.environ, OMP_NUM_THREADS="1"),
                        args=["--model-name", "shapes", "--threads", "1", *args])


@pytest.mark.slow  # starts its own server
def test_drift_gauges_follow_the_window_against_the_baseline(baseline_model, tmp_path):
    uri, baseline = baseline_model
    with _serve(uri, tmp_path, "--drift-window", "2") as running:
        first = encode(random_image(48, 40, seed=21))
        _probabilities(running.url, first)
        metrics = _metrics(running.url)
        assert _model_series(metrics, alerts.DRIFT_BASELINE) == 1
        assert _model_series(metrics, alerts.DRIFT_WINDOW_IMAGES) == 1
        assert math.isnan(_model_series(metrics, alerts.DRIFT_CLASS_SHIFT))  # not full yet
        answers = [_probabilities(running.url, encode(random_image(48, 40, seed=s)))
                   for s in (22, 23)]
        metrics = _metrics(running.url)
    classes = sum(np.bincount(p[0].argmax(axis=0).ravel(), minlength=3) for p in answers)
    confidence = np.concatenate([p[0].max(axis=0).ravel() for p in answers])
    assert _model_series(metrics, alerts.DRIFT_WINDOW_IMAGES) == 2
    assert _model_series(metrics, alerts.DRIFT_CLASS_SHIFT) == pytest.approx(
        drift.jensen_shannon_distance(baseline.class_pixels, classes), abs=1e-3)
    low = drift.low_confidence_fraction(drift.confidence_counts(confidence))
    assert _model_series(metrics, alerts.DRIFT_LOW_CONFIDENCE) == pytest.approx(low, abs=1e-3)
    assert _model_series(metrics, alerts.DRIFT_LOW_CONFIDENCE_BASELINE) == 0.0
    assert _model_series(metrics, alerts.DRIFT_LOW_CONFIDENCE_EXCESS) == pytest.approx(
        low, abs=1e-3)


@pytest.mark.slow  # starts its own server
def test_no_monitoring_counts_nothing(baseline_model, tmp_path):
    with _serve(baseline_model[0], tmp_path, "--no-monitoring") as running:
        _probabilities(running.url, encode(random_image(32, 32, seed=1)))
        metrics = _metrics(running.url)
    assert ("kubeseg_requests_total", (("route", "/invocations"), ("status", "200"))) in metrics
    assert not any(name.startswith(("kubeseg_drift", "kubeseg_predicted", "kubeseg_images"))
                   for name, _ in metrics)


def test_batch_summary_holds_the_same_figures(baseline_model, tmp_path):
    from kubeseg.serving.batch import BatchOptions, batch_predict

    uri, baseline = baseline_model
    folder = tmp_path / "in"
    folder.mkdir()
    for index in range(3):
        random_image(40 + 8 * index, 32, seed=30 + index).save(folder / f"{index}.jpg")
    summary = batch_predict(uri, str(folder), str(tmp_path / "out"),
                            options=BatchOptions(device="cpu", progress=False, threads=1))
    written = json.loads((tmp_path / "out" / "_batch_summary.json").read_text())
    monitoring = written["monitoring"]
    assert monitoring == summary["monitoring"] and monitoring["images"] == 3
    masks = [np.asarray(Image.open(tmp_path / "out" / f"{i}.png")) for i in range(3)]
    counted = sum(np.bincount(m.ravel(), minlength=3) for m in masks)
    assert list(monitoring["predicted_pixels"].values()) == counted.tolist()
    assert list(monitoring["predicted_pixels"]) == CLASS_NAMES
    assert sum(monitoring["confidence_pixels"]) == monitoring["pixels"] == int(counted.sum())
    assert monitoring["class_shift"] == pytest.approx(
        drift.jensen_shannon_distance(baseline.class_pixels, counted))
    assert monitoring["baseline"] is True and monitoring["low_confidence_excess"] is not None
