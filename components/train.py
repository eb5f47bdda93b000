"""Pipeline step 3 (one GPU): train the model in this step's own pod."""
from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from kubeseg_platform.components.images import TRAINER_IMAGE


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def train(
    dataset: Input[Dataset],
    hyperparameters_json: str,
    output_root: str,
    run_id: str,
    pretrained_weights_uri: str,
    initial_model_uri: str,
    class_names: str,
    device: str,
    model: Output[Model],
    metrics: Output[Metrics],
):
    """Train a semantic segmentation model (FCN, PSPNet or DeepLabV3 on a dilated ResNet).

    Training writes ``metrics.jsonl`` (one line per epoch), ``checkpoints/last.pt`` (every
    epoch) and the model artifact of the best epoch (``model/``) below
    ``<output_root>/<run_id>/train/``. That location depends only on the pipeline run, so when
    this step is retried (pod preempted, node lost, out of memory) the new attempt finds the
    checkpoint and continues with the next epoch instead of starting over.

    Args:
        dataset: The dataset description (channels or shards).
        hyperparameters_json: The checked hyperparameters (from the validation step).
        output_root: Object-store prefix for this pipeline's files.
        run_id: The pipeline run's id; the checkpoint location is derived from it.
        pretrained_weights_uri: the backbone's published state dict (with
            use_pretrained_model=True; empty: the public ImageNet weights, needs internet).
        initial_model_uri: An earlier kubeseg model artifact to continue from (incremental
            training; algorithm, backbone, crop_size and num_classes must match).
        class_names: Comma-separated class names stored in the model (optional).
        device: "cuda" (fails at once when the pod's GPU is unusable), "cpu" or "auto".

    Returns:
        model: The trained model artifact (best epoch); metadata ``uri`` is its object-store
            location, which the deploy step serves.
        metrics: Best validation mIoU and epoch, and per-epoch train:loss,
            validation:mIOU, validation:pixel_accuracy and throughput.
    """
    import logging

    from kubeseg.config import Hyperparameters
    from kubeseg.data.channels import Channels, split_class_names
    from kubeseg.engine.summary import publish_training, training_output_uri
    from kubeseg.engine.train import train as run_training

    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    hp = Hyperparameters.from_json(hyperparameters_json)
    result = run_training(hp, Channels.from_description_file(dataset.path),
                          training_output_uri(output_root, run_id),
                          pretrained_uri=pretrained_weights_uri or None,
                          initial_model_uri=initial_model_uri or None,
                          class_names=split_class_names(class_names), device=device or None)
    publish_training(result.summary(), hp, model, metrics)
