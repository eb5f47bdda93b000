"""Pipeline step 3 (several GPUs or nodes): launch a distributed training job and wait for it."""
from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from kubeseg_platform.components.images import TRAINER_IMAGE


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def train_distributed(
    dataset: Input[Dataset],
    hyperparameters_json: str,
    output_root: str,
    run_id: str,
    pretrained_weights_uri: str,
    initial_model_uri: str,
    class_names: str,
    num_nodes: int,
    gpus_per_node: int,
    training_operator: str,
    training_runtime: str,
    trainer_image: str,
    namespace: str,
    storage_secret: str,
    shm_size: str,
    model: Output[Model],
    metrics: Output[Metrics],
):
    """Run ``kubeseg train`` under torchrun on ``num_nodes`` pods with ``gpus_per_node`` GPUs each.

    This step only launches and watches (it needs no GPU): it creates a Kubeflow Trainer v2
    TrainJob (``training_operator`` = "trainer-v2", runtime ``training_runtime``, normally
    ``torch-distributed``) or, on clusters still on Training Operator 1.9, a PyTorchJob
    ("pytorchjob"), and waits for it. The job's pods run the trainer image on the GPU node pool
    with the storage Secret, a memory-backed /dev/shm and no Istio sidecar. Checkpoints go below
    ``<output_root>/<run_id>/train/``, so a retried step adopts the running job, or recreates a
    failed one, which resumes from the last checkpoint.

    Args:
        dataset: The dataset description (channels or shards).
        hyperparameters_json: The checked hyperparameters (from the validation step).
        output_root: Object-store prefix for this pipeline's files.
        run_id: The pipeline run's id; the checkpoint location and job name derive from it.
        pretrained_weights_uri: the backbone's published state dict (optional).
        initial_model_uri: An earlier kubeseg model artifact to continue from (optional).
        class_names: Comma-separated class names stored in the model (optional).
        num_nodes: Training pods.
        gpus_per_node: GPUs (processes) per pod.
        training_operator: "trainer-v2" (TrainJob) or "pytorchjob" (Training Operator 1.9).
        training_runtime: ClusterTrainingRuntime of the TrainJob.
        trainer_image: Image of the training pods.
        namespace: Namespace of the job (where the pipeline's pods run).
        storage_secret: Secret with the object-store credentials.
        shm_size: Size of each pod's memory-backed /dev/shm.

    Returns:
        model: The trained model artifact (best epoch), metadata ``uri`` as for one GPU.
        metrics: Best validation mIoU and epoch, and the per-epoch metrics.
    """
    import logging

    from kubeseg import storage
    from kubeseg.config import Hyperparameters
    from kubeseg.data.channels import Channels, split_class_names
    from kubeseg.deploy import training_job as tj
    from kubeseg.engine.summary import (publish_training, summarize_training,
                                        training_output_uri)

    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    hp = Hyperparameters.from_json(hyperparameters_json)
    output_uri = training_output_uri(output_root, run_id)
    hp_uri = storage.join(output_uri, "hyperparameters.json")
    storage.write_text(hp_uri, hp.to_json())
    args = tj.train_arguments(
        hyperparameters_uri=hp_uri, output_uri=output_uri,
        channels=Channels.from_description_file(dataset.path).to_dict(),
        pretrained_uri=pretrained_weights_uri or None,
        initial_model_uri=initial_model_uri or None,
        class_names=split_class_names(class_names))
    spec = tj.TrainingJobSpec(
        name=tj.job_name("kubeseg-train", run_id), train_args=tuple(args), namespace=namespace,
        image=trainer_image, num_nodes=num_nodes, gpus_per_node=gpus_per_node,
        shm_size=shm_size, storage_secret=storage_secret or None)
    tj.run_training_job(tj.build_training_job(spec, training_operator, training_runtime))
    # the job ran in other pods: its summary is read back from the object store
    publish_training(summarize_training(output_uri), hp, model, metrics)
