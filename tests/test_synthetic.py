import json

import numpy as np
from PIL import Image

from kubeseg.data.synthetic import make_shapes_dataset


def test_shapes_dataset_layout_and_labels(tmp_path):
    channels = make_shapes_dataset(tmp_path, n_train=5, n_val=3, size=48, num_classes=4, seed=1)
    for split, count in (("train", 5), ("validation", 3)):
        images = sorted(p.stem for p in (tmp_path / split).glob("*.jpg"))
        masks = sorted(p.stem for p in (tmp_path / f"{split}_annotation").glob("*.png"))
        assert images == masks and len(images) == count
    mask = Image.open(next((tmp_path / "train_annotation").glob("*.png")))
    assert mask.mode == "L" and mask.size == (48, 48)
    values = set()
    for p in (tmp_path / "train_annotation").glob("*.png"):
        values |= set(np.unique(np.asarray(Image.open(p))).tolist())
    assert values <= {0, 1, 2, 3} and 0 in values and len(values) > 1
    label_map = json.loads((tmp_path / "label_map" / "train_label_map.json").read_text())
    assert label_map == {"map": {"0": 0, "1": 1, "2": 2, "3": 3}}
    assert channels["train"] == str(tmp_path / "train")


def test_same_seed_same_data(tmp_path):
    make_shapes_dataset(tmp_path / "a", seed=3)
    make_shapes_dataset(tmp_path / "b", seed=3)
    a = (tmp_path / "a" / "train_annotation" / "train_0001.png").read_bytes()
    b = (tmp_path / "b" / "train_annotation" / "train_0001.png").read_bytes()
    assert a == b
