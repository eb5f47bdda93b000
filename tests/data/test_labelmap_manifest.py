import json

import numpy as np
import pytest

from kubeseg.data.channels import Channels, list_pairs
from kubeseg.data.labelmap import LabelMap
from kubeseg.data.manifest import ColorMap, parse_manifest
from kubeseg.errors import DataError


def test_label_map_forms():
    mask = np.array([[0, 1, 2, 255], [10, 20, 21, 7]], dtype=np.uint8)
    np.testing.assert_array_equal(LabelMap().apply(mask), mask)
    np.testing.assert_array_equal(LabelMap.from_dict({"scale": 10}).apply(mask),
                                  [[0, 0, 0, 255], [1, 2, 2, 0]])
    mapped = LabelMap.from_dict({"map": {"0": 10, "1": 20, "2": 255}}).apply(mask)
    np.testing.assert_array_equal(mapped, [[255, 255, 255, 2], [0, 1, 255, 255]])


@pytest.mark.parametrize("data,same_as", [
    ({"scale": "1"}, {"scale": 1}), ({"scale": " 10 "}, {"scale": 10}),
    ({"scale": 10.0}, {"scale": 10}), ({"scale": "2.0"}, {"scale": 2}),
    ({"map": {"0": "10", "1": 20, "2": " 255"}}, {"map": {"0": 10, "1": 20, "2": 255}}),
    ({"map": {"0": 10.0, "1": "20"}}, {"map": {"0": 10, "1": 20}})])
def test_label_map_numbers_may_be_json_numbers_or_strings(data, same_as):
    mask = np.arange(256, dtype=np.uint8).reshape(16, 16)
    parsed = LabelMap.from_dict(data)
    assert parsed.to_dict() == same_as
    np.testing.assert_array_equal(parsed.apply(mask), LabelMap.from_dict(same_as).apply(mask))


@pytest.mark.parametrize("data,message", [
    ({"scale": "one"}, r"\"scale\" must be an integer in \[1, 255\].*'one'"),
    ({"scale": "1.5"}, "scale"), ({"scale": True}, "scale"), ({"scale": "0"}, "scale"),
    ({"map": {"0": "ten"}}, r"class 0: pixel value 'ten' is not an integer in \[0, 255\]"),
    ({"map": {"0": "256"}}, "0, 255"), ({"map": {"0": "1", "1": 1}}, "both class 0 and class 1"),
    ({"map": {"0": 1, "00": 2}}, "class 0 is given twice"),
    ({"scale": 0}, "scale"), ({"map": {"a": 1}}, "not an integer"),
    ({"map": {"0": 1, "1": 1}}, "both class 0 and class 1"), ({"map": {"0": 300}}, "0, 255"),
    ({"scale": 1, "map": {}}, "exactly one"), ([1], "JSON object")])
def test_malformed_label_maps_are_clear_errors(data, message):
    with pytest.raises(DataError, match=message):
        LabelMap.from_dict(data, source="x.json")


def test_label_map_loading(tmp_path):
    (tmp_path / "train_label_map.json").write_text(json.dumps({"map": {"0": 5}}))
    assert LabelMap.load(str(tmp_path), "validation").mapping == {0: 5}  # falls back to train
    (tmp_path / "validation_label_map.json").write_text("{not json")
    with pytest.raises(DataError, match="validation_label_map.json: invalid JSON at line 1"):
        LabelMap.load(str(tmp_path), "validation")
    assert LabelMap.load(None).to_dict() == {"scale": 1}
    with pytest.raises(DataError, match="none of"):
        LabelMap.load(str(tmp_path / "nothing"))


def test_pairing_reports_both_directions(tmp_path):
    images, annotations = tmp_path / "img", tmp_path / "ann"
    images.mkdir()
    annotations.mkdir()
    for name in ("a.jpg", "b.JPEG", "c.png", "d.jpg", "notes.txt"):
        (images / name).write_bytes(b"x")
    for name in ("a.png", "b.png", "c.png", "e.png"):
        (annotations / name).write_bytes(b"x")
    pairing = list_pairs(str(images), str(annotations))
    assert [p.key for p in pairing.pairs] == ["a", "b", "c"]
    assert pairing.pairs[1].image == str(images / "b.JPEG")
    assert pairing.images_without_annotation == ["d"]
    assert pairing.annotations_without_image == ["e"]
    assert pairing.ignored_files == ["notes.txt"]
    channels = Channels.from_root(str(tmp_path))
    assert channels.label_map is None and channels.train == str(tmp_path / "train")


def test_manifest_bad_lines_have_line_numbers():
    good = {"source-ref": "s3://bkt/i/1.jpg", "lab-ref": "s3://bkt/l/1.png"}
    lines = [json.dumps(good),
             "{oops",
             json.dumps({"source-ref": "s3://bkt/i/2.jpg"}),
             json.dumps({"source-ref": "http://host/3.jpg", "lab-ref": "s3://bkt/l/3.png"}),
             json.dumps(good),
             "",
             json.dumps({"source-ref": "s3://bkt/i/4.jpg", "lab-ref": "s3://bkt/l/4.png"})]
    manifest = parse_manifest("\n".join(lines), source="m.jsonl")
    assert manifest.attribute_names == ("source-ref", "lab-ref")
    assert [(p.line, p.kind) for p in manifest.problems] == [
        (2, "invalid_json"), (3, "missing_attribute"), (4, "bad_uri"), (5, "duplicate")]
    assert [e.line for e in manifest.entries] == [1, 7]
    with pytest.raises(DataError, match="2 .*\n.*line 2: invalid JSON|line 2: invalid JSON"):
        manifest.raise_if_problems()
    with pytest.raises(DataError, match="several label attributes"):
        parse_manifest(json.dumps({"source-ref": "s3://bkt/a.jpg", "a-ref": "s3://bkt/a.png",
                                   "b-ref": "s3://bkt/b.png"}))


def test_colour_map_converts_rgb_and_marks_unknown_colours_ignore():
    colours = ColorMap.from_metadata({"internal-color-map": {
        "0": {"class-name": "BACKGROUND", "hex-color": "#ffffff"},
        "2": {"class-name": "dog", "hex-color": "#ff0000"}}}, source="m")
    assert colours.class_names == ("BACKGROUND", "class_1", "dog")
    pixels = np.array([[[255, 255, 255], [255, 0, 0], [1, 2, 3]]], dtype=np.uint8)
    np.testing.assert_array_equal(colours.rgb_to_classes(pixels), [[0, 2, 255]])
    with pytest.raises(DataError, match="hex-color"):
        ColorMap.from_metadata({"internal-color-map": {"0": {"hex-color": "red"}}}, source="m")
