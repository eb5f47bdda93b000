import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from kubeseg import storage
from kubeseg.cli import main as cli_main
from kubeseg.data import shards as S
from kubeseg.data.channels import Channels
from kubeseg.data.datasets import RankSlice, ShardDataset, build_dataset
from kubeseg.data.ingest import ManifestLeniency, ingest_channels, ingest_manifest
from kubeseg.data.synthetic import make_shapes_dataset
from kubeseg.data.transforms import EvalTransform, TrainTransform
from kubeseg.errors import DataError

from ground_truth import GT_CLASSES, gt_line, random_mask, write_manifest


def _shard_rows(shards_uri, split="train"):
    import pyarrow.parquet as pq

    index = S.read_index(shards_uri)
    rows = {}
    for shard in index["splits"][split]["shards"]:
        table = pq.read_table(io.BytesIO(storage.read_bytes(storage.join(shards_uri,
                                                                         shard["path"]))))
        for row in table.to_pylist():
            rows[row["key"]] = row
    return index, rows


def _stream_keys(shards_uri, split, world_size, workers, epoch=0, transform=None):
    keys = []
    for rank in range(world_size):
        ds = ShardDataset(shards_uri, split, transform=transform or EvalTransform(), seed=3,
                          ranks=RankSlice(rank, world_size), buffer_size=8, return_key=True)
        ds.set_epoch(epoch)
        loader = DataLoader(ds, batch_size=4, num_workers=workers)
        rank_keys = [k for _, _, batch_keys in loader for k in batch_keys]
        assert len(rank_keys) == len(ds)
        keys.append(rank_keys)
    return keys


@pytest.mark.parametrize("style", ["rgb", "palette"])
def test_ground_truth_manifest_ingests_and_streams_each_sample_once(bucket, style,
                                                                     gt_manifest_factory):
    data = gt_manifest_factory(f"{bucket}/raw", 24, style)
    out = f"{bucket}/shards"
    index = ingest_manifest(data["manifest"], out, shard_size_mb=0.004, workers=4,
                            row_group_rows=4)
    train = index["splits"]["train"]
    assert train["num_samples"] == 24 and len(train["shards"]) >= 3
    assert index["class_names"] == ["BACKGROUND", "car", "person", "tree"]
    assert index["num_classes"] == 4
    assert storage.exists(f"{out}/index.json")
    # Masks in the shards are class ids, whatever the annotation style was.
    _, rows = _shard_rows(out)
    for key, expected in data["masks"].items():
        mask = Image.open(io.BytesIO(rows[key]["mask"]))
        assert mask.mode == "L"
        np.testing.assert_array_equal(np.asarray(mask), expected)
        assert (rows[key]["height"], rows[key]["width"]) == expected.shape
    # 2 ranks x 2 DataLoader workers: every sample exactly once.
    per_rank = _stream_keys(out, "train", world_size=2, workers=2)
    everything = per_rank[0] + per_rank[1]
    assert sorted(everything) == sorted(data["masks"])
    assert not set(per_rank[0]) & set(per_rank[1])


def test_streamed_masks_match_and_order_is_seeded(bucket, gt_manifest_factory):
    data = gt_manifest_factory(f"{bucket}/raw", 12, "rgb", seed=1)
    out = f"{bucket}/shards"
    ingest_manifest(data["manifest"], out, shard_size_mb=0.003, row_group_rows=2)
    ds = ShardDataset(out, "train", seed=5, buffer_size=4, return_key=True)
    for image, mask, key in ds:
        assert image.shape == (3, 32, 32)
        np.testing.assert_array_equal(mask.numpy(), data["masks"][key])
    first = [k for _, _, k in ds]
    assert [k for _, _, k in ds] == first  # same seed and epoch, same order
    ds.set_epoch(1)
    assert sorted(k for _, _, k in ds) == sorted(first)
    assert [k for _, _, k in ds] != first  # a new epoch reshuffles


