"""Pipeline step 1: check the hyperparameters and the dataset before anything expensive runs."""
from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Dataset, Markdown, Output

from kubeseg_platform.components.images import TRAINER_IMAGE


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def validate_dataset(
    hyperparameters: str,
    train: str,
    validation: str,
    train_annotation: str,
    validation_annotation: str,
    label_map: str,
    manifest_uri: str,
    validation_manifest_uri: str,
    class_names: str,
    num_nodes: int,
    gpus_per_node: int,
    output_root: str,
    run_id: str,
    report: Output[Markdown],
    dataset: Output[Dataset],
    strict_labels: bool = False,
) -> NamedTuple("Outputs", [("hyperparameters_json", str), ("num_classes", int),
                            ("training", str)]):
    """Validate the hyperparameters and the four-channel dataset.

    Every hyperparameter is checked (names, types, ranges, cross-checks) and all problems are
    reported at once; the step fails before any data is read when one is wrong. Then every
    image/annotation pair of the train and validation channels is checked: missing partners,
    unreadable files, RGB annotations, size mismatches, label values >= num_classes that are
    not 255 (ignore), and with ``strict_labels`` pixel values that neither the label map nor
    num_classes explains. Fatal problems fail the step with the offending keys; warnings only
    go to the report, grouped (one line per kind, with a count and example keys). When ``manifest_uri`` is given the dataset comes from an augmented manifest,
    whose lines are checked by the ingest step instead.

    Args:
        hyperparameters: One ``name=value`` per line (values may be strings, as from a form).
        train: Training images (s3:// prefix or folder).
        validation: Validation images.
        train_annotation: Training annotation PNGs.
        validation_annotation: Validation annotation PNGs.
        label_map: Folder holding train_label_map.json (optional).
        manifest_uri: Augmented manifest (JSON Lines); when set the channels are not used.
        validation_manifest_uri: Validation manifest (read by the ingest step; an error
            without manifest_uri).
        class_names: Comma-separated class names (optional; shown in reports and the model).
        num_nodes: Training pods (checked here, with gpus_per_node, before any work).
        gpus_per_node: GPUs per training pod.
        output_root: Object-store prefix for this pipeline's files; the report goes to
            ``<output_root>/<run_id>/validation/``.
        run_id: The pipeline run's id (keeps runs apart).
        strict_labels: Fail on annotation pixel values above num_classes that no label-map
            entry maps (the ``strict_labels`` pipeline parameter, ``kubeseg validate
            --strict-labels``); by default they are a warning.

    Returns:
        hyperparameters_json: The checked hyperparameters with every default filled in.
        num_classes: The number of classes.
        training: "single" (one GPU in the train step's pod) or "distributed" (a training job).
        report: The validation report (Markdown).
        dataset: The dataset description (JSON: channel URIs) the next steps read.
    """
    from kubeseg import storage
    from kubeseg.config import Hyperparameters, PipelineParameters, parse_assignments
    from kubeseg.data.channels import Channels, split_class_names, write_description_file
    from kubeseg.data.validate import validate_dataset as check_dataset
    from kubeseg.deploy.training_job import training_plan

    hp = Hyperparameters.from_dict(parse_assignments(
        [line for line in hyperparameters.splitlines() if line.strip()]))
    PipelineParameters.from_dict({"manifest_uri": manifest_uri,
                                  "validation_manifest_uri": validation_manifest_uri})
    plan = training_plan(num_nodes, gpus_per_node)
    names = split_class_names(class_names)
    channels = Channels.from_description(dict(
        train=train, validation=validation, train_annotation=train_annotation,
        validation_annotation=validation_annotation, label_map=label_map))
    if manifest_uri:
        text = (f"# Dataset validation\n\nThe dataset comes from the augmented manifest "
                f"`{manifest_uri}`; its lines are checked when it is ingested.\n")
        description = {"manifest": manifest_uri, "label_map": label_map or None}
    else:
        report_uri = storage.join(output_root, run_id, "validation")
        result = check_dataset(channels, hp.num_classes, report_uri, class_names=names,
                               strict_labels=strict_labels)
        text = result.to_markdown()
        description = channels.to_dict()
        dataset.metadata["report"] = report_uri
    with open(report.path, "w") as f:
        f.write(text)
    if not manifest_uri:
        result.raise_if_fatal(report_uri)
    write_description_file(dataset.path, description)
    dataset.metadata.update({k: v for k, v in description.items() if v})
    return (hp.to_json(), hp.num_classes, plan)
