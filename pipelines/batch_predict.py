"""Batch prediction as a Kubeflow pipeline: a model URI and an input prefix in, one output per
image out (SageMaker's Batch Transform, without an endpoint kept running).

Cluster settings are constants, as in the training pipeline: the step asks for
one GPU on the GPU node pool, gets the object-store credentials from the
storage Secret, and is retried; a retry resumes, because finished outputs are skipped.
"""
from typing import Optional

from kfp import dsl

from kubeseg_platform.components.batch_predict import batch_predict
from kubeseg_platform.pipelines.segmentation import (SETTINGS, on_gpu_pool, step_settings,
                                    with_storage_secret)

PIPELINE_NAME = "kubeseg-batch-predict"
BATCH_CPU_LIMIT = "8"
BATCH_MEMORY_LIMIT = "32Gi"
BATCH_RETRIES = 2


@dsl.pipeline(name=PIPELINE_NAME,
              description="kubeseg: score every image under a prefix with a trained model")
def batch_predict_pipeline(model_uri: str, input_uri: str, output_uri: str,
                           accept: str = "image/png", manifest: bool = False,
                           batch_size: int = 16) -> str:
    """Score every image under an input prefix with a kubeseg model.

    Args:
        model_uri: The model artifact (s3:// prefix written by kubeseg train).
        input_uri: s3:// prefix of the images (or, with manifest, a manifest file).
        output_uri: s3:// prefix for the outputs: one per image, same key, and
            _batch_summary.json.
        accept: image/png (masks), application/x-recordio-protobuf (probabilities) or
            application/json.
        manifest: Whether input_uri is a manifest file.
        batch_size: Same-size images scored together on the GPU.
    """
    task = batch_predict(model_uri=model_uri, input_uri=input_uri, output_uri=output_uri,
                         accept=accept, manifest=manifest, batch_size=batch_size)
    step_settings(task, "Batch predict", cpu=BATCH_CPU_LIMIT, memory=BATCH_MEMORY_LIMIT,
                  timeout_s=SETTINGS.train_timeout_s, shared_memory=True)
    with_storage_secret(on_gpu_pool(task))
    task.set_retry(BATCH_RETRIES)
    task.set_caching_options(False)
    return task.outputs["Output"]


def compile_pipeline(path: str, kfp_backend: Optional[str] = None) -> str:
    """Write the compiled pipeline (IR YAML) to ``path`` for the Kubeflow Pipelines backend
    release ``kfp_backend`` (default: the lowest supported); returns the path."""
    from kubeseg_platform.pipelines.kfp_backend import compile_for_backend

    return compile_for_backend(batch_predict_pipeline, path, kfp_backend)


__all__ = ["batch_predict_pipeline", "compile_pipeline", "PIPELINE_NAME"]