def test_interrupted_ingestion_resumes_to_identical_shards(bucket, gt_manifest_factory):
    data = gt_manifest_factory(f"{bucket}/raw", 20, "rgb", seed=2)
    clean = f"{bucket}/clean"
    ingest_manifest(data["manifest"], clean, shard_size_mb=0.004, row_group_rows=4)

    # The 13th annotation is corrupt: ingestion fails part-way with the real decoding error.
    lines = storage.read_text(data["manifest"]).splitlines()
    label = json.loads(lines[12])["labels-ref"]
    saved = storage.read_bytes(label)
    storage.write_bytes(label, saved[:40])
    out = f"{bucket}/resumed"
    with pytest.raises(DataError, match="line 13"):
        ingest_manifest(data["manifest"], out, shard_size_mb=0.004, row_group_rows=4,
                        workers=2)
    assert not storage.exists(f"{out}/index.json")
    partial = [n for n in storage.list_files(out) if n.endswith(".parquet")]
    assert partial, "complete shards written before the failure are kept"

    storage.write_bytes(label, saved)
    index = ingest_manifest(data["manifest"], out, shard_size_mb=0.004, row_group_rows=4)
    clean_index = S.read_index(clean)
    assert index["splits"]["train"]["shards"] == clean_index["splits"]["train"]["shards"]
    for shard in clean_index["splits"]["train"]["shards"]:
        assert storage.read_bytes(f"{out}/{shard['path']}") == \
            storage.read_bytes(f"{clean}/{shard['path']}")
    assert sorted(storage.list_files(out)) == sorted(storage.list_files(clean))


def _report(out, split="train"):
    return json.loads(storage.read_text(f"{out}/{split}-ingest-report.json"))


def _parquet_files(out):
    try:
        return [n for n in storage.list_files(out) if n.endswith(".parquet")]
    except Exception:  # nothing written below the prefix
        return []


def test_every_bad_line_is_listed_before_anything_is_fetched(bucket):
    rng = np.random.default_rng(5)
    lines = [gt_line(f"{bucket}/raw", f"img{i}", random_mask(rng), rng) for i in range(7)]
    storage.delete(lines[1]["source-ref"])  # line 2: image missing
    storage.delete(lines[4]["labels-ref"])  # line 5: annotation missing
    storage.delete(lines[6]["source-ref"])  # line 7: both missing
    storage.delete(lines[6]["labels-ref"])
    conflicting = json.loads(json.dumps(lines[3]))  # line 4: car's colour named "truck"
    conflicting["labels-ref-metadata"]["internal-color-map"]["1"]["class-name"] = "truck"
    text = [lines[0], lines[1], '{"source-ref": "s3://x', conflicting, lines[4],
            {"labels-ref": lines[5]["labels-ref"]}, lines[6], lines[2], lines[0]]
    manifest = write_manifest(f"{bucket}/bad.manifest", text)
    out = f"{bucket}/out"
    with pytest.raises(DataError) as err:
        ingest_manifest(manifest, out)
    message = str(err.value)
    assert "6 bad line(s)" in message
    for expected in (f"line 2: source-ref {lines[1]['source-ref']} does not exist",
                     "line 3: invalid JSON",
                     "line 4: colour-map conflict: #2ca02c is class 1 'truck' on line 4 but "
                     "'car' on line 1",
                     f"line 5: labels-ref {lines[4]['labels-ref']} does not exist",
                     "line 6: missing attribute 'source-ref'",
                     f"line 7: source-ref {lines[6]['source-ref']} does not exist",
                     f"line 7: labels-ref {lines[6]['labels-ref']} does not exist"):
        assert expected in message
    assert message.index("line 2:") < message.index("line 7:")
    assert _parquet_files(out) == [], "nothing is fetched or written before the checks pass"
    report = _report(out)
    assert report["ok"] is False and report["num_bad_lines"] == 6
    assert sorted({p["line"] for p in report["bad_lines"]}) == [2, 3, 4, 5, 6, 7]

    index = ingest_manifest(manifest, out, leniency=ManifestLeniency(skip_bad_lines=True))
    train = index["splits"]["train"]
    assert train["num_samples"] == 3 and train["skipped_lines"] == 6  # lines 1, 8, 9 (repeat)
    assert train["repeated_lines"] == 1
    report = _report(out)
    assert report["ok"] is True and report["bad_lines_skipped"] is True
    assert [p["kind"] for p in report["bad_lines"]] == [
        "missing_object", "invalid_json", "colour_map_conflict", "missing_object",
        "missing_attribute", "missing_object", "missing_object"]
    assert report["repeated_lines"] == [{"line": 9, "first_line": 1,
                                         "image": lines[0]["source-ref"]}]


