import io
import json

import numpy as np
import pytest
from PIL import Image

from kubeseg.data.channels import Channels, list_pairs
from kubeseg.data.labelmap import LabelMap
from kubeseg.data.manifest import ColorMap, decode_manifest_mask, hex_colour, parse_manifest
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


def test_manifest_bad_lines_have_line_numbers_and_repeats_are_kept():
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
        (2, "invalid_json"), (3, "missing_attribute"), (4, "bad_uri")]
    assert [e.line for e in manifest.entries] == [1, 5, 7]
    assert [(e.line, e.repeat_of) for e in manifest.repeated] == [(5, 1)]
    assert len({e.key for e in manifest.entries}) == 3  # the repeat gets a key of its own
    with pytest.raises(DataError) as err:
        manifest.raise_if_problems()
    assert "3 bad line(s)" in str(err.value)
    for text in ("line 2: invalid JSON", "line 3: missing attribute 'lab-ref'",
                 "line 4: source-ref: 'http://host/3.jpg'"):
        assert text in str(err.value)
    with pytest.raises(DataError, match="several label attributes"):
        parse_manifest(json.dumps({"source-ref": "s3://bkt/a.jpg", "a-ref": "s3://bkt/a.png",
                                   "b-ref": "s3://bkt/b.png"}))


def test_byte_order_mark_and_crlf_line_ends_are_tolerated():
    lines = [json.dumps({"source-ref": f"s3://bkt/i/{i}.jpg", "lab-ref": f"s3://bkt/l/{i}.png"})
             for i in range(3)]
    for text in ("\ufeff" + "\r\n".join(lines) + "\r\n", "\ufeff" + "\r".join(lines)):
        manifest = parse_manifest(text, source="m")
        assert manifest.problems == [] and [e.line for e in manifest.entries] == [1, 2, 3]
        assert manifest.entries[0].image == "s3://bkt/i/0.jpg"


def _gt_map(*entries):
    return {"internal-color-map": {str(i): {"class-name": n, "hex-color": c}
                                   for i, n, c in entries},
            "type": "groundtruth/semantic-segmentation"}


BG, CAR, PERSON, TREE = ("BACKGROUND", "#ffffff"), ("car", "#2ca02c"), ("person", "#1f77b4"), \
    ("tree", "#ff7f0e")


def _line(i, meta=None, key="labels-ref-metadata", attribute="labels-ref"):
    line = {"source-ref": f"s3://bkt/i/{i}.jpg", attribute: f"s3://bkt/l/{i}.png"}
    if meta is not None:
        line[key] = meta
    return json.dumps(line)


@pytest.mark.parametrize("key", ["labels-ref-metadata", "labels-metadata"])
def test_metadata_is_found_under_both_key_forms(key):
    manifest = parse_manifest(_line(0, _gt_map((0, *BG), (1, *CAR)), key=key))
    assert manifest.class_names == ["BACKGROUND", "car"]
    assert manifest.class_names_warning() is None
    assert manifest.entries[0].colour_map.class_names == ("BACKGROUND", "car")


def test_missing_class_names_warning_says_where_it_looked():
    manifest = parse_manifest(_line(0, _gt_map((0, *BG)), key="job-metadata"))
    assert manifest.class_names is None
    warning = manifest.class_names_warning()
    assert "'labels-ref-metadata' or 'labels-metadata'" in warning
    # An attribute not ending in -ref has one place to look.
    manifest = parse_manifest(_line(0, attribute="seg"), attribute_names=["source-ref", "seg"])
    assert manifest.metadata_keys == ("seg-metadata",)


def test_colour_maps_of_all_lines_are_merged_keyed_by_colour():
    lines = [_line(0, _gt_map((0, *BG), (1, *CAR))),
             _line(1, _gt_map((0, *BG), (1, *PERSON))),  # index 1 means another class here
             _line(2, _gt_map((0, *BG), (2, *TREE)), key="labels-metadata"),
             _line(3)]  # no map: values are merged class ids
    manifest = parse_manifest("\n".join(lines))
    assert manifest.problems == []
    classes = manifest.classes
    assert classes.class_names == ["BACKGROUND", "car", "tree", "person"]
    assert {hex_colour(c): i for c, i in classes.by_colour.items()} == {
        "#ffffff": 0, "#2ca02c": 1, "#ff7f0e": 2, "#1f77b4": 3}
    tables = [classes.line_table(e.colour_map) for e in manifest.entries]
    assert [t[1] for t in tables] == [1, 3, -1, 1]
    assert [t[2] for t in tables] == [-1, -1, 2, 2]
    assert all(t[255] == 255 for t in tables)
    pixels = np.array([[[255, 255, 255], [31, 119, 180], [1, 2, 3]]], dtype=np.uint8)
    mask, unknown = classes.rgb_to_classes(pixels)
    np.testing.assert_array_equal(mask, [[0, 3, 255]])
    assert unknown == {"#010203": 1}


