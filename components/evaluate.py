"""Pipeline step 4: score the model and decide whether it may be deployed."""
from kfp import dsl
from kfp.dsl import HTML, ClassificationMetrics, Dataset, Input, Markdown, Metrics, Model, Output

from kubeseg_platform.components.images import TRAINER_IMAGE


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
    """Evaluate the model on the validation split, then apply the quality gate.

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
    import logging

    from kubeseg import storage
    from kubeseg.data.channels import Channels
    from kubeseg.engine.evaluate import evaluate as run_evaluation, publish_evaluation
    from kubeseg.engine.gate import apply_gate, check_gate_options, metrics_to_beat

    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    check_gate_options(min_miou, max_regression)
    previous = metrics_to_beat(previous_metrics_uri, champion_uri)
    result = run_evaluation(storage.model_uri(model),
                            Channels.from_description_file(dataset.path),
                            storage.join(output_root, run_id, "evaluation"))
    gate = apply_gate(result, min_miou=min_miou, previous_metrics=previous,
                      max_regression=max_regression)
    publish_evaluation(result, gate, metrics, confusion_matrix, report, summary)
    return gate.passed
