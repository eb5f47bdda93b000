"""The PyTorchJob for multi-GPU / multi-node training, checked against the Training Operator
CRD schema (tests/schemas/pytorchjob.yaml) and the core PodTemplate schema."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import crd_schema  # noqa: E402

from kubeseg.deploy.training_job import (build_pytorch_job, job_name, job_state,  # noqa: E402
                                         train_arguments)
from kubeseg.errors import ConfigError  # noqa: E402

K8S_VERSION = "1.32"


def _job(**kwargs):
    args = train_arguments(hyperparameters_uri="s3://runs/r1/train/hyperparameters.json",
                           output_uri="s3://runs/r1/train",
                           channels={"shards": "s3://runs/r1/shards", "train": None},
                           pretrained_uri="s3://weights/resnet50.pth", class_names=["a", "b"])
    return build_pytorch_job(job_name("kubeseg-train", "0b5e-41d2-9c3a-77aa"), args,
                             storage_secret="kubeseg-storage", **kwargs)


def _validate_template(template):
    import kubernetes_validate

    pod_template = {"apiVersion": "v1", "kind": "PodTemplate",
                    "metadata": {"name": "replica"}, "template": template}
    try:
        kubernetes_validate.validate(pod_template, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        raise AssertionError(f"pod template invalid: {exc.message} at "
                             f"{list(exc.absolute_path)}") from None


@pytest.mark.parametrize("nodes,gpus", [(1, 4), (3, 8), (2, 0)])
def test_job_fits_the_crd_and_pod_schemas(nodes, gpus):
    job = _job(num_nodes=nodes, gpus_per_node=gpus)
    crd_schema.validate(job, "pytorchjob.yaml")
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1
    assert replicas.get("Worker", {}).get("replicas", 0) == nodes - 1
    for spec in replicas.values():
        _validate_template(spec["template"])


def test_job_runs_torchrun_with_gpus_on_the_gpu_pool():
    job = _job(num_nodes=2, gpus_per_node=4)
    assert job["spec"]["nprocPerNode"] == "4"
    pod = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["name"] == "pytorch"
    command = container["command"]
    assert command[:3] == ["python", "-m", "torch.distributed.run"]
    assert "--nnodes=2" in command and "--nproc-per-node=4" in command
    i = command.index("kubeseg")
    assert command[i - 1:i + 2] == ["-m", "kubeseg", "train"]
    assert command[command.index("--output") + 1] == "s3://runs/r1/train"
    assert command[command.index("--shards") + 1] == "s3://runs/r1/shards"
    assert "--train" not in command
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert container["envFrom"] == [{"secretRef": {"name": "kubeseg-storage"}}]
    assert pod["nodeSelector"] == {"kubeseg.io/node-pool": "gpu"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"


def test_train_arguments_parse_with_the_train_verb():
    from kubeseg.cli import build_parser

    job = _job(num_nodes=1, gpus_per_node=2)
    command = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"][
        "containers"][0]["command"]
    args = build_parser().parse_args(command[command.index("kubeseg") + 1:])
    assert args.verb == "train" and args.output == "s3://runs/r1/train"
    assert args.class_names == "a,b" and args.pretrained_weights == "s3://weights/resnet50.pth"


def test_name_is_stable_per_run_and_a_dns_label():
    assert job_name("kubeseg-train", "0B5E-41d2") == job_name("kubeseg-train", "0B5E-41d2")
    assert job_name("kubeseg-train", "0B5E-41d2") == "kubeseg-train-0b5e41d2"


def test_bad_arguments_are_named():
    with pytest.raises(ConfigError) as info:
        build_pytorch_job("Bad_Name", ["--hyperparameters", "x"], num_nodes=0,
                          gpus_per_node=-1)
    text = str(info.value)
    assert "name='Bad_Name'" in text and "num_nodes=0" in text
    assert "gpus_per_node=-1" in text and "--output" in text


def test_state_reads_the_operator_conditions():
    running = {"status": {"conditions": [{"type": "Created", "status": "True"},
                                         {"type": "Running", "status": "True"}]}}
    done = {"status": {"conditions": [{"type": "Running", "status": "False"},
                                      {"type": "Succeeded", "status": "True"}]}}
    failed = {"status": {"conditions": [{"type": "Failed", "status": "True",
                                         "message": "OOMKilled"}]}}
    assert job_state(running) == "Running"
    assert job_state(done) == "Succeeded"
    assert job_state(failed) == "Failed"
    assert job_state({}) is None


@pytest.mark.cluster
@pytest.mark.skip(reason="needs a Kubernetes cluster with the Kubeflow Training Operator")
def test_run_pytorch_job_on_a_cluster():
    raise AssertionError("not reached")
