"""Evaluation end to end on a tiny generated dataset with a small random-weight model: the
metrics agree with an independently computed confusion matrix, every output is written (local
and S3) and described by the result, the gate applied afterwards and the CLI behave as
documented."""
import html
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kubeseg import storage
from kubeseg.artifact import ClassInfo, save_artifact
from kubeseg.config import Hyperparameters
from kubeseg.data.synthetic import class_names, make_shapes_dataset
from kubeseg.engine.evaluate import EvalOptions, Scoring, evaluate

NUM_CLASSES = 3
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
OUTPUTS = ("metrics.json", "confusion_matrix.json", "confusion_matrix.png", "report.md",
           "report.html")


def _channels(data: dict, **changes):
    from kubeseg.data.channels import Channels

    values = dict(validation=data["validation"],
                  validation_annotation=data["validation_annotation"],
                  label_map=data["label_map"])
    values.update(changes)
    return Channels(**values)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes"), n_train=2, n_val=3, size=40,
                               num_classes=NUM_CLASSES, seed=3)


@pytest.fixture(scope="module")
def model_uri(tmp_path_factory):
    from kubeseg.models import build_model

    torch.manual_seed(0)
    hp = Hyperparameters.from_dict({"num_classes": NUM_CLASSES, "num_training_samples": 2,
                                    "backbone": "resnet-18", "algorithm": "fcn",
                                    "use_pretrained_model": False})
    model = build_model(algorithm="fcn", backbone="resnet-18", num_classes=NUM_CLASSES,
                        aux_loss=False)
    uri = str(tmp_path_factory.mktemp("model") / "model")
    save_artifact(uri, model=model, hyperparameters=hp,
                  classes=ClassInfo(names=class_names(NUM_CLASSES)))
    return uri


def _reference_matrix(model_uri: str, data: dict) -> np.ndarray:
    """The confusion matrix computed without kubeseg's data, inference or metrics code."""
    from kubeseg.artifact import load_model

    model, _ = load_model(model_uri)
    matrix = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
    for path in sorted(Path(data["validation"]).glob("*.jpg")):
        rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
        x = torch.from_numpy(((rgb - MEAN) / STD).astype(np.float32)).permute(2, 0, 1)[None]
        with torch.no_grad():
            pred = model(x)["out"].argmax(1)[0].numpy()
        gt = np.asarray(Image.open(Path(data["validation_annotation"]) / f"{path.stem}.png"))
        keep = gt < NUM_CLASSES
        matrix += np.bincount(gt[keep].astype(np.int64) * NUM_CLASSES + pred[keep],
                              minlength=NUM_CLASSES ** 2).reshape(NUM_CLASSES, NUM_CLASSES)
    return matrix


def test_writes_every_output_and_matches_an_independent_confusion_matrix(model_uri, data,
                                                                         tmp_path, caplog):
    out = tmp_path / "eval"
    with caplog.at_level(logging.INFO, logger="kubeseg.engine.evaluate"):
        result = evaluate(model_uri, _channels(data), str(out), device="cpu",
                          options=EvalOptions(num_overlays=2, workers=0, log_every=1))
    for name in OUTPUTS:
        assert (out / name).is_file(), name
    overlays = sorted((out / "overlays").glob("*.png"))
    assert len(overlays) == 2
    assert sorted(result.files) == sorted([*OUTPUTS, *result.overlays])
    assert all(Path(uri).is_file() for uri in result.files.values())
    assert sorted(result.overlays) == [p.relative_to(out).as_posix() for p in overlays]
    assert not [p for p in out.rglob(".*")], "temporary files left behind"

    cm = json.loads((out / "confusion_matrix.json").read_text())
    assert cm["class_names"] == class_names(NUM_CLASSES)
    expected = _reference_matrix(model_uri, data)
    assert np.array_equal(np.array(cm["matrix"]), expected)
    assert np.array_equal(np.array(result.matrix), expected)

    metrics = json.loads((out / "metrics.json").read_text())
    tp = np.diag(expected).astype(float)
    union = expected.sum(0) + expected.sum(1) - tp
    present = union > 0
    assert metrics["mIOU"] == pytest.approx(float((tp[present] / union[present]).mean()))
    assert metrics["pixel_accuracy"] == pytest.approx(tp.sum() / expected.sum())
    assert metrics["images"] == 3 and metrics["pixels"] == int(expected.sum())
    assert [row["name"] for row in metrics["per_class"]] == class_names(NUM_CLASSES)
    assert metrics == result.metrics
    assert not (out / "gate.json").exists()

    md = (out / "report.md").read_text()
    assert "| 1 | disc |" in md and f"({overlays[0].relative_to(out).as_posix()})" in md
    assert (out / "report.html").read_text().count("data:image/png;base64,") == 3
    picture = Image.open(overlays[0])
    assert picture.width >= 3 * 256  # three panels, enlarged from 40 px
    assert any("evaluated 3/3 images" in r.getMessage() for r in caplog.records)


