import numpy as np
import pytest
from PIL import Image

from kubeseg.report import pictures


def _colour_count(image: Image.Image, colour) -> int:
    arr = np.asarray(image.convert("RGB"))
    return int(np.all(arr == np.asarray(colour, dtype=np.uint8), axis=-1).sum())


def test_palette_is_distinct_stable_and_uint8():
    p = pictures.palette(40)
    assert p.shape == (40, 3) and p.dtype == np.uint8
    assert len({tuple(c) for c in p}) == 40
    assert np.array_equal(pictures.palette(5), p[:5])
    assert pictures.IGNORE_COLOUR not in {tuple(int(v) for v in c) for c in p}


def test_colorize_maps_classes_and_paints_ignore_black():
    p = pictures.palette(3)
    mask = np.array([[0, 1], [2, 255]], dtype=np.uint8)
    out = pictures.colorize(mask, p)
    assert out.shape == (2, 2, 3) and out.dtype == np.uint8
    assert (out[0, 0] == p[0]).all() and (out[1, 0] == p[2]).all()
    assert tuple(out[1, 1]) == pictures.IGNORE_COLOUR
    assert tuple(pictures.colorize(np.array([[7]]), p)[0, 0]) == pictures.IGNORE_COLOUR


def test_overlay_blends_with_alpha():
    p = pictures.palette(2)
    image = Image.new("RGB", (4, 3), (100, 100, 100))
    mask = np.ones((3, 4), dtype=np.uint8)
    out = np.asarray(pictures.overlay(image, mask, p, alpha=0.5)).astype(int)
    expected = (np.array([100, 100, 100]) + p[1].astype(int)) / 2
    assert np.abs(out[0, 0] - expected).max() <= 1
    assert np.array_equal(np.asarray(pictures.overlay(image, mask, p, alpha=0.0)),
                          np.asarray(image))
    with pytest.raises(ValueError, match="size"):
        pictures.overlay(image, np.ones((4, 4), dtype=np.uint8), p)


def test_side_by_side_has_three_panels_and_a_legend_of_the_classes_shown():
    names = ["background", "disc", "square", "never-shown"]
    image = Image.new("RGB", (32, 24), (90, 90, 90))
    gt = np.zeros((24, 32), dtype=np.uint8)
    gt[4:12, 4:12] = 1
    gt[0, :] = 255
    pred = gt.copy()
    pred[0, :] = 0
    pred[16:20, 16:20] = 2
    out = pictures.side_by_side(image, gt, pred, names, title="sample")
    assert out.width >= 3 * 256  # small images are enlarged so the text stays legible
    colours = pictures.palette(4)
    # legend swatches are solid class colours; the panels hold only blended colours
    for c in (0, 1, 2):
        assert _colour_count(out, colours[c]) > 50, f"no legend swatch for class {c}"
    assert _colour_count(out, colours[3]) == 0  # a class in neither mask gets no entry


def test_confusion_matrix_image_is_row_normalised():
    names = ["a", "b", "c"]
    m = np.array([[90, 10, 0], [0, 0, 0], [5, 5, 990]])
    img = pictures.confusion_matrix_image(m, names, cell=40)
    assert img.width > 3 * 40 and img.height > 3 * 40
    # the darkest blue (a full row on the diagonal) and an empty-row grey both appear
    arr = np.asarray(img).astype(int)
    assert (arr.sum(-1) < 200).any()
    assert _colour_count(img, (235, 235, 235)) > 40 * 30
