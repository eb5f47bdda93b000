"""Pipeline step 5: serve the model as a KServe InferenceService (only after the gate passed)."""
from kfp import dsl
from kfp.dsl import Input, Markdown, Model, Output

from kubeseg_platform.components.images import TRAINER_IMAGE


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def deploy(
    model: Input[Model],
    name: str,
    namespace: str,
    image_registry: str,
    image_tag: str,
    service_account: str,
    storage_secret: str,
    gpus: int,
    canary_traffic_percent: int,
    dry_run: bool,
    timeout_s: float,
    inference_service: Output[Markdown],
) -> str:
    """Create or update the KServe InferenceService serving the model, and wait until Ready.

    The predictor runs ``kubeseg serve`` from the predictor image of ``image_registry`` and
    ``image_tag``: ``predictor`` (CPU PyTorch), or ``predictor-gpu`` (CUDA PyTorch) when ``gpus``
    > 0. KServe's storage initializer
    downloads the model artifact (its object-store URI) with the credentials of
    ``service_account``. ``gpus`` > 0 requests GPUs and schedules on the GPU node pool (in
    KServe's Serverless mode Knative must allow it: the step logs how). With
    ``canary_traffic_percent`` < 100 the new revision gets that share of the traffic and the
    previous one keeps the rest (Serverless mode only: an InferenceService in RawDeployment
    mode refuses it). A rollout that does not become Ready fails this step while the previous
    revision keeps serving. ``dry_run`` only renders the object (no cluster needed).

    Args:
        model: The model artifact that passed the quality gate.
        name: InferenceService name (a DNS label).
        namespace: Namespace of the InferenceService.
        image_registry: Registry of kubeseg's images (e.g. ghcr.io/kubeseg).
        image_tag: Tag of kubeseg's images.
        service_account: Service account with the storage credentials for KServe.
        storage_secret: Secret given to the server as environment (optional).
        gpus: GPUs per replica (0 = CPU serving).
        canary_traffic_percent: Share of traffic for the new revision (100 = all at once, which
            also promotes a canary left by an earlier deployment).
        dry_run: Render the InferenceService without applying it.
        timeout_s: Seconds to wait for Ready.

    Returns:
        The endpoint URL ("" in a dry run).
        inference_service: The rendered InferenceService (YAML in Markdown).
    """
    import logging

    import yaml

    from kubeseg import storage
    from kubeseg.deploy.inference_service import (ServingSpec, apply_inference_service,
                                                  build_inference_service, serving_notes)
    from kubeseg.images import ImageSet

    spec = ServingSpec(
        name, storage.model_uri(model), namespace=namespace,
        image=ImageSet(image_registry, image_tag).predictor_for(gpus),
        service_account=service_account or None, storage_secret=storage_secret or None,
        gpus=gpus, canary_traffic_percent=canary_traffic_percent)
    obj = build_inference_service(spec)
    for note in serving_notes(spec):
        logging.getLogger("kubeseg.deploy").warning("%s", note)
    text = yaml.safe_dump(obj, sort_keys=False)
    with open(inference_service.path, "w") as f:
        f.write(f"# InferenceService {namespace}/{name}{' (dry run)' if dry_run else ''}\n\n"
                f"```yaml\n{text}```\n")
    inference_service.metadata.update({"name": name, "namespace": namespace,
                                       "dry_run": dry_run})
    if dry_run:
        return ""
    url = apply_inference_service(obj, timeout_s=timeout_s)
    inference_service.metadata["url"] = url
    return url
