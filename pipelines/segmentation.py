"""The kubeseg Kubeflow pipeline: validate -> ingest -> train -> evaluate -> (gate) deploy.

Parameters: every hyperparameter of :class:`kubeseg.config.Hyperparameters` (generated from
the dataclass: same names, types and defaults; the list-valued ones are strings such as
``"10, 20"``), then those of :class:`kubeseg.config.PipelineParameters`, generated the same
way: the dataset (four channel URIs, or an augmented manifest), where the run's files go, the
quality gate, and how to deploy.

How the hyperparameters travel. A KFP pipeline needs a function with a literal signature,
and the components would need one too; re-typing thirty parameters there would declare them
twice. Instead the pipeline's signature is built from the dataclass (so the Kubeflow UI shows
one typed field per hyperparameter, required ones without a default), the pipeline joins the
values into ``name=value`` lines (an f-string of pipeline parameters, which KFP resolves at
run time), and the first step parses them with ``Hyperparameters.from_dict``: every problem is
reported at once, before any data is read. Later steps receive the checked JSON from that
step's output, never the raw values.

Why retries resume. The train step writes checkpoints below
``<output_root>/<run id>/train/``: ``output_root`` is a parameter and the run id is KFP's
``PIPELINE_JOB_ID_PLACEHOLDER``, identical for every attempt of the step within a run (and
when a failed run is retried from the UI). A retried attempt therefore finds
``checkpoints/last.pt`` and continues; a new run starts fresh. Artifacts in KFP's own store
(the model copy, metrics, reports) are per attempt and small.

Images: every step runs in the trainer image; the deploy step serves with the predictor image
(the GPU build when ``serving_gpus`` > 0). Their registry and tag come from
:mod:`kubeseg.images` when this module is imported (``kubeseg compile --registry R --tag T``).

Training: one GPU trains in the train step's own pod (on the GPU node pool, told to use CUDA,
so a pod whose GPU is unusable fails at once). With ``num_nodes`` > 1 or ``gpus_per_node`` > 1
a CPU-only step launches a Kubeflow Trainer v2 TrainJob (or, with ``training_operator`` =
"pytorchjob", a Training Operator 1.9 PyTorchJob) and waits for it; the validation step decides
which (its ``training`` output), and the evaluation and release steps follow either branch.

Release: a model that passes the quality gate is deployed (KServe) and then promoted: copied
with its metrics to ``champion_uri``, which the next run's gate compares against (no champion
yet is normal: the gate then uses ``min_miou`` alone) and the serving overlays serve.

Cluster settings (ignored by ``kfp.local``) are constants here, taken from
:mod:`kubeseg.deploy.placement` (GPU node pool, storage Secret, shared memory) and
:class:`kubeseg_platform.pipelines.settings.PipelineSettings` (``/dev/shm`` size and step
timeouts, set when compiling: ``kubeseg compile --shm-size 16Gi --step-timeout 7200``).
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Dict, List, Optional

from kfp import dsl, kubernetes

from kubeseg_platform.components.deploy import deploy
from kubeseg_platform.components.evaluate import evaluate
from kubeseg_platform.components.images import IMAGES, TRAINER_IMAGE
from kubeseg_platform.components.ingest_manifest import ingest_manifest
from kubeseg_platform.components.promote import promote
from kubeseg_platform.components.train import train
from kubeseg_platform.components.train_distributed import train_distributed
from kubeseg_platform.components.validate_dataset import validate_dataset
from kubeseg import images
from kubeseg.config import Hyperparameters, PipelineParameters
from kubeseg.deploy import placement
from kubeseg.deploy.training_job import DISTRIBUTED
from kubeseg_platform.pipelines.settings import PipelineSettings

PIPELINE_NAME = "kubeseg-segmentation"

# -- cluster settings --------------------------------------------------------------------------
SETTINGS = PipelineSettings.from_env()
TRAIN_ACCELERATOR = placement.GPU_RESOURCE
TRAIN_GPU_LIMIT = 1
TRAIN_CPU_LIMIT = "8"
TRAIN_MEMORY_LIMIT = "32Gi"
STEP_CPU_LIMIT = "4"
STEP_MEMORY_LIMIT = "16Gi"
STORAGE_SECRET = placement.STORAGE_SECRET
TRAIN_RETRIES = 3
TRAIN_RETRY_BACKOFF = "60s"
STEP_RETRIES = 2

_PIPELINE_TYPES = {"int": int, "float": float, "bool": bool, "choice": str, "str": str,
                   "int_list": str, "float_list": str}


def _pipeline_default(value: Any) -> Any:
    if isinstance(value, tuple):
        return ", ".join(str(v) for v in value)
    return value


def _declared_parameters(declaration: type) -> List[inspect.Parameter]:
    """One pipeline parameter per field of a declaration of kubeseg.config (Hyperparameters,
    PipelineParameters): same names, types and defaults."""
    params = []
    for f in dataclasses.fields(declaration):
        spec = f.metadata["spec"]
        default = inspect.Parameter.empty if spec.required else _pipeline_default(f.default)
        params.append(inspect.Parameter(f.name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                        default=default, annotation=_PIPELINE_TYPES[spec.kind]))
    # Required parameters first: a Python signature lists them before those with defaults.
    return sorted(params, key=lambda p: p.default is not inspect.Parameter.empty)


HYPERPARAMETER_NAMES = tuple(f.name for f in dataclasses.fields(Hyperparameters))


def pipeline_parameters() -> List[inspect.Parameter]:
    return _declared_parameters(Hyperparameters) + _declared_parameters(PipelineParameters)


def _docstring() -> str:
    lines = ["Semantic segmentation: validate the data, train, evaluate, and deploy the model "
             "when it passes the quality gate.", "", "Args:"]
    for name, spec in Hyperparameters.specs().items():
        lines.append(f"    {name}: {spec.help} Allowed: {spec.describe()}.")
    for name, spec in PipelineParameters.specs().items():
        allowed = "" if spec.kind == "str" else f" Allowed: {spec.describe()}."
        lines.append(f"    {name}: {spec.help}{allowed}")
    return "\n".join(lines) + "\n"


def with_storage_secret(task: dsl.PipelineTask) -> dsl.PipelineTask:
    return kubernetes.use_secret_as_env(
        task, secret_name=STORAGE_SECRET,
        secret_key_to_env={key: key for key in placement.STORAGE_SECRET_KEYS})


def step_settings(task: dsl.PipelineTask, display_name: str, *, cpu: str = STEP_CPU_LIMIT,
          memory: str = STEP_MEMORY_LIMIT, timeout_s: int = SETTINGS.step_timeout_s,
          shared_memory: bool = False) -> dsl.PipelineTask:
    """Settings every step gets: name, limits, a timeout, the image pull policy, and for steps
    that load data with worker processes a memory-backed /dev/shm."""
    task.set_display_name(display_name)
    task.set_cpu_limit(cpu).set_memory_limit(memory)
    kubernetes.set_timeout(task, timeout_s)
    kubernetes.set_image_pull_policy(task, images.pull_policy(TRAINER_IMAGE))
    if shared_memory:
        kubernetes.empty_dir_mount(task, volume_name=placement.SHM_VOLUME,
                                   mount_path=placement.SHM_MOUNT_PATH, medium="Memory",
                                   size_limit=SETTINGS.shm_size)
    return task


def on_gpu_pool(task: dsl.PipelineTask) -> dsl.PipelineTask:
    task.set_accelerator_type(TRAIN_ACCELERATOR).set_accelerator_limit(TRAIN_GPU_LIMIT)
    (selector_key, selector_value), = placement.DEFAULT_GPU_NODE_SELECTOR.items()
    kubernetes.add_node_selector(task, label_key=selector_key, label_value=selector_value)
    for toleration in placement.DEFAULT_GPU_TOLERATIONS:
        kubernetes.add_toleration(task, **toleration)
    return task


def _release(trained: dsl.PipelineTask, ingest: dsl.PipelineTask, p: Dict[str, Any],
             run_id: str) -> None:
    """Evaluate the trained model; when it passes the gate, deploy and promote it."""
    scored = evaluate(
        model=trained.outputs["model"], dataset=ingest.outputs["dataset"],
        min_miou=p["min_miou"], previous_metrics_uri=p["previous_metrics_uri"],
        champion_uri=p["champion_uri"], max_regression=p["max_regression"],
        output_root=p["output_root"], run_id=run_id)
    with_storage_secret(step_settings(scored, "Evaluate", shared_memory=True))
    scored.set_retry(STEP_RETRIES)

    with dsl.If(scored.outputs["Output"] == True, name="quality-gate-passed"):  # noqa: E712
        release = deploy(
            model=trained.outputs["model"], name=p["endpoint_name"], namespace=p["namespace"],
            image_registry=IMAGES.registry, image_tag=IMAGES.tag,
            service_account=p["predictor_service_account"], storage_secret=STORAGE_SECRET,
            gpus=p["serving_gpus"], canary_traffic_percent=p["canary_traffic_percent"],
            dry_run=p["deploy_dry_run"], timeout_s=900.0)
        step_settings(release, "Deploy").set_caching_options(False)
        champion = promote(model=trained.outputs["model"], metrics=scored.outputs["metrics"],
                           champion_uri=p["champion_uri"]).after(release)
        with_storage_secret(step_settings(champion, "Promote to champion"))
        champion.set_caching_options(False)


def _segmentation(*values: Any) -> None:
    p: Dict[str, Any] = dict(zip([q.name for q in pipeline_parameters()], values))
    run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER
    assignments = "\n".join(f"{name}={p[name]}" for name in HYPERPARAMETER_NAMES)

    check = validate_dataset(
        hyperparameters=assignments, train=p["train"], validation=p["validation"],
        train_annotation=p["train_annotation"],
        validation_annotation=p["validation_annotation"], label_map=p["label_map"],
        manifest_uri=p["manifest_uri"],
        validation_manifest_uri=p["validation_manifest_uri"], class_names=p["class_names"],
        num_nodes=p["num_nodes"], gpus_per_node=p["gpus_per_node"],
        output_root=p["output_root"], run_id=run_id, strict_labels=p["strict_labels"])
    with_storage_secret(step_settings(check, "Validate dataset")).set_retry(STEP_RETRIES)

    ingest = ingest_manifest(
        source=check.outputs["dataset"], manifest_uri=p["manifest_uri"],
        validation_manifest_uri=p["validation_manifest_uri"],
        attribute_names=p["manifest_attribute_names"], output_root=p["output_root"],
        run_id=run_id)
    with_storage_secret(step_settings(ingest, "Ingest manifest")).set_retry(STEP_RETRIES)

    common = dict(dataset=ingest.outputs["dataset"],
                  hyperparameters_json=check.outputs["hyperparameters_json"],
                  output_root=p["output_root"], run_id=run_id,
                  pretrained_weights_uri=p["pretrained_weights_uri"],
                  initial_model_uri=p["initial_model_uri"], class_names=p["class_names"])
    with dsl.If(check.outputs["training"] == DISTRIBUTED, name="distributed-training"):
        job = train_distributed(
            **common, num_nodes=p["num_nodes"], gpus_per_node=p["gpus_per_node"],
            training_operator=p["training_operator"],
            training_runtime=p["training_runtime"], trainer_image=TRAINER_IMAGE,
            namespace=p["namespace"], storage_secret=STORAGE_SECRET,
            shm_size=SETTINGS.shm_size)
        with_storage_secret(step_settings(job, "Train (distributed job)", cpu="1", memory="2Gi",
                                   timeout_s=SETTINGS.train_timeout_s))
        job.set_retry(TRAIN_RETRIES, backoff_duration=TRAIN_RETRY_BACKOFF, backoff_factor=2.0)
        job.set_caching_options(False)
        _release(job, ingest, p, run_id)
    with dsl.Else(name="one-gpu-training"):
        trained = train(**common, device=p["train_device"])
        step_settings(trained, "Train", cpu=TRAIN_CPU_LIMIT, memory=TRAIN_MEMORY_LIMIT,
              timeout_s=SETTINGS.train_timeout_s, shared_memory=True)
        with_storage_secret(on_gpu_pool(trained))
        trained.set_retry(TRAIN_RETRIES, backoff_duration=TRAIN_RETRY_BACKOFF,
                          backoff_factor=2.0)
        trained.set_caching_options(False)
        _release(trained, ingest, p, run_id)


_segmentation.__signature__ = inspect.Signature(pipeline_parameters())
_segmentation.__doc__ = _docstring()
_segmentation.__name__ = "segmentation_pipeline"

segmentation_pipeline = dsl.pipeline(
    name=PIPELINE_NAME,
    description="kubeseg: validate -> ingest -> train (GPU) -> evaluate -> quality gate -> "
                "deploy (KServe)")(_segmentation)


def compile_pipeline(path: str, kfp_backend: Optional[str] = None) -> str:
    """Write the compiled pipeline (IR YAML) to ``path`` for the Kubeflow Pipelines backend
    release ``kfp_backend`` (default: the lowest supported); returns the path."""
    from kubeseg_platform.pipelines.kfp_backend import compile_for_backend

    return compile_for_backend(segmentation_pipeline, path, kfp_backend)


__all__ = ["segmentation_pipeline", "compile_pipeline", "PIPELINE_NAME",
           "HYPERPARAMETER_NAMES", "pipeline_parameters", "SETTINGS", "step_settings",
           "on_gpu_pool",
           "with_storage_secret"]
