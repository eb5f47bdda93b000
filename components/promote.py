"""Pipeline step 6: make the deployed model the champion that the next run gates against."""
from kfp import dsl
from kfp.dsl import Input, Metrics, Model

from kubeseg_platform.components.images import TRAINER_IMAGE


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def promote(model: Input[Model], metrics: Input[Metrics], champion_uri: str) -> str:
    """Copy the model artifact and its evaluation metrics to the champion prefix.

    Runs only after the model passed the quality gate and was deployed. The champion lives at
    ``<champion_uri>/model/`` and ``<champion_uri>/metrics.json``: the GitOps retraining
    parameters gate new models against that metrics.json, and the serving overlays serve that
    model. The model is copied first and the metrics last, so a reader that finds the metrics
    finds the complete model.

    Args:
        model: The model that passed the gate.
        metrics: Its evaluation (the evaluate step's metrics; ``metrics_uri`` names where its
            metrics.json is).
        champion_uri: The stable prefix of the champion (e.g. s3://kubeseg/models/champion);
            empty: no promotion.

    Returns:
        The champion's model URI ("" when champion_uri is empty).
    """
    import logging

    from kubeseg import storage
    from kubeseg.engine.promote import promote as promote_model

    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not champion_uri:
        logging.getLogger("kubeseg.promote").info("champion_uri is empty: nothing promoted")
        return ""
    result = promote_model(storage.model_uri(model),
                           metrics.metadata["metrics_uri"], champion_uri)
    return result.model_uri
