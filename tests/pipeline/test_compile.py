"""The compiled pipeline: parameters from the dataclass, GPU/node-pool/secret/retry settings,
and the checked-in YAML being current."""
import dataclasses
from pathlib import Path

import pytest
import yaml

from kubeseg.config import Hyperparameters

REPO = Path(__file__).resolve().parents[2]
CHECKED_IN = REPO / "pipelines" / "segmentation.yaml"


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    from pipelines.segmentation import compile_pipeline

    path = tmp_path_factory.mktemp("compiled") / "segmentation.yaml"
    compile_pipeline(str(path))
    return path


@pytest.fixture(scope="module")
def documents(compiled):
    spec, platform = list(yaml.safe_load_all(compiled.read_text()))
    return spec, platform


def test_checked_in_yaml_is_current(compiled):
    assert CHECKED_IN.is_file(), "pipelines/segmentation.yaml is missing: run 'kubeseg compile'"
    assert compiled.read_text() == CHECKED_IN.read_text(), (
        "pipelines/segmentation.yaml is stale: run 'kubeseg compile' and commit the result")


def test_compiling_twice_gives_the_same_text(compiled, tmp_path):
    from pipelines.segmentation import compile_pipeline

    again = tmp_path / "again.yaml"
    compile_pipeline(str(again))
    assert again.read_text() == compiled.read_text()


def test_every_hyperparameter_is_a_typed_pipeline_parameter(documents):
    spec, _ = documents
    inputs = spec["root"]["inputDefinitions"]["parameters"]
    kinds = {"int": "NUMBER_INTEGER", "float": "NUMBER_DOUBLE", "bool": "BOOLEAN",
             "choice": "STRING", "int_list": "STRING", "float_list": "STRING"}
    for f in dataclasses.fields(Hyperparameters):
        s = f.metadata["spec"]
        assert f.name in inputs, f"hyperparameter {f.name} is not a pipeline parameter"
        assert inputs[f.name]["parameterType"] == kinds[s.kind], f.name
        assert s.help.split()[0] in inputs[f.name].get("description", ""), f.name
        if s.required:
            assert "defaultValue" not in inputs[f.name], f"{f.name} must be required"
        else:
            default = f.default
            if isinstance(default, tuple):
                default = ", ".join(map(str, default))
            assert inputs[f.name]["defaultValue"] == default, f.name
    assert inputs["min_miou"]["parameterType"] == "NUMBER_DOUBLE"


def test_train_step_runs_on_the_gpu_pool_with_secret_and_retries(documents):
    from pipelines import segmentation as seg

    spec, platform = documents
    container = spec["deploymentSpec"]["executors"]["exec-train"]["container"]
    accelerator = container["resources"]["accelerator"]
    assert accelerator["resourceType"] == seg.TRAIN_ACCELERATOR == "nvidia.com/gpu"
    assert int(accelerator["resourceCount"]) == seg.TRAIN_GPU_LIMIT
    assert container["image"] == seg.TRAINER_IMAGE
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-train"]
    assert k8s["nodeSelector"]["labels"] == {"kubeseg.io/node-pool": "gpu"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists",
            "effect": "NoSchedule"} in k8s["tolerations"]
    secret = k8s["secretAsEnv"][0]
    assert secret["secretName"] == seg.STORAGE_SECRET
    assert {e["envVar"] for e in secret["keyToEnv"]} == {
        "KUBESEG_S3_ENDPOINT", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    task = spec["root"]["dag"]["tasks"]["train"]
    assert task["retryPolicy"]["maxRetryCount"] == seg.TRAIN_RETRIES
    # the checkpoint location is derived from the run id, the same for every retry
    assert (task["inputs"]["parameters"]["run_id"]["runtimeValue"]["constant"]
            == "{{$.pipeline_job_uuid}}")


def test_every_storage_step_gets_the_secret(documents):
    _, platform = documents
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for name in ("exec-validate-dataset", "exec-ingest-manifest", "exec-train",
                 "exec-evaluate"):
        assert executors[name]["secretAsEnv"][0]["secretName"] == "kubeseg-storage", name


def test_components_install_nothing_at_run_time(documents):
    spec, _ = documents
    for name, executor in spec["deploymentSpec"]["executors"].items():
        command = " ".join(executor["container"]["command"])
        assert "pip install" not in command, f"{name} installs packages at run time"


def test_deploy_runs_only_when_the_gate_passes(documents):
    spec, _ = documents
    condition = spec["root"]["dag"]["tasks"]["condition-1"]
    assert "evaluate-Output" in condition["triggerPolicy"]["condition"]
    assert "deploy" in spec["components"]["comp-condition-1"]["dag"]["tasks"]
    order = spec["root"]["dag"]["tasks"]
    assert "validate-dataset" in order["ingest-manifest"]["dependentTasks"]
    assert "ingest-manifest" in order["train"]["dependentTasks"]


def test_hyperparameters_reach_the_first_step_as_assignments(documents):
    spec, _ = documents
    value = (spec["root"]["dag"]["tasks"]["validate-dataset"]["inputs"]["parameters"]
             ["hyperparameters"]["runtimeValue"]["constant"])
    lines = value.splitlines()
    assert [line.split("=", 1)[0] for line in lines] == [
        f.name for f in dataclasses.fields(Hyperparameters)]
    assert lines[0] == "backbone={{$.inputs.parameters['pipelinechannel--backbone']}}"
