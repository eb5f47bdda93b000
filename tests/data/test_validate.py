import io
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from kubeseg import storage
from kubeseg.cli import main as cli_main
from kubeseg.data.channels import Channels
from kubeseg.data.synthetic import make_shapes_dataset
from kubeseg.data.validate import validate_dataset

CAMVID_CLASSES = ["Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence",
                  "Car", "Pedestrian", "Bicyclist"]


def test_camvid_validates_without_fatal_problems(camvid, tmp_path):
    report = validate_dataset(Channels.from_root(str(camvid)), 11, str(tmp_path), workers=4,
                              class_names=CAMVID_CLASSES)
    assert report.ok and report.fatal == []
    assert report.pairs == {"train": 367, "validation": 101}
    assert report.sizes["train"]["most_common"] == [["480x360", 367]]
    # Void (11) is a gap of the label map: one warning per split, its pixels count as ignore.
    assert [(p.kind, p.key) for p in report.warnings] == [("label_map_gap", "train"),
                                                          ("label_map_gap", "validation")]
    assert all(list(p.pixels) == [11] and "{11: " in p.message for p in report.warnings)
    assert all(n > 0 for n in report.histograms["train"])
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["ok"] is True and saved["counts"]["train_annotation"] == 367
    assert saved["class_histogram"]["train"][3]["name"] == "Road"
    assert saved["ignore_pixels"]["train"] > 0
    markdown = (tmp_path / "report.md").read_text()
    assert "**Result: OK**" in markdown and "| 8 | Car |" in markdown and "480x360" in markdown


