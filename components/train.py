"""Pipeline step 3: train the model (one process, or a PyTorchJob for several GPUs/nodes)."""
from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.images import TRAINER_IMAGE


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def train(
    dataset: Input[Dataset],
    hyperparameters_json: str,
    output_root: str,
    run_id: str,
    pretrained_weights_uri: str,
    initial_model_uri: str,
    class_names: str,
    num_nodes: int,
    gpus_per_node: int,
    trainer_image: str,
    namespace: str,
    storage_secret: str,
    model: Output[Model],
    metrics: Output[Metrics],
):
    """Train a semantic segmentation model (FCN, PSPNet or DeepLabV3 on a dilated ResNet).

    Training writes ``metrics.jsonl`` (one line per epoch), ``checkpoints/last.pt`` (every
    epoch) and the model artifact of the best epoch (``model/``) below
    ``<output_root>/<run_id>/train/``. That location depends only on the pipeline run, so when
    this step is retried (pod preempted, node lost, out of memory) the new attempt finds the
    checkpoint and continues with the next epoch instead of starting over.

    With ``num_nodes`` = 1 and ``gpus_per_node`` <= 1 training runs in this step's own pod.
    Otherwise the step creates a Kubeflow Training Operator PyTorchJob running torchrun on
    ``num_nodes`` pods with ``gpus_per_node`` GPUs each (DistributedDataParallel) and waits for
    it; a retried step adopts the running job, or recreates a failed one, which then resumes
    from the same checkpoint.

    Args:
        dataset: The dataset description (channels or shards).
        hyperparameters_json: The checked hyperparameters (from the validation step).
        output_root: Object-store prefix for this pipeline's files.
        run_id: The pipeline run's id; the checkpoint location is derived from it.
        pretrained_weights_uri: torchvision ResNet state dict for the backbone (with
            use_pretrained_model=True; empty: torchvision's ImageNet weights, needs internet).
        initial_model_uri: An earlier kubeseg model artifact to continue from (incremental
            training; algorithm, backbone, crop_size and num_classes must match).
        class_names: Comma-separated class names stored in the model (optional).
        num_nodes: Pods for distributed training (1 = no PyTorchJob).
        gpus_per_node: GPUs per pod in distributed training.
        trainer_image: Image of the PyTorchJob pods.
        namespace: Namespace of the PyTorchJob.
        storage_secret: Secret with the object-store credentials for the PyTorchJob pods.

    Returns:
        model: The trained model artifact (best epoch); metadata ``uri`` is its object-store
            location, which the deploy step serves.
        metrics: Best validation mIoU and epoch, and per-epoch train:loss,
            validation:mIOU, validation:pixel_accuracy and throughput.
    """
    import json
    import logging
    import math

    from kubeseg import storage
    from kubeseg.config import Hyperparameters
    from kubeseg.data.channels import Channels

    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    hp = Hyperparameters.from_json(hyperparameters_json)
    with open(dataset.path) as f:
        description = json.load(f)
    channels = Channels(**{k: v for k, v in description.items()
                           if k in Channels.__dataclass_fields__ and v})
    names = [n.strip() for n in class_names.split(",") if n.strip()] or None
    output_uri = storage.join(output_root, run_id, "train")
    artifact_uri = storage.join(output_uri, "model")
    if num_nodes > 1 or gpus_per_node > 1:
        from kubeseg.deploy import training_job as tj

        hp_uri = storage.join(output_uri, "hyperparameters.json")
        storage.write_text(hp_uri, hp.to_json())
        args = tj.train_arguments(hyperparameters_uri=hp_uri, output_uri=output_uri,
                                  channels=channels.to_dict(),
                                  pretrained_uri=pretrained_weights_uri or None,
                                  initial_model_uri=initial_model_uri or None,
                                  class_names=names)
        job = tj.build_pytorch_job(tj.job_name("kubeseg-train", run_id), args,
                                   namespace=namespace, image=trainer_image,
                                   num_nodes=num_nodes, gpus_per_node=gpus_per_node,
                                   storage_secret=storage_secret or None)
        tj.run_pytorch_job(job)
    else:
        from kubeseg.engine.train import train as run_training

        result = run_training(hp, channels, output_uri,
                              pretrained_uri=pretrained_weights_uri or None,
                              initial_model_uri=initial_model_uri or None, class_names=names)
        artifact_uri = result.artifact_uri

    history = [json.loads(line) for line in
               storage.read_text(storage.join(output_uri, "metrics.jsonl")).splitlines()
               if line.strip()]
    best = None
    for row in history:
        epoch = int(row["epoch"])
        for key in ("train:loss", "validation:mIOU", "validation:pixel_accuracy", "throughput"):
            value = row.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                metrics.log_metric(f"epoch_{epoch:03d}/{key}", float(value))
        miou = row.get("validation:mIOU")
        if isinstance(miou, (int, float)) and math.isfinite(miou) and (
                best is None or miou > best[1]):
            best = (epoch, float(miou))
    if best is not None:
        metrics.log_metric("best/validation:mIOU", best[1])
        metrics.log_metric("best/epoch", best[0])
    metrics.log_metric("epochs", len(history))

    storage.download_prefix(artifact_uri, model.path)
    model.metadata.update({"uri": artifact_uri, "algorithm": hp.algorithm,
                           "backbone": hp.backbone, "num_classes": hp.num_classes,
                           "framework": "pytorch", "format": "kubeseg"})
    if best is not None:
        model.metadata["validation_mIOU"] = best[1]
