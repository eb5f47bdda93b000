"""Distributed training jobs: the Kubeflow Trainer v2 TrainJob (default) and the Training
Operator 1.9 PyTorchJob, checked against their CRDs (full upstream files where present, the
trimmed PyTorchJob copy always) and the core pod schema."""
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import crd_schema  # noqa: E402

from kubeseg.config import PYTORCHJOB, TRAINER_V2  # noqa: E402
from kubeseg.deploy import placement  # noqa: E402
from kubeseg.deploy.training_job import (TrainingJobSpec, build_pytorch_job,  # noqa: E402
                                         build_train_job, build_training_job, job_name,
                                         job_state, train_arguments, training_plan)
from kubeseg.errors import ConfigError  # noqa: E402

K8S_VERSION = "1.32"


def _spec(**kwargs):
    args = train_arguments(hyperparameters_uri="s3://runs/r1/train/hyperparameters.json",
                           output_uri="s3://runs/r1/train",
                           channels={"shards": "s3://runs/r1/shards", "train": None},
                           pretrained_uri="s3://weights/resnet50.pth", class_names=["a", "b"])
    return TrainingJobSpec(name=job_name("kubeseg-train", "0b5e-41d2-9c3a-77aa"),
                           train_args=tuple(args), **kwargs)


def _validate_pod(template):
    import kubernetes_validate

    pod_template = {"apiVersion": "v1", "kind": "PodTemplate",
                    "metadata": {"name": "replica"}, "template": template}
    try:
        kubernetes_validate.validate(pod_template, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        raise AssertionError(f"pod template invalid: {exc.message} at "
                             f"{list(exc.absolute_path)}") from None


def _pod_patch(job):
    (patch,) = job["spec"]["runtimePatches"]
    (replicated,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    return replicated["name"], replicated["template"]["spec"]["template"]


# -- TrainJob (Kubeflow Trainer v2) ---------------------------------------------------------------
@pytest.mark.parametrize("nodes,gpus", [(1, 4), (3, 8), (2, 0)])
def test_train_job_fits_the_upstream_crd(nodes, gpus):
    job = build_train_job(_spec(num_nodes=nodes, gpus_per_node=gpus), active_deadline_s=3600)
    crd_schema.validate(job, crd_schema.upstream("trainer.kubeflow.org_trainjobs.yaml"))


def test_train_job_runs_torchrun_on_the_gpu_pool_with_secret_shm_and_no_sidecar():
    job = build_train_job(_spec(num_nodes=2, gpus_per_node=4, shm_size="16Gi"))
    spec = job["spec"]
    assert spec["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org",
                                  "kind": "ClusterTrainingRuntime", "name": "torch-distributed"}
    trainer = spec["trainer"]
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (2, 4)
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "4"
    command = trainer["command"]
    assert command[:4] == ["python3", "-m", "torch.distributed.run", "--nnodes=2"]
    assert command[command.index("--device") + 1] == "cuda"  # a pod without a GPU fails fast
    secret_env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in trainer["env"]
                  if "valueFrom" in e}
    assert set(secret_env) == set(placement.STORAGE_SECRET_KEYS)
    assert {ref["name"] for ref in secret_env.values()} == {"kubeseg-storage"}
    name, template = _pod_patch(job)
    assert template["metadata"]["annotations"] == {"sidecar.istio.io/inject": "false"}
    pod = template["spec"]
    assert pod["volumes"] == [{"name": "dshm",
                               "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}}]
    (container,) = pod["containers"]
    assert container["volumeMounts"] == [{"name": "dshm", "mountPath": "/dev/shm"}]
    assert pod["nodeSelector"] == placement.DEFAULT_GPU_NODE_SELECTOR
    assert pod["tolerations"] == [dict(t) for t in placement.DEFAULT_GPU_TOLERATIONS]
    assert trainer["image"].endswith(f"/trainer:{trainer['image'].rsplit(':', 1)[1]}")


def test_train_job_patches_the_names_the_runtime_has():
    """runtimePatches address the torch-distributed runtime's replicated job and container by
    name; the upstream runtime must have both, or the patch would silently miss."""
    runtime = yaml.safe_load(crd_schema.upstream("torch_distributed.yaml").read_text())
    crd_schema.validate(runtime, crd_schema.upstream(
        "trainer.kubeflow.org_clustertrainingruntimes.yaml"))
    assert runtime["metadata"]["name"] == "torch-distributed"
    name, template = _pod_patch(build_train_job(_spec()))
    (replicated,) = [r for r in runtime["spec"]["template"]["spec"]["replicatedJobs"]
                     if r["name"] == name]
    containers = replicated["template"]["spec"]["template"]["spec"]["containers"]
    assert template["spec"]["containers"][0]["name"] in {c["name"] for c in containers}


def test_cpu_train_job_asks_for_no_gpu_and_no_cuda():
    job = build_train_job(_spec(num_nodes=2, gpus_per_node=0))
    trainer = job["spec"]["trainer"]
    assert "nvidia.com/gpu" not in trainer["resourcesPerNode"]["limits"]
    assert "--device" not in trainer["command"]
    _, template = _pod_patch(job)
    assert "nodeSelector" not in template["spec"]


# -- PyTorchJob (Training Operator 1.9) -----------------------------------------------------------
@pytest.mark.parametrize("nodes,gpus", [(1, 4), (3, 8), (2, 0)])
def test_pytorch_job_fits_the_crd_and_pod_schemas(nodes, gpus):
    job = build_pytorch_job(_spec(num_nodes=nodes, gpus_per_node=gpus))
    crd_schema.validate(job, "pytorchjob.yaml")
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1
    assert replicas.get("Worker", {}).get("replicas", 0) == nodes - 1
    for spec in replicas.values():
        _validate_pod(spec["template"])


@pytest.mark.parametrize("nodes,gpus", [(1, 4), (3, 8)])
def test_pytorch_job_fits_the_full_upstream_crd(nodes, gpus):
    job = build_pytorch_job(_spec(num_nodes=nodes, gpus_per_node=gpus))
    crd_schema.validate(job, crd_schema.upstream("kubeflow.org_pytorchjobs.yaml"))


def test_pytorch_job_runs_torchrun_with_gpus_on_the_gpu_pool():
    job = build_pytorch_job(_spec(num_nodes=2, gpus_per_node=4))
    assert job["spec"]["nprocPerNode"] == "4"
    template = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]
    assert template["metadata"]["annotations"] == {"sidecar.istio.io/inject": "false"}
    pod = template["spec"]
    container = pod["containers"][0]
    assert container["name"] == "pytorch"
    command = container["command"]
    assert command[:3] == ["python3", "-m", "torch.distributed.run"]
    assert "--nnodes=2" in command and "--nproc-per-node=4" in command
    i = command.index("kubeseg")
    assert command[i - 1:i + 2] == ["-m", "kubeseg", "train"]
    assert command[command.index("--output") + 1] == "s3://runs/r1/train"
    assert command[command.index("--shards") + 1] == "s3://runs/r1/shards"
    assert "--train" not in command
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert container["imagePullPolicy"] == "Always"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    assert pod["nodeSelector"] == {"kubeseg.io/node-pool": "gpu"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"


def test_train_arguments_parse_with_the_train_verb():
    from kubeseg.cli import build_parser

    for job in (build_pytorch_job(_spec(gpus_per_node=2)), build_train_job(_spec())):
        if job["kind"] == "TrainJob":
            command = job["spec"]["trainer"]["command"]
        else:
            command = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"][
                "containers"][0]["command"]
        args = build_parser().parse_args(command[command.index("kubeseg") + 1:])
        assert args.verb == "train" and args.output == "s3://runs/r1/train"
        assert args.class_names == "a,b" and args.pretrained_weights == "s3://weights/resnet50.pth"
        assert args.device == "cuda"


# -- choosing and naming --------------------------------------------------------------------------
def test_the_operator_is_an_explicit_choice():
    assert build_training_job(_spec())["kind"] == "TrainJob"
    assert build_training_job(_spec(), TRAINER_V2)["kind"] == "TrainJob"
    assert build_training_job(_spec(), PYTORCHJOB)["kind"] == "PyTorchJob"
    with pytest.raises(ConfigError, match="training_operator='mpi'"):
        build_training_job(_spec(), "mpi")


def test_training_plan_decides_where_training_runs():
    assert training_plan(1, 1) == "single" and training_plan(1, 0) == "single"
    assert training_plan(2, 1) == "distributed" and training_plan(1, 4) == "distributed"
    with pytest.raises(ConfigError, match="num_nodes=0.*\n.*gpus_per_node=-1"):
        training_plan(0, -1)


def test_name_is_stable_per_run_and_a_dns_label():
    assert job_name("kubeseg-train", "0B5E-41d2") == job_name("kubeseg-train", "0B5E-41d2")
    assert job_name("kubeseg-train", "0B5E-41d2") == "kubeseg-train-0b5e41d2"


def test_bad_arguments_are_named():
    with pytest.raises(ConfigError) as info:
        build_pytorch_job(TrainingJobSpec(name="Bad_Name", train_args=("--hyperparameters", "x"),
                                          num_nodes=0, gpus_per_node=-1))
    text = str(info.value)
    assert "name='Bad_Name'" in text and "num_nodes=0" in text
    assert "gpus_per_node=-1" in text and "--output" in text


def test_state_reads_both_operators_conditions():
    running = {"status": {"conditions": [{"type": "Created", "status": "True"},
                                         {"type": "Running", "status": "True"}]}}
    done = {"status": {"conditions": [{"type": "Running", "status": "False"},
                                      {"type": "Succeeded", "status": "True"}]}}
    complete = {"status": {"conditions": [{"type": "Complete", "status": "True"}]}}
    failed = {"status": {"conditions": [{"type": "Failed", "status": "True",
                                         "message": "OOMKilled"}]}}
    assert job_state(running) == "Running"
    assert job_state(done) == "Succeeded" and job_state(complete) == "Succeeded"
    assert job_state(failed) == "Failed"
    assert job_state({}) is None


@pytest.mark.cluster
def test_run_training_job_on_a_cluster():
    import os

    if not os.environ.get("KUBECONFIG"):
        pytest.skip("needs a Kubernetes cluster with Kubeflow Trainer v2 (set KUBECONFIG and "
                    "KUBESEG_TEST_TRAIN_ARGS to kubeseg train arguments the cluster can read)")
    from kubeseg.deploy.training_job import run_training_job

    args = tuple(os.environ["KUBESEG_TEST_TRAIN_ARGS"].split())
    spec = TrainingJobSpec(name=job_name("kubeseg-test", str(os.getpid())), train_args=args,
                           num_nodes=2, gpus_per_node=0,
                           namespace=os.environ.get("KUBESEG_TEST_NAMESPACE", "default"))
    assert run_training_job(build_train_job(spec), poll_s=5.0) == "Succeeded"