def _corrupt_copy(root):
    make_shapes_dataset(root, n_train=6, n_val=2, size=40, num_classes=3, seed=4)
    train, ann = root / "train", root / "train_annotation"
    data = (train / "train_0001.jpg").read_bytes()
    (train / "train_0001.jpg").write_bytes(data[: len(data) // 2])  # truncated JPEG
    mask = np.asarray(Image.open(ann / "train_0002.png"))
    Image.fromarray(np.stack([mask] * 3, axis=-1), "RGB").save(ann / "train_0002.png")
    (ann / "train_0003.png").unlink()  # image without annotation
    mask = np.asarray(Image.open(ann / "train_0004.png")).copy()
    mask[5, 5] = 40
    Image.fromarray(mask, "L").save(ann / "train_0004.png")
    (root / "label_map").rename(root / "unused_label_map")


def test_corrupted_copy_fails_naming_exactly_the_bad_keys(tmp_path, capsys):
    _corrupt_copy(tmp_path / "data")
    report = validate_dataset(Channels.from_root(str(tmp_path / "data")), 11, str(tmp_path / "r"))
    assert report.fatal_keys == ["train_0001", "train_0002", "train_0003", "train_0004"]
    kinds = {p.key: p.kind for p in report.fatal}
    assert kinds == {"train_0001": "corrupt_image", "train_0002": "annotation_not_single_channel",
                     "train_0003": "missing_annotation", "train_0004": "label_out_of_range"}
    # Classes 3..10 have no pixels: warnings only.
    assert {p.kind for p in report.warnings} == {"class_without_pixels"}
    saved = json.loads((tmp_path / "r" / "report.json").read_text())
    assert saved["ok"] is False and saved["fatal_keys"] == report.fatal_keys
    assert "`train_0004`" in (tmp_path / "r" / "report.md").read_text()
    rc = cli_main(["validate", "--data-root", str(tmp_path / "data"), "--num-classes", "11"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "4 key(s): train_0001 (corrupt_image: " in err
    # each key comes with its cause: the file and what is wrong with it
    assert "train_0004.png: class ids [40] >= num_classes=11" in err
    assert "train_0002 (annotation_not_single_channel: " in err and "mode RGB" in err


def test_size_mismatch_missing_image_and_empty_channel(tmp_path):
    make_shapes_dataset(tmp_path, n_train=3, n_val=2, size=32, num_classes=3)
    Image.new("L", (31, 32)).save(tmp_path / "train_annotation" / "train_0000.png")
    shutil.copy(tmp_path / "train_annotation" / "train_0001.png",
                tmp_path / "train_annotation" / "orphan.png")
    for p in (tmp_path / "validation").iterdir():
        p.unlink()
    report = validate_dataset(Channels.from_root(str(tmp_path)), 3)
    kinds = sorted((p.kind, p.key) for p in report.fatal)
    assert ("size_mismatch", "train_0000") in kinds
    assert ("missing_image", "orphan") in kinds
    assert ("empty_channel", "validation") in kinds


def test_validates_s3_channels(bucket, tmp_path):
    make_shapes_dataset(tmp_path, n_train=4, n_val=2, size=32, num_classes=3)
    storage.upload_prefix(str(tmp_path), f"{bucket}/ds")
    channels = Channels.from_root(f"{bucket}/ds")
    assert channels.label_map == f"{bucket}/ds/label_map"
    report = validate_dataset(channels, 3, f"{bucket}/report")
    assert report.ok and report.pairs == {"train": 4, "validation": 2}
    assert json.loads(storage.read_text(f"{bucket}/report/report.json"))["ok"] is True


def test_jpeg_annotation_stray_values_and_special_files_are_named(tmp_path):
    make_shapes_dataset(tmp_path, n_train=4, n_val=1, size=32, num_classes=3)
    ann = tmp_path / "train_annotation"
    mask = np.asarray(Image.open(ann / "train_0001.png")).copy()
    buf = io.BytesIO()
    Image.fromarray(mask, "L").save(buf, format="JPEG")  # lossy, saved under the .png name
    (ann / "train_0001.png").write_bytes(buf.getvalue())
    mask = np.asarray(Image.open(ann / "train_0002.png")).copy()
    mask[0, :3], mask[1, :2] = 50, 200  # values the label map does not map
    Image.fromarray(mask, "L").save(ann / "train_0002.png")
    (ann / "train_0003.png").unlink()
    os.mkfifo(ann / "train_0003.png")  # opening it would block forever
    report = validate_dataset(Channels.from_root(str(tmp_path)), 3, str(tmp_path / "r"))
    fatal = {p.key: p for p in report.fatal}
    assert fatal["train_0001"].kind == "annotation_not_png"
    assert str(ann / "train_0001.png") in fatal["train_0001"].message
    assert "JPEG" in fatal["train_0001"].message
    assert fatal["train_0003"].kind == "unreadable_annotation"
    assert "FIFO" in fatal["train_0003"].message
    (stray,) = [p for p in report.warnings if p.kind == "unexplained_label_values"]
    assert stray.key == "train_0002" and str(ann / "train_0002.png") in stray.message
    assert "{50: 3, 200: 2}" in stray.message and stray.pixels == {50: 3, 200: 2}
    assert "train_0002.png" in (tmp_path / "r" / "report.md").read_text()


def test_wrong_credentials_show_the_storage_error_code(bucket, tmp_path, monkeypatch, capsys):
    make_shapes_dataset(tmp_path, n_train=2, n_val=1, size=32, num_classes=3)
    storage.upload_prefix(str(tmp_path), f"{bucket}/ds")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    rc = cli_main(["validate", "--data-root", f"{bucket}/ds", "--num-classes", "3"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "unreadable_channel" in err and "SignatureDoesNotMatch" in err, err
    assert "not-the-secret" not in err


def test_training_checks_labels_before_it_starts(tmp_path):
    from kubeseg.data.datasets import FolderDataset
    from kubeseg.engine.train import check_labels
    from kubeseg.errors import DataError

    make_shapes_dataset(tmp_path, n_train=4, n_val=1, size=32, num_classes=3)
    ann = tmp_path / "train_annotation"
    mask = np.asarray(Image.open(ann / "train_0002.png")).copy()
    mask[3, 3] = 11
    Image.fromarray(mask, "L").save(ann / "train_0002.png")
    dataset = FolderDataset(str(tmp_path / "train"), str(ann))  # no label map: scale 1
    check_labels(FolderDataset(str(tmp_path / "validation"),
                               str(tmp_path / "validation_annotation")), 3)
    with pytest.raises(DataError) as caught:
        check_labels(dataset, 3)
    message = str(caught.value)
    assert "1 annotation file(s)" in message and "num_classes=3" in message
    assert f"{ann / 'train_0002.png'}: [11]" in message
    check_labels(dataset, 12)  # in range for 12 classes


def test_label_maps_written_as_the_reference_documents_them_validate(tmp_path, capsys):
    """``{"scale": "1"}`` and string pixel values in ``map``, as in the reference's docs."""
    make_shapes_dataset(tmp_path, n_train=3, n_val=2, size=32, num_classes=3)
    (tmp_path / "label_map" / "train_label_map.json").write_text('{"scale": "1"}')
    (tmp_path / "label_map" / "validation_label_map.json").write_text(
        '{"map": {"0": "0", "1": "1", "2": "2"}}')
    report = validate_dataset(Channels.from_root(str(tmp_path)), 3)
    assert report.ok, [p.message for p in report.fatal]
    assert report.label_maps == {"train": {"scale": 1},
                                 "validation": {"map": {"0": 0, "1": 1, "2": 2}}}
    assert cli_main(["validate", "--data-root", str(tmp_path), "--num-classes", "3"]) == 0
    (tmp_path / "label_map" / "train_label_map.json").write_text('{"scale": "x"}')
    assert cli_main(["validate", "--data-root", str(tmp_path), "--num-classes", "3"]) == 1
    assert "label_map (bad_label_map" in capsys.readouterr().err


def _void_and_stray_values(root):
    """Six training annotations of a 3-class set, each with void (3, right after the classes,
    left out of the label map) and two with stray values 50 and 200."""
    make_shapes_dataset(root, n_train=6, n_val=2, size=32, num_classes=3)
    ann = root / "train_annotation"
    for i, path in enumerate(sorted(ann.glob("*.png"))):
        mask = np.asarray(Image.open(path)).copy()
        mask[-1, :4] = 3
        if i == 2:
            mask[0, :3] = 50
        if i == 4:
            mask[0, :2], mask[1, :5] = 200, 50
        Image.fromarray(mask, "L").save(path)


def test_label_map_gaps_are_one_line_and_stray_values_stand_apart(tmp_path, capsys):
    _void_and_stray_values(tmp_path / "data")
    report = validate_dataset(Channels.from_root(str(tmp_path / "data")), 3,
                              str(tmp_path / "r"))
    assert report.ok
    groups = {(g.severity, g.kind): g for g in report.summary}
    gaps = groups[("warning", "label_map_gap")]
    assert gaps.pixels == {3: 6 * 4} and "in 6 file(s)" in gaps.message
    stray = groups[("warning", "unexplained_label_values")]
    assert stray.keys == ["train_0002", "train_0004"]
    assert stray.pixels == {50: 3 + 5, 200: 2}
    rc = cli_main(["validate", "--data-root", str(tmp_path / "data"), "--num-classes", "3"])
    out = capsys.readouterr().out
    assert rc == 0
    lines = [line for line in out.splitlines() if line.startswith("warning")]
    # the stray values first, on a line of their own with their pixel counts; the gap once
    assert len(lines) == 2, out
    assert lines[0].startswith("warning: unexplained_label_values in 2 keys of "
                               "train_annotation (e.g. train_0002, train_0004); "
                               "pixel values {50: 8, 200: 2}"), lines[0]
    assert "label_map_gap" in lines[1] and "{3: 24}" in lines[1], lines[1]
    saved = json.loads((tmp_path / "r" / "report.json").read_text())
    assert [g["kind"] for g in saved["summary"]] == ["unexplained_label_values",
                                                     "label_map_gap"]
    assert saved["summary"][0]["pixels"] == {"50": 8, "200": 2}


def test_strict_labels_make_stray_values_fatal(tmp_path, capsys):
    _void_and_stray_values(tmp_path / "data")
    rc = cli_main(["validate", "--data-root", str(tmp_path / "data"), "--num-classes", "3",
                   "--strict-labels"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "2 fatal problem(s) in 2 key(s): train_0002 (unexplained_label_values: " in err
    assert "{50: 5, 200: 2}" in err  # train_0004's values and pixels
    assert "label_map_gap" not in err  # the gaps stay a warning
