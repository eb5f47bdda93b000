"""Models: every algorithm x backbone runs forward/backward at the input size; weights load."""
from __future__ import annotations

import io

import pytest
import torch
import torchvision

from kubeseg import storage
from kubeseg.errors import ConfigError, DataError
from kubeseg.models import SegmentationModel, build_model
from kubeseg.models.backbone import make_resnet

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