def test_classes_of_an_earlier_split_keep_their_index():
    manifest = parse_manifest(_line(0, _gt_map((0, *BG), (1, *PERSON))),
                              known_classes=["BACKGROUND", "car", "person"])
    assert manifest.class_names == ["BACKGROUND", "car", "person"]
    assert manifest.classes.line_table(manifest.entries[0].colour_map)[1] == 2


def test_a_colour_meaning_two_classes_is_a_problem_naming_both_lines():
    lines = [_line(0, _gt_map((0, *BG), (1, *CAR))),
             _line(1, _gt_map((0, *BG), (1, *CAR))),
             _line(2, _gt_map((0, *BG), (1, "truck", CAR[1])), key="labels-metadata"),
             _line(3, {"internal-color-map": {"0": {"class-name": "x", "hex-color": "red"}}})]
    manifest = parse_manifest("\n".join(lines), source="m")
    assert [(p.line, p.kind) for p in manifest.problems] == [(3, "colour_map_conflict"),
                                                             (4, "bad_colour_map")]
    conflict = str(manifest.problems[0])
    assert "line 3" in conflict and "'truck' on line 3" in conflict \
        and "'car' on line 1" in conflict and "#2ca02c" in conflict
    assert "hex-color" in str(manifest.problems[1])
    assert [e.line for e in manifest.entries] == [1, 2]
    assert manifest.class_names == ["BACKGROUND", "car"]


def _png(mask, mode, palette=None):
    buf = io.BytesIO()
    image = Image.fromarray(mask, mode)
    if palette is not None:
        image.putpalette(palette + [0] * (768 - len(palette)))
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_mask_values_in_no_map_are_reported_not_silently_ignored():
    manifest = parse_manifest("\n".join([_line(0, _gt_map((0, *BG), (1, *CAR))),
                                         _line(1, _gt_map((0, *BG), (2, *TREE)))]))
    classes, own = manifest.classes, manifest.entries[0].colour_map
    # Palette mask of line 1: index 2 is not in its map, but its palette colour (tree) is in
    # line 2's; index 7 (black) is in no map.
    palette = [255, 255, 255, 44, 160, 44, 255, 127, 14] + [0, 0, 0] * 5
    mask = np.array([[0, 1, 2, 7, 255]], dtype=np.uint8)
    decoded = decode_manifest_mask(_png(mask, "P", palette), classes, own, source="m line 1")
    np.testing.assert_array_equal(decoded.classes, [[0, 1, 2, 255, 255]])
    assert decoded.unknown == {"index 7 (#000000 in the PNG palette)": 1}
    # Single-channel masks through the line's map; no palette to fall back on.
    decoded = decode_manifest_mask(_png(mask, "L"), classes, own, source="m line 1")
    np.testing.assert_array_equal(decoded.classes, [[0, 1, 255, 255, 255]])
    assert decoded.unknown == {"index 2": 1, "index 7": 1}
    # RGB masks through the union of the maps.
    rgb = np.array([[[255, 127, 14], [9, 9, 9], [9, 9, 9]]], dtype=np.uint8)
    decoded = decode_manifest_mask(_png(rgb, "RGB"), classes, own, source="m line 1")
    np.testing.assert_array_equal(decoded.classes, [[2, 255, 255]])
    assert decoded.unknown == {"#090909": 2}
    # No map anywhere: RGB masks cannot be read, and the message says where it looked.
    with pytest.raises(DataError, match="looked under 'a-ref-metadata' or 'a-metadata'"):
        decode_manifest_mask(_png(rgb, "RGB"), None, None, source="m line 1",
                             looked_at=("a-ref-metadata", "a-metadata"))


def test_colour_map_parsing():
    colours = ColorMap.from_metadata({"internal-color-map": {
        "0": {"class-name": "BACKGROUND", "hex-color": "#ffffff"},
        "2": {"class-name": "dog", "hex-color": "FF0000"}}}, source="m")
    assert colours.class_names == ("BACKGROUND", "class_1", "dog")
    assert colours.indices == (0, 2) and colours.colours[2] == (255, 0, 0)
    with pytest.raises(DataError, match="hex-color"):
        ColorMap.from_metadata({"internal-color-map": {"0": {"hex-color": "red"}}}, source="m")
    with pytest.raises(DataError, match="share the colour #ff0000"):
        ColorMap.from_metadata({"internal-color-map": {
            "0": {"class-name": "a", "hex-color": "#ff0000"},
            "1": {"class-name": "b", "hex-color": "#ff0000"}}}, source="m")
