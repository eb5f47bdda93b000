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


def _monitoring(baseline=True):
    here = [0] * 20
    here[8], here[19] = 1, 3  # a quarter of the pixels below 0.5
    before = [0] * 20
    before[19] = 9
    before[2] = 1
    return {"confidence_edges": [i / 20 for i in range(21)], "confidence_pixels": here,
            "low_confidence_below": 0.5, "low_confidence_fraction": 0.25,
            "baseline": {"confidence_pixels": before} if baseline else None,
            "baseline_low_confidence_fraction": 0.1 if baseline else None,
            "class_shift": 0.1234 if baseline else None}


def test_reports_show_the_training_baseline_beside_this_split():
    summary = _summary()
    for row, share in zip(summary["per_class"], (0.7, 0.3, 0.0)):
        row["train_share"] = share
    summary["monitoring"] = _monitoring()
    md = pages.render_markdown(summary)
    assert "| 1 | <car> | 0.1000 | 0.2500 | 40.00% | 38.00% | 30.00% |" in md
    assert "25.00% here, 10.00% on the validation split at training time" in md
    assert "Jensen-Shannon distance" in md and "0.123" in md
    assert "| 0.40-0.45 | 0.00% | 25.00% |" in md and "| 0.95-1.00 | 90.00% | 75.00% |" in md
    page = pages.render_html(summary)
    assert "share of training pixels" in page and "<td>30.00%</td>" in page
    assert "<td style='text-align:left'>0.10-0.15</td><td>10.00%</td>" in page


def test_reports_say_when_the_artifact_has_no_baseline():
    summary = _summary()
    summary["monitoring"] = _monitoring(baseline=False)
    md = pages.render_markdown(summary)
    assert "records no training baseline" in md
    assert "| 0.95-1.00 | n/a | 75.00% |" in md
    assert "| 1 | <car> | 0.1000 | 0.2500 | 40.00% | 38.00% | n/a |" in md
    assert "records no training baseline" in pages.render_html(summary)
