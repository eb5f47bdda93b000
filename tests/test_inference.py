import pytest
import torch

from kubeseg.inference import long_side_size, predict_logits, predict_probabilities


class Pointwise(torch.nn.Module):
    """A per-pixel model: tiling cannot change its output, so tiles must stitch exactly."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, 1)
        self.calls = []

    def forward(self, x):
        self.calls.append(tuple(x.shape[-2:]))
        return {"out": self.conv(x)}


def test_sliding_window_matches_whole_image_for_a_pointwise_model():
    model = Pointwise().eval()
    images = torch.randn(2, 3, 50, 77)
    whole = predict_logits(model, images)
    model.calls.clear()
    tiled = predict_logits(model, images, tile_size=32)
    assert tiled.shape == (2, 4, 50, 77)
    assert torch.allclose(whole, tiled, atol=1e-6)
    assert max(max(c) for c in model.calls) <= 32 and len(model.calls) > 1


def test_flip_and_scales_return_input_size_and_average():
    model = Pointwise().eval()
    images = torch.randn(1, 3, 40, 48)
    plain = predict_logits(model, images)
    flipped = predict_logits(model, images, flip=True)
    assert torch.allclose(plain, flipped, atol=1e-6)  # a pointwise model is flip-equivariant
    multi = predict_logits(model, images, scales=(0.5, 1.0, 1.5))
    assert multi.shape == plain.shape
    probs = predict_probabilities(model, images)
    assert torch.allclose(probs.sum(1), torch.ones(1, 40, 48), atol=1e-5)


def test_bad_overlap_is_rejected():
    with pytest.raises(ValueError, match="tile_overlap"):
        predict_logits(Pointwise().eval(), torch.randn(1, 3, 8, 8), tile_overlap=1.0)


@pytest.mark.parametrize("shape, long_side, seen", [
    ((360, 480), 240, (180, 240)),     # landscape: the width becomes the long side
    ((480, 360), 240, (240, 180)),     # portrait
    ((100, 300), 520, (173, 520)),     # upscaled, rounded to nearest
])
def test_long_side_scores_at_base_size_and_answers_at_input_size(shape, long_side, seen):
    model = Pointwise().eval()
    images = torch.randn(1, 3, *shape)
    logits = predict_logits(model, images, long_side=long_side)
    assert model.calls == [seen]
    assert logits.shape == (1, 4, *shape)
    # the scales multiply the long side, not the image's own size
    model.calls.clear()
    predict_logits(model, images, long_side=long_side, scales=(0.5, 1.0))
    assert model.calls[0] == long_side_size(*shape, -(-long_side // 2))
    assert model.calls[1] == seen


def test_long_side_equal_to_the_image_changes_nothing():
    model = Pointwise().eval()
    images = torch.randn(1, 3, 36, 48)
    assert torch.equal(predict_logits(model, images, long_side=48), predict_logits(model, images))
    assert model.calls == [(36, 48), (36, 48)]


def test_validation_scores_whole_images_at_the_long_side():
    from kubeseg.engine.loop import validate

    model = Pointwise().eval()
    loader = [(torch.randn(1, 3, 30, 40), torch.zeros(1, 30, 40, dtype=torch.long))]
    metrics = validate(model, loader, 4, torch.device("cpu"), long_side=80)
    assert model.calls == [(60, 80)] and metrics["pixels"] == 30 * 40
    validate(model, loader, 4, torch.device("cpu"))
    assert model.calls[-1] == (30, 40)
