import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from kubeseg import storage
from kubeseg.data.channels import Channels
from kubeseg.data.datasets import FolderDataset, RankSlice, ShardDataset, build_dataset
from kubeseg.data.ingest import ingest_channels
from kubeseg.data.synthetic import make_shapes_dataset
from kubeseg.data.transforms import EvalTransform, TrainTransform
from kubeseg.errors import DataError


@pytest.fixture
def shapes(tmp_path):
    make_shapes_dataset(tmp_path / "data", n_train=6, n_val=2, size=32, num_classes=3, seed=2)
    return tmp_path / "data"


def test_folder_dataset_on_s3_applies_the_label_map(bucket, shapes):
    # Pixel value 2 is mapped to class 1, value 1 to class 0; value 0 is unmapped (ignore).
    (shapes / "label_map" / "train_label_map.json").write_text(
        json.dumps({"map": {"0": 1, "1": 2}}))
    storage.upload_prefix(str(shapes), f"{bucket}/ds")
    channels = Channels.from_root(f"{bucket}/ds")
    ds = build_dataset(channels, "train", EvalTransform())
    assert isinstance(ds, FolderDataset) and len(ds) == 6
    assert ds.keys == [f"train_{i:04d}" for i in range(6)]
    for i, key in enumerate(ds.keys):
        image, mask = ds[i]
        raw = np.asarray(Image.open(shapes / "train_annotation" / f"{key}.png"))
        expected = np.select([raw == 1, raw == 2], [0, 1], 255)
        np.testing.assert_array_equal(mask.numpy(), expected)
        assert image.shape == (3, 32, 32)


def test_folder_dataset_augmentation_is_reproducible_across_workers(shapes):
    channels = Channels.from_root(str(shapes))

    def epoch(workers, epoch_number):
        ds = build_dataset(channels, "train", TrainTransform(48, 24), seed=4)
        ds.set_epoch(epoch_number)
        return torch.cat([m for _, m in DataLoader(ds, batch_size=3, num_workers=workers)])

    assert torch.equal(epoch(0, 0), epoch(2, 0))
    assert not torch.equal(epoch(0, 0), epoch(0, 1))


def test_persistent_workers_follow_set_epoch(shapes, bucket):
    # Workers started once and kept across epochs still see each epoch's seed and order,
    # for the folder dataset and the shard stream alike.
    storage.upload_prefix(str(shapes), f"{bucket}/ds")
    ingest_channels(Channels.from_root(f"{bucket}/ds"), f"{bucket}/shards",
                    shard_size_mb=0.002, row_group_rows=2)
    channels = [Channels.from_root(str(shapes)), Channels(shards=f"{bucket}/shards")]
    for source in channels:
        def make():
            return build_dataset(source, "train", TrainTransform(48, 24), seed=4)

        def one_epoch(ds, loader, number):
            ds.set_epoch(number)
            return torch.cat([m for _, m in loader])

        fresh = []
        for number in range(3):
            ds = make()
            fresh.append(one_epoch(ds, DataLoader(ds, batch_size=3, num_workers=2), number))
        ds = make()
        loader = DataLoader(ds, batch_size=3, num_workers=2, persistent_workers=True)
        kept = [one_epoch(ds, loader, number) for number in range(3)]
        workers = loader._iterator._workers
        assert all(torch.equal(a, b) for a, b in zip(fresh, kept)), source
        assert not torch.equal(kept[0], kept[1])
        assert [w.pid for w in loader._iterator._workers] == [w.pid for w in workers]


def test_shard_order_is_deterministic_and_independent_of_parent_use(tmp_path, shapes, bucket):
    storage.upload_prefix(str(shapes), f"{bucket}/ds")
    out = f"{bucket}/shards"
    ingest_channels(Channels.from_root(f"{bucket}/ds"), out, shard_size_mb=0.002,
                    row_group_rows=2)

    def keys(workers, world_size=1, rank=0, epoch=0):
        ds = ShardDataset(out, "train", seed=9, ranks=RankSlice(rank, world_size),
                          buffer_size=3, return_key=True)
        ds.set_epoch(epoch)
        return [k for _, _, ks in DataLoader(ds, batch_size=2, num_workers=workers) for k in ks]

    single = keys(0)  # reads S3 through pyarrow in this process, before the workers fork
    assert sorted(single) == [f"train_{i:04d}" for i in range(6)]
    assert keys(0) == single
    assert sorted(keys(2)) == sorted(single)
    assert keys(2) == keys(2)
    ranks = [keys(2, 2, r) for r in range(2)]
    assert sorted(ranks[0] + ranks[1]) == sorted(single)
    with pytest.raises(DataError, match="rank=2"):
        ShardDataset(out, "train", ranks=RankSlice(rank=2, world_size=2))


def test_shard_dataset_without_index_names_the_fix(tmp_path):
    with pytest.raises(DataError, match="rerun 'kubeseg ingest'"):
        ShardDataset(str(tmp_path), "train")
