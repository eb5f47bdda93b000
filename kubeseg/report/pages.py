"""Pages for an evaluation: the report as Markdown and as one self-contained HTML page (the
kind of page the Kubeflow UI shows for an artifact).

A page is rendered from the content of metrics.json (overall metrics, ``per_class`` rows,
model, split, settings); pictures are linked by their relative names or, in HTML, embedded.
"""
from __future__ import annotations

import base64
import html
import math
from typing import Mapping, Optional, Sequence

import numpy as np

from kubeseg.report.pictures import palette

_OVERALL = (("mIOU", "mIoU"), ("pixel_accuracy", "pixel accuracy"),
            ("mean_class_accuracy", "mean class accuracy"), ("fw_iou", "frequency-weighted IoU"))


def _fmt(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _pct(value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{100 * value:.2f}%"


def _settings_lines(summary: Mapping) -> list:
    out = []
    for key, label in (("model", "model"), ("split", "split"), ("images", "images"),
                       ("pixels", "scored pixels")):
        if summary.get(key) is not None:
            out.append((label, str(summary[key])))
    for key, value in (summary.get("settings") or {}).items():
        out.append((key, str(value)))
    return out


def _confidence_rows(monitoring: Mapping) -> list:
    """``(bin label, share on the validation split at training time or None, share here)``."""
    edges = monitoring["confidence_edges"]
    here = np.asarray(monitoring["confidence_pixels"], dtype=np.float64)
    baseline = (monitoring.get("baseline") or {}).get("confidence_pixels")
    before = None if baseline is None else np.asarray(baseline, dtype=np.float64)
    rows = []
    for i in range(len(here)):
        rows.append((f"{edges[i]:.2f}-{edges[i + 1]:.2f}",
                     None if before is None else before[i] / max(before.sum(), 1),
                     here[i] / max(here.sum(), 1)))
    return rows


def _drift_sentences(monitoring: Mapping) -> list:
    below = monitoring["low_confidence_below"]
    if monitoring.get("baseline") is None:
        return [f"Pixels with a confidence below {below}: "
                f"{_pct(monitoring.get('low_confidence_fraction'))}. The model artifact "
                "records no training baseline (it was written before kubeseg kept one): drift "
                "monitoring has nothing to compare this model's outputs with."]
    return [f"Pixels with a confidence below {below}: "
            f"{_pct(monitoring.get('low_confidence_fraction'))} here, "
            f"{_pct(monitoring.get('baseline_low_confidence_fraction'))} on the validation split "
            "at training time.",
            f"Class shift of these predictions against the training labels (Jensen-Shannon "
            f"distance, what drift monitoring computes over its window): "
            f"{_fmt(monitoring.get('class_shift'), 3)}."]


def _confidence_markdown(monitoring: Optional[Mapping]) -> list:
    if not monitoring:
        return []
    lines = ["## Confidence (largest class probability per pixel)", ""]
    lines += [f"{s}" for s in _drift_sentences(monitoring)] + [""]
    lines += ["| confidence | validation split, at training | this split |", "|---|---:|---:|"]
    for label, before, here in _confidence_rows(monitoring):
        lines.append(f"| {label} | {_pct(before)} | {_pct(here)} |")
    return lines + [""]


def render_markdown(summary: Mapping, *, overlays: Sequence[str] = (),
                    confusion_png: Optional[str] = None, gate: Optional[str] = None) -> str:
    """The report as Markdown; ``overlays`` and ``confusion_png`` are relative image paths.

    ``summary`` is the content of metrics.json: the overall metrics, ``per_class`` (a list of
    {name, iou, accuracy, gt_share, predicted_share}) and optionally model, split, images,
    settings.
    """
    lines = ["# Segmentation evaluation", ""]
    for label, value in _settings_lines(summary):
        lines.append(f"- **{label}**: `{value}`")
    if gate:
        lines.append(f"- **quality gate**: {gate}")
    lines += ["", "## Overall", "", "| metric | value |", "|---|---|"]
    for key, label in _OVERALL:
        lines.append(f"| {label} | {_fmt(summary.get(key))} |")
    lines += ["", "## Per class", "",
              "| id | class | IoU | accuracy | share of true pixels | share of predicted pixels "
              "| share of training pixels |",
              "|---:|---|---:|---:|---:|---:|---:|"]
    for i, row in enumerate(summary.get("per_class") or []):
        lines.append(f"| {i} | {row['name']} | {_fmt(row.get('iou'))} | "
                     f"{_fmt(row.get('accuracy'))} | {_pct(row.get('gt_share'))} | "
                     f"{_pct(row.get('predicted_share'))} | {_pct(row.get('train_share'))} |")
    lines += ["", "IoU is n/a for a class absent from both ground truth and prediction; such "
              "classes are left out of the mIoU. The training shares are the training split's "
              "labels, as the model artifact records them.", ""]
    lines += _confidence_markdown(summary.get("monitoring"))
    if confusion_png:
        lines += ["## Confusion matrix", "", f"![confusion matrix]({confusion_png})", ""]
    if overlays:
        lines += ["## Samples (image | ground truth | prediction)", ""]
        lines += [f"![{name}]({name})" for name in overlays]
        lines.append("")
    return "\n".join(lines)


_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222}
table{border-collapse:collapse;margin:8px 0 16px}
td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}
td:nth-child(2),th:nth-child(2){text-align:left}
th{background:#f0f0f0} .sw{display:inline-block;width:12px;height:12px;margin-right:6px;
border:1px solid #555;vertical-align:middle} img{max-width:100%;border:1px solid #ddd;margin:6px 0}
.bar{background:#3b73b9;height:10px;display:inline-block;vertical-align:middle;margin-left:6px}
"""


def _img_src(name: str, images: Optional[Mapping[str, bytes]]) -> str:
    if images and name in images:
        return "data:image/png;base64," + base64.b64encode(images[name]).decode("ascii")
    return html.escape(name)


def _confidence_html(monitoring: Optional[Mapping]) -> list:
    if not monitoring:
        return []
    e = html.escape
    parts = ["<h2>Confidence (largest class probability per pixel)</h2>"]
    parts += [f"<p>{e(sentence)}</p>" for sentence in _drift_sentences(monitoring)]
    parts.append("<table><tr><th>confidence</th><th>validation split, at training</th>"
                 "<th>this split</th></tr>")
    for label, before, here in _confidence_rows(monitoring):
        bar = f"<span class='bar' style='width:{int(200 * here)}px'></span>"
        parts.append(f"<tr><td style='text-align:left'>{e(label)}</td><td>{_pct(before)}</td>"
                     f"<td>{_pct(here)}{bar}</td></tr>")
    return parts + ["</table>"]


def render_html(summary: Mapping, *, overlays: Sequence[str] = (),
                confusion_png: Optional[str] = None, gate: Optional[str] = None,
                images: Optional[Mapping[str, bytes]] = None,
                colours: Optional[np.ndarray] = None) -> str:
    """The report as one HTML page. PNGs given in ``images`` (name -> bytes) are embedded as
    data URIs, so the page is self-contained (as the Kubeflow UI's HTML viewer needs)."""
    e = html.escape
    per_class = list(summary.get("per_class") or [])
    colours = palette(max(1, len(per_class))) if colours is None else colours
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'>",
             "<title>Segmentation evaluation</title>", f"<style>{_CSS}</style></head><body>",
             "<h1>Segmentation evaluation</h1><ul>"]
    for label, value in _settings_lines(summary):
        parts.append(f"<li><b>{e(label)}</b>: <code>{e(value)}</code></li>")
    if gate:
        parts.append(f"<li><b>quality gate</b>: {e(gate)}</li>")
    parts.append("</ul><h2>Overall</h2><table><tr><th>metric</th><th>value</th></tr>")
    for key, label in _OVERALL:
        parts.append(f"<tr><td style='text-align:left'>{e(label)}</td>"
                     f"<td>{_fmt(summary.get(key))}</td></tr>")
    parts.append("</table><h2>Per class</h2><table><tr><th>id</th><th>class</th><th>IoU</th>"
                 "<th>accuracy</th><th>share of true pixels</th>"
                 "<th>share of predicted pixels</th><th>share of training pixels</th></tr>")
    for i, row in enumerate(per_class):
        r, g, b = (int(v) for v in colours[i])
        iou = row.get("iou")
        bar = (f"<span class='bar' style='width:{int(80 * iou)}px'></span>"
               if isinstance(iou, float) and math.isfinite(iou) else "")
        parts.append(f"<tr><td>{i}</td><td><span class='sw' style='background:rgb({r},{g},{b})'>"
                     f"</span>{e(str(row['name']))}</td><td>{_fmt(iou)}{bar}</td>"
                     f"<td>{_fmt(row.get('accuracy'))}</td><td>{_pct(row.get('gt_share'))}</td>"
                     f"<td>{_pct(row.get('predicted_share'))}</td>"
                     f"<td>{_pct(row.get('train_share'))}</td></tr>")
    parts.append("</table><p>IoU is n/a for a class absent from both ground truth and "
                 "prediction; such classes are left out of the mIoU. The training shares are "
                 "the training split's labels, as the model artifact records them.</p>")
    parts += _confidence_html(summary.get("monitoring"))
    if confusion_png:
        parts.append(f"<h2>Confusion matrix</h2><img alt='confusion matrix' "
                     f"src='{_img_src(confusion_png, images)}'>")
    if overlays:
        parts.append("<h2>Samples (image | ground truth | prediction)</h2>")
        for name in overlays:
            parts.append(f"<div><img alt='{e(name)}' src='{_img_src(name, images)}'></div>")
    parts.append("</body></html>")
    return "\n".join(parts)


__all__ = ["render_markdown", "render_html"]
