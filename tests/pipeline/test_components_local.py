"""Single components run with kfp.local (the same function source a cluster would run)."""
import json

import pytest

from kubeseg.data.synthetic import make_shapes_dataset


@pytest.fixture(scope="module")
def kfp_local(tmp_path_factory):
    from kfp import local

    root = tmp_path_factory.mktemp("pipeline-root")
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root))
    return root


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes"), n_train=3, n_val=2, size=32,
                               num_classes=3)


def _validate(shapes, tmp_path, hyperparameters, num_nodes=1, gpus_per_node=1,
              validation_manifest_uri=""):
    from kubeseg_platform.components.validate_dataset import validate_dataset

    return validate_dataset(hyperparameters=hyperparameters, manifest_uri="",
                            validation_manifest_uri=validation_manifest_uri,
                            class_names="background,disc,square,", num_nodes=num_nodes,
                            gpus_per_node=gpus_per_node, output_root=str(tmp_path / "work"),
                            run_id="run-1", **shapes)


def test_validate_checks_hyperparameters_and_describes_the_dataset(kfp_local, shapes,
                                                                   tmp_path):
    task = _validate(shapes, tmp_path, "num_classes=3\nnum_training_samples=3\n"
                                       "use_pretrained_model=False\nepochs=2.0\n")
    hp = json.loads(task.outputs["hyperparameters_json"])
    assert hp["num_classes"] == 3 and hp["epochs"] == 2 and hp["backbone"] == "resnet-50"
    assert task.outputs["num_classes"] == 3
    assert task.outputs["training"] == "single"  # one GPU: trains in the step's own pod
    with open(task.outputs["dataset"].path) as f:
        assert json.load(f)["train_annotation"] == shapes["train_annotation"]
    with open(task.outputs["report"].path) as f:
        assert "train" in f.read()
    assert (tmp_path / "work" / "run-1" / "validation" / "report.json").is_file()


def test_validate_plans_distributed_training_and_checks_its_parameters(kfp_local, shapes,
                                                                      tmp_path):
    hp = "num_classes=3\nnum_training_samples=3\n"
    assert _validate(shapes, tmp_path, hp, num_nodes=2).outputs["training"] == "distributed"
    assert _validate(shapes, tmp_path, hp, gpus_per_node=4).outputs["training"] == "distributed"
    with pytest.raises(RuntimeError):
        _validate(shapes, tmp_path / "bad", hp, num_nodes=0)
    assert not (tmp_path / "bad" / "work").exists()  # failed before reading any data


def test_validate_fails_on_a_bad_hyperparameter(kfp_local, shapes, tmp_path):
    with pytest.raises(RuntimeError):
        _validate(shapes, tmp_path, "num_classes=3\nnum_training_samples=3\noptimizer=adamw\n")
    assert not (tmp_path / "work").exists()  # failed before reading any data


def test_validate_fails_on_a_validation_manifest_without_a_training_one(kfp_local, shapes,
                                                                        tmp_path):
    with pytest.raises(RuntimeError):
        _validate(shapes, tmp_path, "num_classes=3\nnum_training_samples=3\n",
                  validation_manifest_uri="s3://data/validation.manifest")
    assert not (tmp_path / "work").exists()  # failed before reading any data


def test_ingest_passes_channels_through_without_a_manifest(kfp_local, shapes, tmp_path):
    from kfp import dsl

    from kubeseg_platform.components.ingest_manifest import ingest_manifest
    from kubeseg_platform.components.validate_dataset import validate_dataset

    @dsl.pipeline
    def channels_only(train: str, validation: str, train_annotation: str,
                      validation_annotation: str, label_map: str, root: str) -> dsl.Dataset:
        check = validate_dataset(
            hyperparameters="num_classes=3\nnum_training_samples=3", train=train,
            validation=validation, train_annotation=train_annotation,
            validation_annotation=validation_annotation, label_map=label_map,
            manifest_uri="", validation_manifest_uri="", class_names="", num_nodes=1,
            gpus_per_node=1, output_root=root, run_id="r")
        return ingest_manifest(source=check.outputs["dataset"], manifest_uri="",
                               validation_manifest_uri="", attribute_names="",
                               output_root=root, run_id="r").outputs["dataset"]

    task = channels_only(root=str(tmp_path / "work"), **shapes)
    with open(task.output.path) as f:
        description = json.load(f)
    assert description["train"] == shapes["train"] and description.get("shards") is None
    assert not (tmp_path / "work" / "r" / "shards").exists()


def test_deploy_renders_the_inference_service_in_a_dry_run(kfp_local, tmp_path):
    import yaml
    from kfp import dsl

    from kubeseg_platform.components.deploy import deploy

    @dsl.pipeline
    def deploy_only(model_dir: str) -> dsl.Markdown:
        model = dsl.importer(artifact_uri=model_dir, artifact_class=dsl.Model,
                             metadata={"uri": "s3://kubeseg/runs/r/train/model"})
        return deploy(model=model.output, name="shapes", namespace="team-a",
                      image_registry="registry.example/team", image_tag="1",
                      service_account="kubeseg-predictor",
                      storage_secret="kubeseg-storage", gpus=1, canary_traffic_percent=20,
                      dry_run=True, timeout_s=60.0).outputs["inference_service"]

    (tmp_path / "model").mkdir()
    task = deploy_only(model_dir=str(tmp_path / "model"))
    with open(task.output.path) as f:
        text = f.read()
    obj = yaml.safe_load(text.split("```yaml\n", 1)[1].split("```", 1)[0])
    predictor = obj["spec"]["predictor"]
    assert obj["metadata"] == {**obj["metadata"], "name": "shapes", "namespace": "team-a"}
    assert predictor["canaryTrafficPercent"] == 20
    container = predictor["containers"][0]
    assert {"name": "STORAGE_URI", "value": "s3://kubeseg/runs/r/train/model"} in container["env"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["image"] == "registry.example/team/predictor-gpu:1"  # GPUs: CUDA build