def test_sliding_window_scales_and_flip_are_applied_and_recorded(model_uri, data, tmp_path):
    result = evaluate(model_uri, _channels(data), str(tmp_path / "tta"), device="cpu",
                      scoring=Scoring(tile_size=24, scales=(0.75, 1.0), flip=True),
                      options=EvalOptions(num_overlays=0, workers=0))
    summary = result.metrics
    assert summary["settings"] == {"tile_size": 24, "tile_overlap": 0.3333, "scales": [0.75, 1.0],
                                   "flip": True, "device": "cpu", "inference_size": "image"}
    assert summary["pixels"] == 3 * 40 * 40 - _ignored_pixels(data)
    assert not (tmp_path / "tta" / "overlays").exists()


def _ignored_pixels(data) -> int:
    return sum(int((np.asarray(Image.open(p)) >= NUM_CLASSES).sum())
               for p in Path(data["validation_annotation"]).glob("*.png"))


def test_the_gate_applied_to_a_result_is_written_and_reported(model_uri, data, tmp_path):
    from kubeseg.engine.gate import apply_gate

    out = tmp_path / "gated"
    result = evaluate(model_uri, _channels(data), str(out), device="cpu",
                      options=EvalOptions(num_overlays=0, workers=0))
    assert "quality gate" not in (out / "report.md").read_text()
    decision = apply_gate(result, min_miou=1.0)
    assert decision.passed is False and decision.miou == pytest.approx(result.metrics["mIOU"])
    gate = json.loads((out / "gate.json").read_text())
    assert gate["passed"] is False and "< minimum 1.0000" in gate["reason"]
    assert gate["reason"] in (out / "report.md").read_text()
    assert html.escape(gate["reason"]) in (out / "report.html").read_text()


def test_bad_scoring_options_fail_before_any_work(model_uri, data, tmp_path):
    from kubeseg.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        evaluate(model_uri, _channels(data), str(tmp_path / "x"),
                 scoring=Scoring(scales=(0.0,), tile_overlap=1.5, tile_size=-1))
    text = str(err.value)
    assert "scales" in text and "tile_overlap" in text and "tile_size" in text
    assert not (tmp_path / "x").exists()


def test_publish_evaluation_fills_the_pipeline_outputs(model_uri, data, tmp_path):
    from kfp.dsl import HTML, ClassificationMetrics, Markdown, Metrics

    from kubeseg.engine.evaluate import publish_evaluation
    from kubeseg.engine.gate import apply_gate

    result = evaluate(model_uri, _channels(data), str(tmp_path / "eval"), device="cpu",
                      options=EvalOptions(num_overlays=1, workers=0))
    decision = apply_gate(result, min_miou=0.0)
    metrics, confusion, report, summary = (kind(uri=str(tmp_path / name)) for kind, name in (
        (Metrics, "metrics"), (ClassificationMetrics, "cm"), (HTML, "report.html"),
        (Markdown, "summary.md")))
    publish_evaluation(result, decision, metrics, confusion, report, summary)
    assert metrics.metadata["mIOU"] == pytest.approx(result.metrics["mIOU"])
    assert metrics.metadata["gate_passed"] is True
    assert metrics.metadata["evaluation_uri"] == str(tmp_path / "eval")
    assert metrics.metadata["metrics_uri"] == str(tmp_path / "eval" / "metrics.json")
    assert metrics.metadata["gate_reason"] == decision.reason
    for row in result.metrics["per_class"]:
        if row["iou"] is not None:
            assert metrics.metadata[f"iou/{row['name']}"] == pytest.approx(row["iou"])
    logged = confusion.metadata["confusionMatrix"]
    assert [c["displayName"] for c in logged["annotationSpecs"]] == class_names(NUM_CLASSES)
    assert logged["rows"] == [{"row": row} for row in result.matrix]
    page = Path(report.path).read_text()
    assert html.escape(decision.reason) in page and page.count("data:image/png;base64,") == 2
    text = Path(summary.path).read_text()
    assert decision.reason in text and "](" not in text  # no links the viewer cannot follow


def test_evaluates_from_and_to_object_storage(model_uri, data, bucket):
    storage.upload_prefix(str(Path(model_uri)), f"{bucket}/run/model")
    for name in ("validation", "validation_annotation", "label_map"):
        storage.upload_prefix(data[name], f"{bucket}/data/{name}")
    channels = _channels({name: f"{bucket}/data/{name}" for name in
                          ("validation", "validation_annotation", "label_map")})
    result = evaluate(f"{bucket}/run/model", channels, f"{bucket}/run/eval", device="cpu",
                      options=EvalOptions(num_overlays=1, workers=0))
    names = storage.list_files(f"{bucket}/run/eval")
    assert set(OUTPUTS) <= set(names)
    assert len([n for n in names if n.startswith("overlays/")]) == 1
    remote = json.loads(storage.read_text(f"{bucket}/run/eval/confusion_matrix.json"))
    assert np.array_equal(np.array(remote["matrix"]), _reference_matrix(model_uri, data))
    assert result.metrics["model"].startswith(bucket)
    assert result.uri("report.html") == f"{bucket}/run/eval/report.html"


