"""Batch prediction as a Kubeflow pipeline: a model URI and an input prefix in, one output per
image out (SageMaker's Batch Transform, without an endpoint kept running).

Cluster settings are constants, as in the training pipeline: the step asks for
``BATCH_GPU_LIMIT`` GPUs on the GPU node pool, gets the object-store credentials from the
storage Secret, and is retried; a retry resumes, because finished outputs are skipped.
"""
from kfp import dsl, kubernetes

from components.batch_predict import batch_predict
from pipelines.segmentation import (GPU_NODE_SELECTOR, GPU_TOLERATION, STORAGE_SECRET,
                                    STORAGE_SECRET_ENV, TRAIN_ACCELERATOR)

PIPELINE_NAME = "kubeseg-batch-predict"
BATCH_ACCELERATOR = TRAIN_ACCELERATOR
BATCH_GPU_LIMIT = 1
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
    task.set_display_name("Batch predict")
    task.set_accelerator_type(BATCH_ACCELERATOR).set_accelerator_limit(BATCH_GPU_LIMIT)
    task.set_cpu_limit(BATCH_CPU_LIMIT).set_memory_limit(BATCH_MEMORY_LIMIT)
    task.set_retry(BATCH_RETRIES)
    task.set_caching_options(False)
    kubernetes.add_node_selector(task, label_key=GPU_NODE_SELECTOR[0],
                                 label_value=GPU_NODE_SELECTOR[1])
    kubernetes.add_toleration(task, **GPU_TOLERATION)
    kubernetes.use_secret_as_env(task, secret_name=STORAGE_SECRET,
                                 secret_key_to_env=dict(STORAGE_SECRET_ENV))
    return task.outputs["Output"]


def compile_pipeline(path: str) -> str:
    """Write the compiled pipeline (IR YAML) to ``path``; returns the path."""
    from kfp import compiler

    compiler.Compiler().compile(batch_predict_pipeline, package_path=str(path))
    return str(path)


__all__ = ["batch_predict_pipeline", "compile_pipeline", "PIPELINE_NAME"]
