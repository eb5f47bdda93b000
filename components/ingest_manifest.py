"""Pipeline step 2: turn an augmented manifest into Parquet shards (when one is given)."""
from kfp import dsl
from kfp.dsl import Dataset, Input, Output

from kubeseg_platform.components.images import TRAINER_IMAGE


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def ingest_manifest(
    source: Input[Dataset],
    manifest_uri: str,
    validation_manifest_uri: str,
    attribute_names: str,
    output_root: str,
    run_id: str,
    dataset: Output[Dataset],
):
    """Ingest an augmented manifest ("pipe mode") into sharded Parquet files.

    Each manifest line names an image (``source-ref``) and its annotation PNG (the label
    attribute ending in ``-ref``); Ground Truth colour maps are applied and class names kept.
    The referenced objects are written into Parquet shards below
    ``<output_root>/<run_id>/shards/`` (``index.json`` last), which training streams
    sequentially, each distributed rank reading its own shards. Bad lines fail the step with
    their line numbers. Without ``manifest_uri`` the four-channel dataset passes through
    unchanged and nothing is copied.

    Args:
        source: The dataset description from the validation step.
        manifest_uri: Training manifest (JSON Lines); empty: use the channels as they are.
        validation_manifest_uri: Validation manifest (optional).
        attribute_names: Comma-separated attribute names, image first (default: source-ref
            and the only other -ref attribute).
        output_root: Object-store prefix for this pipeline's files.
        run_id: The pipeline run's id.

    Returns:
        dataset: The dataset description (JSON) for training and evaluation.
    """
    import shutil

    from kubeseg import storage
    from kubeseg.data.channels import write_description_file
    from kubeseg.data.ingest import ingest_manifest as ingest

    if not manifest_uri:
        shutil.copyfile(source.path, dataset.path)
        dataset.metadata.update(source.metadata)
        dataset.metadata["ingested"] = False
        return
    shards_uri = storage.join(output_root, run_id, "shards")
    names = [n.strip() for n in attribute_names.split(",") if n.strip()] or None
    index = ingest(manifest_uri, shards_uri, split="train", attribute_names=names)
    if validation_manifest_uri:
        index = ingest(validation_manifest_uri, shards_uri, split="validation",
                       attribute_names=names)
    write_description_file(dataset.path, {"shards": shards_uri})
    dataset.metadata.update({"shards": shards_uri, "ingested": True,
                             "class_names": index.get("class_names") or []})
    for split, entry in (index.get("splits") or {}).items():
        if isinstance(entry, dict) and "num_samples" in entry:
            dataset.metadata[f"{split}_samples"] = entry["num_samples"]
