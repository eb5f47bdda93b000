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
from kubeseg.data.datasets import ShardDataset, build_dataset
from kubeseg.data.ingest import ingest_channels, ingest_manifest
from kubeseg.data.synthetic import make_shapes_dataset
from kubeseg.data.transforms import EvalTransform, TrainTransform
from kubeseg.errors import DataError


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
                          rank=rank, world_size=world_size, buffer_size=8, return_key=True)
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

    # The 13th annotation is unreadable: ingestion fails part-way with the real fetch error.
    lines = storage.read_text(data["manifest"]).splitlines()
    label = json.loads(lines[12])["labels-ref"]
    saved = storage.read_bytes(label)
    storage.delete(label)
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


def test_bad_manifest_lines_fail_with_line_numbers(bucket, gt_manifest_factory):
    data = gt_manifest_factory(f"{bucket}/raw", 3, "rgb")
    lines = storage.read_text(data["manifest"]).splitlines()
    bad = lines + ['{"source-ref": "s3://x', lines[0]]
    manifest = f"{bucket}/bad.manifest"
    storage.write_text(manifest, "\n".join(bad) + "\n")
    with pytest.raises(DataError) as err:
        ingest_manifest(manifest, f"{bucket}/out")
    assert "line 4: invalid JSON" in str(err.value) and "line 5: duplicate of line 1" in str(
        err.value)
    index = ingest_manifest(manifest, f"{bucket}/out", skip_bad_lines=True)
    assert index["splits"]["train"]["num_samples"] == 3


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