def test_cli_prints_the_gate_and_exits_3_when_it_fails(model_uri, data, tmp_path, capsys):
    from kubeseg.cli import main

    base = ["evaluate", model_uri, "--validation", data["validation"],
            "--validation-annotation", data["validation_annotation"], "--label-map",
            data["label_map"], "--device", "cpu", "--workers", "0", "--overlays", "0"]
    assert main(base + ["--output", str(tmp_path / "a")]) == 0
    first = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert "mIoU" in capsys.readouterr().out

    code = main(base + ["--output", str(tmp_path / "b"), "--min-miou", "0.99"])
    assert code == 3
    assert "quality gate: failed" in capsys.readouterr().out

    # champion/challenger against the first evaluation: equal mIoU passes with no tolerance
    code = main(base + ["--output", str(tmp_path / "c"), "--previous-metrics",
                        str(tmp_path / "a"), "--max-regression", "0"])
    assert code == 0, capsys.readouterr()
    assert json.loads((tmp_path / "c" / "gate.json").read_text())["previous_miou"] == \
        pytest.approx(first["mIOU"])


def test_cli_errors_name_what_to_fix(model_uri, data, tmp_path, capsys):
    from kubeseg.cli import main

    assert main(["evaluate", model_uri, "--output", str(tmp_path / "o")]) == 1
    assert "--validation" in capsys.readouterr().err
    assert main(["evaluate", model_uri, "--data-root", str(Path(data["validation"]).parent),
                 "--output", str(tmp_path / "o"), "--scales", "1,x"]) == 1
    assert "--scales" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "nothing"), "--data-root",
                 str(Path(data["validation"]).parent), "--output", str(tmp_path / "o")]) == 1
    assert "not a kubeseg model artifact" in capsys.readouterr().err


def test_shards_give_the_same_matrix_as_the_folders(model_uri, data, tmp_path):
    from kubeseg.data.channels import Channels
    from kubeseg.data.ingest import ingest_channels

    ingest_channels(_channels(data), str(tmp_path / "shards"), splits=["validation"], workers=2)
    result = evaluate(model_uri, Channels(shards=str(tmp_path / "shards")),
                      str(tmp_path / "eval"), device="cpu",
                      options=EvalOptions(num_overlays=3, workers=0))
    matrix = json.loads((tmp_path / "eval" / "confusion_matrix.json").read_text())["matrix"]
    assert np.array_equal(np.array(matrix), _reference_matrix(model_uri, data))
    assert result.metrics["images"] == 3
    overlays = sorted(p.stem for p in (tmp_path / "eval" / "overlays").glob("*.png"))
    assert overlays == sorted(p.stem for p in Path(data["validation"]).glob("*.jpg"))


def test_the_report_shows_the_training_baseline_and_this_splits_drift(model_uri, data,
                                                                      tmp_path):
    """An artifact with a baseline: its training shares per class and its validation
    confidence beside this split's, and this split's class shift against the training labels
    (here, the predicted pixels are the confusion matrix's columns: the shapes have no ignore
    pixels). An artifact without one (the fixture's, as written before baselines) says so."""
    from kubeseg.artifact import load_model
    from kubeseg.monitoring import drift

    model, info = load_model(model_uri)
    confidence = [0] * drift.CONFIDENCE_BINS
    confidence[3], confidence[19] = 1, 3
    baseline = drift.TrainingBaseline(class_pixels=(6.0, 3.0, 1.0), train_images=2,
                                      confidence_pixels=tuple(confidence),
                                      predicted_pixels=(5, 4, 1), validation_images=3)
    uri = str(tmp_path / "with-baseline")
    save_artifact(uri, model=model, hyperparameters=info.hyperparameters,
                  classes=ClassInfo(names=info.class_names), baseline=baseline.to_dict())
    result = evaluate(uri, _channels(data), str(tmp_path / "eval"),
                      options=EvalOptions(num_overlays=0, workers=0))
    monitoring = result.metrics["monitoring"]
    assert [row["train_share"] for row in result.per_class] == pytest.approx([0.6, 0.3, 0.1])
    predicted = np.array(result.matrix).sum(axis=0)
    assert monitoring["class_shift"] == pytest.approx(
        drift.jensen_shannon_distance(baseline.class_pixels, predicted))
    assert sum(monitoring["confidence_pixels"]) == 3 * 40 * 40
    assert monitoring["baseline_low_confidence_fraction"] == pytest.approx(0.25)
    assert monitoring["low_confidence_excess"] == pytest.approx(
        monitoring["low_confidence_fraction"] - 0.25)
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "on the validation split at training time" in report and "| 60.00% |" in report
    old = evaluate(model_uri, _channels(data), str(tmp_path / "old"),
                   options=EvalOptions(num_overlays=0, workers=0))
    assert old.metrics["monitoring"]["baseline"] is None
    assert old.per_class[0]["train_share"] is None
    assert "records no training baseline" in (tmp_path / "old" / "report.md").read_text()
