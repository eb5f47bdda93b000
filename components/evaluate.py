"""Pipeline step 4: score the model and decide whether it may be deployed."""
from kfp import dsl
from kfp.dsl import HTML, ClassificationMetrics, Dataset, Input, Markdown, Metrics, Model, Output

from components.images import TRAINER_IMAGE


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def evaluate(
    model: Input[Model],
    dataset: Input[Dataset],
    min_miou: float,
    previous_metrics_uri: str,
    champion_uri: str,
    max_regression: float,
    output_root: str,
    run_id: str,
    metrics: Output[Metrics],
    confusion_matrix: Output[ClassificationMetrics],
    report: Output[HTML],
    summary: Output[Markdown],
) -> bool:
    """Evaluate the model on the validation split and apply the quality gate.

    Each validation image is scored whole (large ones with a sliding window); one confusion
    matrix over the split gives mIoU, pixel accuracy, mean class accuracy, frequency-weighted
    IoU and per-class IoU. The outputs (metrics.json, confusion matrix, report.md/html,
    overlays) go to ``<output_root>/<run_id>/evaluation/``. The quality gate passes when
    mIoU >= ``min_miou`` and the new mIoU is not lower than the champion's (the model in
    production: ``previous_metrics_uri``, else ``<champion_uri>/metrics.json``) by more than
    ``max_regression``. No champion yet (nothing at that URI) is normal before the first
    promotion: the gate then uses ``min_miou`` alone and logs a warning. A failed gate does not
    fail the run: it skips deployment.

    Args:
        model: The trained model artifact.
        dataset: The dataset description.
        min_miou: Lowest acceptable validation mIoU, 0..1.
        previous_metrics_uri: metrics.json of the model to beat (optional; default: the
            champion's).
        champion_uri: Prefix of the champion promoted by earlier runs (optional).
        max_regression: Allowed mIoU drop against the deployed model, 0..1.
        output_root: Object-store prefix for this pipeline's files.
        run_id: The pipeline run's id.

    Returns:
        Whether the quality gate passed (the model may be deployed).
        metrics: mIoU, pixel accuracy, mean class accuracy, fw IoU, per-class IoU;
            metadata ``gate_passed`` and ``gate_reason`` (the numbers compared).
        confusion_matrix: Pixel counts, rows = ground truth, columns = prediction.
        report: The evaluation report with pictures (HTML).
        summary: The evaluation report (Markdown).
    """
    import json
    import logging
    import math

    from kubeseg import storage
    from kubeseg.data.channels import Channels
    from kubeseg.engine.evaluate import evaluate as run_evaluation
    from kubeseg.engine.gate import read_champion_metrics
    from kubeseg.engine.promote import champion_metrics_uri
    from kubeseg.report import render_markdown

    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    channels = Channels.from_description_file(dataset.path)
    model_uri = model.metadata.get("uri") or model.path
    output_uri = storage.join(output_root, run_id, "evaluation")
    previous = read_champion_metrics(
        previous_metrics_uri or (champion_metrics_uri(champion_uri) if champion_uri else ""))
    result = run_evaluation(model_uri, channels, output_uri, min_miou=min_miou,
                            previous_metrics=previous, max_regression=max_regression)

    def finite(value):
        return isinstance(value, (int, float)) and math.isfinite(value)

    for key in ("mIOU", "pixel_accuracy", "mean_class_accuracy", "fw_iou"):
        if finite(result.get(key)):
            metrics.log_metric(key, float(result[key]))
    names = list(result["class_names"])
    for name, iou in zip(names, result["per_class_iou"]):
        if finite(iou):
            metrics.log_metric(f"iou/{name}", float(iou))
    matrix = json.loads(storage.read_text(storage.join(output_uri, "confusion_matrix.json")))
    confusion_matrix.log_confusion_matrix(names, [[int(v) for v in row]
                                                  for row in matrix["matrix"]])
    with open(report.path, "w") as f:
        f.write(storage.read_text(storage.join(output_uri, "report.html")))
    # The Markdown viewer cannot reach the report's pictures (relative links), so the summary
    # is the text part alone; the pictures are in the self-contained HTML report.
    with open(summary.path, "w") as f:
        f.write(render_markdown(result, gate=result["gate"]["reason"]))
    metrics.metadata["evaluation_uri"] = output_uri
    gate = result["gate"]
    metrics.metadata["gate_passed"] = bool(gate["passed"])
    metrics.metadata["gate_reason"] = str(gate["reason"])
    logging.getLogger("kubeseg.gate").info("quality gate %s", gate["reason"])
    return bool(gate["passed"])
