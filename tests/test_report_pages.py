import base64
import io

from PIL import Image

from kubeseg.report import pages
from kubeseg.report.pictures import png_bytes


def _summary():
    return {
        "mIOU": 0.5, "pixel_accuracy": 0.75, "mean_class_accuracy": 0.6, "fw_iou": 0.55,
        "model": "s3://models/run1/model", "split": "validation", "images": 3,
        "per_class": [
            {"name": "road", "iou": 0.9, "accuracy": 0.95, "gt_share": 0.6,
             "predicted_share": 0.62},
            {"name": "<car>", "iou": 0.1, "accuracy": 0.25, "gt_share": 0.4,
             "predicted_share": 0.38},
            {"name": "absent", "iou": None, "accuracy": None, "gt_share": 0.0,
             "predicted_share": 0.0},
        ],
    }


def test_markdown_report_has_overall_and_per_class_tables_and_images():
    md = pages.render_markdown(_summary(), overlays=["overlays/a.png"],
                                confusion_png="confusion_matrix.png", gate="passed: ok")
    assert "| mIoU | 0.5000 |" in md
    assert "| 1 | <car> | 0.1000 | 0.2500 | 40.00% | 38.00% |" in md
    assert "| 2 | absent | n/a |" in md
    assert "![overlays/a.png](overlays/a.png)" in md and "(confusion_matrix.png)" in md
    assert "passed: ok" in md and "s3://models/run1/model" in md


def test_html_report_embeds_images_and_escapes_names():
    png = png_bytes(Image.new("RGB", (2, 2), (255, 0, 0)))
    page = pages.render_html(_summary(), overlays=["overlays/a.png"],
                              confusion_png="confusion_matrix.png",
                              images={"overlays/a.png": png, "confusion_matrix.png": png})
    assert "&lt;car&gt;" in page and "<car>" not in page
    assert page.count("data:image/png;base64,") == 2
    data = page.split("data:image/png;base64,")[1].split("'")[0]
    assert Image.open(io.BytesIO(base64.b64decode(data))).size == (2, 2)
    linked = pages.render_html(_summary(), overlays=["overlays/a.png"])
    assert "src='overlays/a.png'" in linked
