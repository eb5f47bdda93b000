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
    from kubeseg_platform.pipelines.segmentation import compile_pipeline

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
    from kubeseg_platform.pipelines.segmentation import compile_pipeline

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


def _tasks(spec):
    """Every task of the pipeline, by name, whichever sub-DAG (branch) holds it."""
    tasks = dict(spec["root"]["dag"]["tasks"])
    for component in spec["components"].values():
        tasks.update((component.get("dag") or {}).get("tasks") or {})
    return tasks


def test_one_gpu_training_runs_on_the_gpu_pool_with_secret_shm_and_retries(documents):
    from kubeseg.deploy import placement
    from kubeseg_platform.pipelines import segmentation as seg

    spec, platform = documents
    container = spec["deploymentSpec"]["executors"]["exec-train"]["container"]
    accelerator = container["resources"]["accelerator"]
    assert accelerator["resourceType"] == seg.TRAIN_ACCELERATOR == "nvidia.com/gpu"
    assert int(accelerator["resourceCount"]) == seg.TRAIN_GPU_LIMIT
    assert container["image"] == seg.TRAINER_IMAGE
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-train"]
    assert k8s["nodeSelector"]["labels"] == placement.DEFAULT_GPU_NODE_SELECTOR
    assert {"key": "nvidia.com/gpu", "operator": "Exists",
            "effect": "NoSchedule"} in k8s["tolerations"]
    secret = k8s["secretAsEnv"][0]
    assert secret["secretName"] == seg.STORAGE_SECRET
    assert {e["envVar"] for e in secret["keyToEnv"]} == set(placement.STORAGE_SECRET_KEYS)
    assert k8s["emptyDirMounts"] == [{"volumeName": "dshm", "mountPath": "/dev/shm",
                                      "medium": "Memory", "sizeLimit": seg.SETTINGS.shm_size}]
    assert int(k8s["activeDeadlineSeconds"]) == seg.SETTINGS.train_timeout_s
    task = _tasks(spec)["train"]
    assert task["retryPolicy"]["maxRetryCount"] == seg.TRAIN_RETRIES
    # told to use CUDA (pipeline parameter train_device, default cuda)
    assert (task["inputs"]["parameters"]["device"]["componentInputParameter"]
            == "pipelinechannel--train_device")
    assert spec["root"]["inputDefinitions"]["parameters"]["train_device"][
        "defaultValue"] == "cuda"
    # the checkpoint location is derived from the run id, the same for every retry
    assert (task["inputs"]["parameters"]["run_id"]["runtimeValue"]["constant"]
            == "{{$.pipeline_job_uuid}}")


def test_distributed_training_is_launched_by_a_step_without_a_gpu(documents):
    from kubeseg_platform.pipelines import segmentation as seg

    spec, platform = documents
    container = spec["deploymentSpec"]["executors"]["exec-train-distributed"]["container"]
    assert "accelerator" not in container.get("resources", {})
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"][
        "exec-train-distributed"]
    assert "nodeSelector" not in k8s and "tolerations" not in k8s
    tasks = _tasks(spec)
    launcher = tasks["train-distributed"]["inputs"]["parameters"]
    assert launcher["shm_size"]["runtimeValue"]["constant"] == seg.SETTINGS.shm_size
    assert launcher["trainer_image"]["runtimeValue"]["constant"] == seg.TRAINER_IMAGE
    inputs = spec["root"]["inputDefinitions"]["parameters"]
    assert inputs["training_operator"]["defaultValue"] == "trainer-v2"
    assert inputs["training_runtime"]["defaultValue"] == "torch-distributed"
    # the validation step decides the branch
    conditions = {name: task.get("triggerPolicy", {}).get("condition", "")
                  for name, task in tasks.items()}
    assert any("validate-dataset-training" in c and "distributed" in c
               for c in conditions.values()), conditions


def test_every_step_has_a_timeout_and_pulls_rebuilt_tags(documents):
    spec, platform = documents
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert set(executors) == set(spec["deploymentSpec"]["executors"])
    for name, k8s in executors.items():
        assert int(k8s["activeDeadlineSeconds"]) >= 60, name
        assert k8s["imagePullPolicy"] == "Always", name