@pytest.mark.parametrize("style", ["rgb", "palette"])
def test_colour_maps_that_differ_across_lines_lose_no_label(bucket, style):
    """Per-image maps listing only the colours present, a second job with another class order,
    and both metadata key forms: every labelled pixel keeps its class name."""
    rng = np.random.default_rng(11)
    job_b = [0, 3, 1, 2]  # job B's indices: BACKGROUND, tree, car, person
    lines, expected = [], {}
    for i in range(8):
        classes = [(1,), (2, 3), (1, 3), (3,)][i % 4]
        mask = random_mask(rng, classes=classes)
        key = f"img{i}"
        lines.append(gt_line(f"{bucket}/raw", key, mask, rng, style=style,
                             order=job_b if i >= 4 else None, present_only=i < 4,
                             meta_key="labels-metadata" if i % 2 else "labels-ref-metadata"))
        expected[key] = mask
    out = f"{bucket}/out"
    index = ingest_manifest(write_manifest(f"{bucket}/m.manifest", lines), out,
                            shard_size_mb=0.004, row_group_rows=2)
    names = index["class_names"]
    assert sorted(names) == sorted(n for n, _ in GT_CLASSES)
    _, rows = _shard_rows(out)
    gt_names = np.array([n for n, _ in GT_CLASSES])
    for key, mask in expected.items():
        got = np.asarray(Image.open(io.BytesIO(rows[key]["mask"])))
        assert (got != 255).all(), "no labelled pixel became ignore"
        np.testing.assert_array_equal(np.array(names)[got], gt_names[mask])
    report = _report(out)
    assert report["unknown_colours"] == [] and report["unknown_colour_pixels"] == 0
    assert index["splits"]["train"]["unknown_colour_pixels"] == 0


@pytest.mark.parametrize("style", ["rgb", "palette"])
def test_mask_colours_in_no_map_fail_or_become_ignore_only_when_asked(bucket, style, capsys):
    rng = np.random.default_rng(3)
    masks = [random_mask(rng, classes=(1,)), random_mask(rng, classes=(1, 2)),
             random_mask(rng, classes=(1,))]
    # Every map lists BACKGROUND and car only: line 2's person pixels are in no map.
    order = [0, 1, 2] if style == "palette" else None
    lines = [gt_line(f"{bucket}/raw", f"img{i}", m, rng, style=style, order=order,
                     present_only=True) for i, m in enumerate(masks)]
    for line in lines:
        line["labels-ref-metadata"]["internal-color-map"] = {
            k: v for k, v in line["labels-ref-metadata"]["internal-color-map"].items()
            if k in ("0", "1")}
    person_pixels = int((masks[1] == 2).sum())
    manifest = write_manifest(f"{bucket}/m.manifest", lines)
    out = f"{bucket}/out"
    with pytest.raises(DataError) as err:
        ingest_manifest(manifest, out)
    value = "#1f77b4" if style == "rgb" else "index 2 (#1f77b4 in the PNG palette)"
    assert f"line 2 ({lines[1]['labels-ref']}): {value} ({person_pixels} px)" in str(err.value)
    assert "--unknown-colours-as-ignore" in str(err.value)
    assert not storage.exists(f"{out}/index.json")
    report = _report(out)
    assert report["ok"] is False
    assert [(n["line"], n["values"], n["action"]) for n in report["unknown_colours"]] == [
        (2, {value: person_pixels}, "fail")]

    rc = cli_main(["ingest", "--manifest", manifest, "--output", out,
                   "--unknown-colours-as-ignore", "--shard-size-mb", "0.002"])
    assert rc == 0
    assert f"{person_pixels} pixel(s) of unknown colours made ignore" in capsys.readouterr().out
    index = S.read_index(out)
    assert index["splits"]["train"]["unknown_colour_pixels"] == person_pixels
    assert index["class_names"] == ["BACKGROUND", "car"]
    report = _report(out)
    assert report["ok"] is True and report["unknown_colour_pixels"] == person_pixels
    assert [(n["line"], n["key"], n["action"]) for n in report["unknown_colours"]] == [
        (2, "img1", "ignore")]
    _, rows = _shard_rows(out)
    got = np.asarray(Image.open(io.BytesIO(rows["img1"]["mask"])))
    np.testing.assert_array_equal(got == 255, masks[1] == 2)


