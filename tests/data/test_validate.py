import json
import shutil

import numpy as np
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
    # Void (11) is not in the label map: a warning, and its pixels count as ignore.
    assert {p.kind for p in report.warnings} == {"unmapped_values"}
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
    assert "4 key(s): train_0001 (corrupt_image), train_0002" in err


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
    assert "label_map (bad_label_map)" in capsys.readouterr().err