def test_data_loading_steps_get_shared_memory(documents):
    from kubeseg_platform.pipelines import segmentation as seg

    _, platform = documents
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for name in ("exec-train", "exec-evaluate", "exec-evaluate-2"):
        (mount,) = executors[name]["emptyDirMounts"]
        assert mount["mountPath"] == "/dev/shm" and mount["medium"] == "Memory", name
        assert mount["sizeLimit"] == seg.SETTINGS.shm_size, name


def test_every_storage_step_gets_the_secret(documents):
    _, platform = documents
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for name in ("exec-validate-dataset", "exec-ingest-manifest", "exec-train",
                 "exec-train-distributed", "exec-evaluate", "exec-evaluate-2", "exec-promote",
                 "exec-promote-2"):
        assert executors[name]["secretAsEnv"][0]["secretName"] == "kubeseg-storage", name


def test_components_install_nothing_at_run_time(documents):
    spec, _ = documents
    for name, executor in spec["deploymentSpec"]["executors"].items():
        command = " ".join(executor["container"]["command"])
        assert "pip install" not in command, f"{name} installs packages at run time"


def test_steps_given_the_model_read_it_where_training_recorded_it(documents):
    spec, _ = documents
    executors = spec["deploymentSpec"]["executors"]
    for name in ("exec-evaluate", "exec-evaluate-2", "exec-deploy", "exec-deploy-2",
                 "exec-promote", "exec-promote-2"):
        source = " ".join(executors[name]["container"]["command"])
        assert "from kubeseg import storage" in source, name
        assert "storage.model_uri(model)" in source, name
        assert 'metadata.get("uri")' not in source, name


def test_release_runs_only_when_the_gate_passes_and_promotes_after_deploying(documents):
    spec, _ = documents
    tasks = _tasks(spec)
    for suffix in ("", "-2"):
        gates = [c for c in spec["components"].values()
                 if "deploy" + suffix in (c.get("dag") or {}).get("tasks", {})]
        assert gates, f"no gate holds deploy{suffix}"
        promote = tasks["promote" + suffix]
        assert "deploy" + suffix in promote["dependentTasks"]
    conditions = " ".join(t.get("triggerPolicy", {}).get("condition", "")
                          for t in tasks.values())
    assert "evaluate-Output" in conditions and "evaluate-2-Output" in conditions
    (branches,) = [t for name, t in spec["root"]["dag"]["tasks"].items()
                   if name.startswith("condition-branches")]
    assert {"ingest-manifest", "validate-dataset"} <= set(branches["dependentTasks"])
    assert "validate-dataset" in tasks["ingest-manifest"]["dependentTasks"]


def test_compile_settings_change_shm_and_timeouts(tmp_path):
    import os
    import subprocess
    import sys

    out = tmp_path / "p.yaml"
    env = {**os.environ, "KUBESEG_SHM_SIZE": "1Gi"}
    result = subprocess.run([sys.executable, "-m", "kubeseg", "compile", "--output", str(out),
                             "--manifests", str(tmp_path / "none"), "--step-timeout", "600"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 1 and "--manifests" in result.stderr  # no such folder
    result = subprocess.run([sys.executable, "-m", "kubeseg", "compile", "--output", str(out),
                             "--step-timeout", "600", "--train-timeout", "7200",
                             "--manifests", str(REPO / "manifests")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    _, platform = yaml.safe_load_all(out.read_text())
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert executors["exec-train"]["emptyDirMounts"][0]["sizeLimit"] == "1Gi"
    assert int(executors["exec-train"]["activeDeadlineSeconds"]) == 7200
    assert int(executors["exec-validate-dataset"]["activeDeadlineSeconds"]) == 600


def test_hyperparameters_reach_the_first_step_as_assignments(documents):
    spec, _ = documents
    value = (spec["root"]["dag"]["tasks"]["validate-dataset"]["inputs"]["parameters"]
             ["hyperparameters"]["runtimeValue"]["constant"])
    lines = value.splitlines()
    assert [line.split("=", 1)[0] for line in lines] == [
        f.name for f in dataclasses.fields(Hyperparameters)]
    assert lines[0] == "backbone={{$.inputs.parameters['pipelinechannel--backbone']}}"