def test_interrupted_ingestion_reports_unknown_colours_of_kept_shards_again(bucket):
    rng = np.random.default_rng(4)
    masks = [random_mask(rng, classes=(1, 2)) for _ in range(8)]
    lines = [gt_line(f"{bucket}/raw", f"img{i}", m, rng) for i, m in enumerate(masks)]
    for line in lines:  # person is in no map
        del line["labels-ref-metadata"]["internal-color-map"]["2"]
    manifest = write_manifest(f"{bucket}/m.manifest", lines)
    label = lines[6]["labels-ref"]
    saved = storage.read_bytes(label)
    storage.write_bytes(label, saved[:40])  # line 7 is corrupt: the run fails part-way
    out = f"{bucket}/out"
    with pytest.raises(DataError, match="line 7"):
        ingest_manifest(manifest, out, leniency=ManifestLeniency(unknown_colours_as_ignore=True),
                        shard_size_mb=0.002, row_group_rows=1, workers=1)
    assert _parquet_files(out)
    storage.write_bytes(label, saved)
    ingest_manifest(manifest, out, leniency=ManifestLeniency(unknown_colours_as_ignore=True),
                    shard_size_mb=0.002, row_group_rows=1, workers=1)
    report = _report(out)
    assert [n["line"] for n in report["unknown_colours"]] == list(range(1, 9))
    assert report["unknown_colour_pixels"] == sum(int((m == 2).sum()) for m in masks)


def test_bom_crlf_and_repeated_lines_through_the_cli(bucket, capsys):
    rng = np.random.default_rng(8)
    masks = [random_mask(rng) for _ in range(3)]
    lines = [gt_line(f"{bucket}/raw", f"img{i}", m, rng, style="palette",
                     meta_key="labels-metadata") for i, m in enumerate(masks)]
    manifest = write_manifest(f"{bucket}/m.manifest", lines + [lines[0]], bom=True,
                              newline="\r\n")
    rc = cli_main(["ingest", "--manifest", manifest, "--output", f"{bucket}/out"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "train: 4 samples" in out and "1 repeated line(s) kept" in out
    index, rows = _shard_rows(f"{bucket}/out")
    assert index["class_names"] == [n for n, _ in GT_CLASSES]
    assert sorted(rows) == ["img0", "img0_line4", "img1", "img2"]
    assert rows["img0_line4"]["mask"] == rows["img0"]["mask"]
    report = _report(f"{bucket}/out")
    assert report["num_repeated_lines"] == 1 and "line 4 repeats line 1" in report["warnings"][0]


def test_class_names_not_found_say_where_they_were_looked_for(bucket, caplog):
    rng = np.random.default_rng(9)
    mask = random_mask(rng)
    palette_line = gt_line(f"{bucket}/raw", "p", mask, rng, style="palette", meta_key="job-x")
    rgb_line = gt_line(f"{bucket}/raw", "r", mask, rng, style="rgb", meta_key="job-x")
    caplog.set_level("WARNING", logger="kubeseg.data.ingest")
    index = ingest_manifest(write_manifest(f"{bucket}/p.manifest", [palette_line]),
                            f"{bucket}/p")
    assert index["class_names"] is None
    where = "looked under 'labels-ref-metadata' or 'labels-metadata'"
    assert any(where in r.getMessage() for r in caplog.records)
    assert where in _report(f"{bucket}/p")["warnings"][0]
    _, rows = _shard_rows(f"{bucket}/p")
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(rows["p"]["mask"]))), mask)
    with pytest.raises(DataError, match=f"annotation is RGB .*{where}"):
        ingest_manifest(write_manifest(f"{bucket}/r.manifest", [rgb_line]), f"{bucket}/r")


