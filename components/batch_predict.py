"""Batch prediction: score every image under a prefix with a trained model."""
from kfp import dsl
from kfp.dsl import Metrics, Output

from kubeseg_platform.components.images import TRAINER_IMAGE


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def batch_predict(
    model_uri: str,
    input_uri: str,
    output_uri: str,
    accept: str,
    manifest: bool,
    batch_size: int,
    metrics: Output[Metrics],
) -> str:
    """Score every image under ``input_uri`` and write one output per image to ``output_uri``.

    Each image ``KEY.jpg|.jpeg|.png`` gets ``KEY.png`` (a single-channel mask of class ids),
    ``KEY.recordio`` (class probabilities, RecordIO-protobuf) or ``KEY.json``: exactly what the
    model's HTTP endpoint answers with that Accept type. Images are streamed, scored in batches
    (on the GPU when the pod has one), and each output is written atomically, so a retried step
    skips what is done and finishes the rest. An unreadable image is reported and skipped.
    The summary (counts, images/s, failures) is written to
    ``<output_uri>/_batch_summary.json``.

    Args:
        model_uri: The model artifact (s3:// prefix written by the training step).
        input_uri: Prefix or folder of images; with ``manifest``, a manifest file.
        output_uri: Prefix or folder receiving the outputs.
        accept: image/png, application/x-recordio-protobuf or application/json.
        manifest: Whether ``input_uri`` is a manifest (JSON list with a prefix, or JSON Lines
            with source-ref) instead of a prefix.
        batch_size: Same-size images scored together.

    Returns:
        The summary as JSON.
        metrics: Images scored, skipped (already done), failed, and images per second.
    """
    import json
    import logging

    from kubeseg.serving.batch import batch_predict as run_batch, publish_batch_summary

    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    summary = run_batch(model_uri, input_uri, output_uri, accept=accept, manifest=manifest,
                        batch_size=batch_size)
    publish_batch_summary(summary, metrics)
    return json.dumps(summary)
