"""The GPU node pool check on Node objects as the API returns them (built with the kubernetes
client's models and serialised as the API server's JSON)."""
import pytest

from kubeseg.config import PipelineParameters
from kubeseg.preflight import nodes
from kubeseg.preflight.base import FAIL, OK, WARN, failed, found

client = pytest.importorskip("kubernetes.client")

GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}


def node(name, labels=None, taints=(), gpus=None, ready=True, cordoned=False):
    allocatable = {"cpu": "16", "memory": "64Gi"}
    if gpus is not None:
        allocatable["nvidia.com/gpu"] = str(gpus)
    model = client.V1Node(
        api_version="v1", kind="Node",
        metadata=client.V1ObjectMeta(name=name, labels={"kubernetes.io/os": "linux",
                                                        **(labels or {})}),
        spec=client.V1NodeSpec(taints=[client.V1Taint(**t) for t in taints] or None,
                               unschedulable=cordoned or None),
        status=client.V1NodeStatus(allocatable=allocatable, conditions=[
            client.V1NodeCondition(type="Ready", status="True" if ready else "False")]))
    return client.ApiClient().sanitize_for_serialization(model)


def node_list(*items):
    return found({"apiVersion": "v1", "kind": "NodeList", "items": list(items)})


POOL = {"kubeseg.io/node-pool": "gpu"}
ONE_GPU = nodes.gpu_needs(PipelineParameters())  # the default run: one-GPU training


def test_the_default_run_needs_one_gpu_for_training():
    assert [str(n) for n in ONE_GPU] == ["training: 1 pod(s) of 1 nvidia.com/gpu"]
    params = PipelineParameters(num_nodes=2, gpus_per_node=4, serving_gpus=1)
    assert [(n.what, n.gpus, n.pods) for n in nodes.gpu_needs(params)] == \
        [("distributed training", 4, 2), ("GPU serving", 1, 1)]
    assert nodes.gpu_needs(PipelineParameters(num_nodes=2, gpus_per_node=0)) == []


def test_a_labelled_tainted_gpu_node_is_ok():
    check = nodes.check_gpu_nodes(node_list(node("gpu-1", POOL, [GPU_TAINT], gpus=2),
                                            node("cpu-1")), ONE_GPU)
    assert check.status == OK
    assert check.found.startswith("1 of 1 node(s) labelled kubeseg.io/node-pool=gpu usable, "
                                  "2 nvidia.com/gpu allocatable")


def test_no_labelled_node_fails_and_names_unlabelled_gpu_nodes():
    check = nodes.check_gpu_nodes(node_list(node("a100-1", gpus=8), node("cpu-1")), ONE_GPU)
    assert check.status == FAIL and "a100-1 (8)" in check.found
    assert "kubectl label node NODE kubeseg.io/node-pool=gpu" in check.fix
    assert "kubectl taint node NODE nvidia.com/gpu=present:NoSchedule" in check.fix
    assert nodes.check_gpu_nodes(node_list(node("cpu-1")), []).status == WARN


def test_a_taint_kubeseg_does_not_tolerate_keeps_its_pods_off():
    dedicated = {"key": "dedicated", "value": "ml", "effect": "NoSchedule"}
    check = nodes.check_gpu_nodes(node_list(node("gpu-1", POOL, [GPU_TAINT, dedicated], 1)),
                                  ONE_GPU)
    assert check.status == FAIL and "taint dedicated=ml:NoSchedule not tolerated" in check.found
    soft = {"key": "dedicated", "value": "ml", "effect": "PreferNoSchedule"}
    assert nodes.check_gpu_nodes(node_list(node("gpu-1", POOL, [GPU_TAINT, soft], 1)),
                                 ONE_GPU).status == OK


def test_no_allocatable_gpus_points_to_the_device_plugin():
    check = nodes.check_gpu_nodes(node_list(node("gpu-1", POOL, [GPU_TAINT])), ONE_GPU)
    assert check.status == FAIL and "no allocatable nvidia.com/gpu" in check.found
    assert "device plugin" in check.fix


def test_nodes_not_ready_or_cordoned_do_not_count():
    check = nodes.check_gpu_nodes(node_list(node("gpu-1", POOL, [GPU_TAINT], 1, ready=False),
                                            node("gpu-2", POOL, [GPU_TAINT], 1, cordoned=True)),
                                  ONE_GPU)
    assert check.status == FAIL
    assert "gpu-1: not Ready" in check.found and "gpu-2: cordoned" in check.found


def test_too_few_gpus_for_a_distributed_job():
    needs = nodes.gpu_needs(PipelineParameters(num_nodes=2, gpus_per_node=4))
    one_node = node_list(node("gpu-1", POOL, [GPU_TAINT], 4), node("gpu-2", POOL, [GPU_TAINT], 2))
    check = nodes.check_gpu_nodes(one_node, needs)
    assert check.status == FAIL and "too few for distributed training" in check.found
    eight = node_list(node("gpu-1", POOL, [GPU_TAINT], 8))
    assert nodes.check_gpu_nodes(eight, needs).status == OK  # two pods fit on one node


def test_an_untainted_pool_node_is_a_warning():
    check = nodes.check_gpu_nodes(node_list(node("gpu-1", POOL, (), 1)), ONE_GPU)
    assert check.status == WARN and "not tainted nvidia.com/gpu:NoSchedule" in check.found
    assert check.fix == "kubectl taint node NODE nvidia.com/gpu=present:NoSchedule"


def test_nodes_that_cannot_be_listed():
    check = nodes.check_gpu_nodes(failed(403, "Forbidden"), ONE_GPU)
    assert check.status == WARN and "kubectl get nodes -l kubeseg.io/node-pool=gpu" in check.fix


@pytest.mark.parametrize("toleration,taint,expected", [
    ({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}, GPU_TAINT, True),
    ({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
     {**GPU_TAINT, "effect": "NoExecute"}, False),
    ({"key": "nvidia.com/gpu", "operator": "Exists"}, {**GPU_TAINT, "effect": "NoExecute"}, True),
    ({"operator": "Exists"}, {"key": "anything", "effect": "NoSchedule"}, True),
    ({"key": "nvidia.com/gpu", "value": "present"}, GPU_TAINT, True),  # no operator: Equal
    ({"key": "nvidia.com/gpu", "operator": "Equal", "value": "yes"}, GPU_TAINT, False),
    ({"key": "other", "operator": "Exists"}, GPU_TAINT, False),
])
def test_toleration_matching_follows_kubernetes(toleration, taint, expected):
    assert nodes.tolerates(toleration, taint) is expected