def test_validation_split_keeps_the_class_indices_of_the_training_split(bucket):
    rng = np.random.default_rng(12)
    train_mask, val_mask = random_mask(rng), random_mask(rng, classes=(2, 3))
    train = [gt_line(f"{bucket}/raw", "t", train_mask, rng)]
    # The validation job lists its classes in another order, and only those present.
    val = [gt_line(f"{bucket}/raw", "v", val_mask, rng, style="palette", order=[0, 3, 2, 1],
                   present_only=True)]
    out = f"{bucket}/out"
    ingest_manifest(write_manifest(f"{bucket}/t.manifest", train), out)
    index = ingest_manifest(write_manifest(f"{bucket}/v.manifest", val), out, split="validation")
    assert index["class_names"] == [n for n, _ in GT_CLASSES]
    _, rows = _shard_rows(out, "validation")
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(rows["v"]["mask"]))),
                                  val_mask)


def test_channels_ingest_to_shards_and_train_from_them(tmp_path):
    root = make_shapes_dataset(tmp_path / "data", n_train=6, n_val=3, size=40, num_classes=3)
    channels = Channels.from_root(str(tmp_path / "data"))
    out = str(tmp_path / "shards")
    index = ingest_channels(channels, out, class_names=["background", "disc", "square"],
                            shard_size_mb=0.005)
    assert {s: e["num_samples"] for s, e in index["splits"].items()} == {"train": 6,
                                                                      "validation": 3}
    shards = Channels(shards=out)
    train = build_dataset(shards, "train", TrainTransform(48, 32), seed=1)
    assert isinstance(train, ShardDataset) and len(train) == 6
    images, masks = next(iter(DataLoader(train, batch_size=6)))
    assert images.shape == (6, 3, 32, 32) and masks.dtype == torch.int64
    assert set(masks.unique().tolist()) <= {0, 1, 2, 255}
    val = build_dataset(shards, "validation", EvalTransform())
    expected = {p.stem: np.asarray(Image.open(p)) for p in
                (tmp_path / "data" / "validation_annotation").glob("*.png")}
    got = {k: m.numpy() for _, m, k in ShardDataset(out, "validation", shuffle=False,
                                                    return_key=True)}
    assert got.keys() == expected.keys()
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key])
    assert len(val) == 3
    with pytest.raises(DataError, match="no 'test' split|has no"):
        ShardDataset(out, "test")
    assert root["train"].endswith("train")


def test_ingest_cli_on_s3(bucket, gt_manifest_factory, capsys):
    data = gt_manifest_factory(f"{bucket}/raw", 4, "palette")
    rc = cli_main(["ingest", "--manifest", data["manifest"], "--split", "validation",
                   "--output", f"{bucket}/cli", "--attribute-names", "source-ref,labels-ref"])
    assert rc == 0
    assert "validation: 4 samples in 1 shard(s)" in capsys.readouterr().out
    rc = cli_main(["ingest", "--manifest", data["manifest"], "--output", f"{bucket}/cli",
                   "--attribute-names", "source-ref,missing-ref"])
    assert rc == 1
    assert "missing attribute 'missing-ref'" in capsys.readouterr().err
