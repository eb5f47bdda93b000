"""The GPU node pool: nodes carrying kubeseg's label, whose taints kubeseg's pods tolerate, with
allocatable GPUs for what the run asks (one-GPU training, the pods of a distributed job, GPU
serving). The label, toleration and resource are :mod:`kubeseg.deploy.placement`'s."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Mapping, Sequence

from kubeseg.config import PipelineParameters
from kubeseg.deploy import placement
from kubeseg.deploy.training_job import SINGLE, training_plan
from kubeseg.preflight.base import FAIL, OK, WARN, Check, Lookup, unreadable

GPU = placement.GPU_RESOURCE
SELECTOR = placement.DEFAULT_GPU_NODE_SELECTOR
TOLERATIONS = placement.DEFAULT_GPU_TOLERATIONS
# The scheduler keeps a pod off a node with a taint of these effects that the pod does not
# tolerate; PreferNoSchedule only lowers the node's score.
BLOCKING_EFFECTS = ("NoSchedule", "NoExecute")


def tolerates(toleration: Mapping[str, Any], taint: Mapping[str, Any]) -> bool:
    """Kubernetes' rule (k8s.io/api v0.36.3, core/v1/toleration.go, ToleratesTaint): an empty
    effect or key matches any; Exists matches any value, Equal (or no operator) the same value.
    Lt/Gt, which kubeseg never writes, are left unmatched."""
    if toleration.get("effect") and toleration["effect"] != taint.get("effect"):
        return False
    if toleration.get("key") and toleration["key"] != taint.get("key"):
        return False
    operator = toleration.get("operator") or "Equal"
    if operator == "Exists":
        return True
    return operator == "Equal" and (toleration.get("value") or "") == (taint.get("value") or "")


def _name(node: Mapping[str, Any]) -> str:
    return (node.get("metadata") or {}).get("name") or "?"


def in_pool(node: Mapping[str, Any]) -> bool:
    labels = (node.get("metadata") or {}).get("labels") or {}
    return all(labels.get(key) == value for key, value in SELECTOR.items())


def gpu_count(node: Mapping[str, Any]) -> int:
    """The node's allocatable GPUs (0 when it advertises none)."""
    value = ((node.get("status") or {}).get("allocatable") or {}).get(GPU, "0")
    try:
        return int(str(value))
    except ValueError:
        return 0


def blocking_taints(node: Mapping[str, Any]) -> List[str]:
    """The node's taints that keep kubeseg's GPU pods off it, as ``key=value:effect``."""
    blocking = []
    for taint in (node.get("spec") or {}).get("taints") or []:
        if taint.get("effect") in BLOCKING_EFFECTS and \
                not any(tolerates(t, taint) for t in TOLERATIONS):
            value = f"={taint['value']}" if taint.get("value") else ""
            blocking.append(f"{taint.get('key')}{value}:{taint.get('effect')}")
    return blocking


def node_problems(node: Mapping[str, Any]) -> List[str]:
    """Why kubeseg's GPU pods cannot run on a node of the pool (empty: they can)."""
    problems = []
    taints = blocking_taints(node)
    if taints:
        problems.append(f"taint {', '.join(taints)} not tolerated")
    if gpu_count(node) < 1:
        problems.append(f"no allocatable {GPU}")
    if (node.get("spec") or {}).get("unschedulable"):
        problems.append("cordoned")
    conditions = (node.get("status") or {}).get("conditions") or []
    if not any(c.get("type") == "Ready" and str(c.get("status")) == "True" for c in conditions):
        problems.append("not Ready")
    return problems


def has_gpu_taint(node: Mapping[str, Any]) -> bool:
    """Whether the node carries the taint kubeseg tolerates, which keeps other pods off it."""
    return any(t.get("effect") in BLOCKING_EFFECTS and any(tolerates(tol, t) for tol in TOLERATIONS)
               for t in (node.get("spec") or {}).get("taints") or [])


@dataclass(frozen=True)
class GpuNeed:
    """``pods`` pods of ``gpus`` GPUs each, for ``what``."""

    what: str
    gpus: int
    pods: int

    def __str__(self) -> str:
        return f"{self.what}: {self.pods} pod(s) of {self.gpus} {GPU}"


def gpu_needs(params: PipelineParameters) -> List[GpuNeed]:
    """What the run's parameters ask of the GPU pool: one-GPU training in the train step's pod,
    or a distributed job's pods, and GPU serving."""
    needs = []
    if training_plan(params.num_nodes, params.gpus_per_node) == SINGLE:
        needs.append(GpuNeed("training", 1, 1))
    elif params.gpus_per_node:
        needs.append(GpuNeed("distributed training", params.gpus_per_node, params.num_nodes))
    if params.serving_gpus:
        needs.append(GpuNeed("GPU serving", params.serving_gpus, 1))
    return needs


def pods_that_fit(nodes: Sequence[Mapping[str, Any]], gpus: int) -> int:
    """How many pods of ``gpus`` GPUs the nodes' allocatable GPUs hold."""
    return sum(gpu_count(node) // gpus for node in nodes)


def taint_command() -> str:
    """The taint kubeseg's pods tolerate, as README's cluster set-up puts it on a node."""
    taint = TOLERATIONS[0]
    return f"kubectl taint node NODE {taint['key']}=present:{taint['effect']}"


def pool_commands() -> str:
    (key, value), = SELECTOR.items()
    return f"kubectl label node NODE {key}={value}; {taint_command()}"


def _pool_fix(problems: Sequence[str], short: Sequence[GpuNeed]) -> str:
    fixes = []
    if any("not tolerated" in p for p in problems):
        taint = TOLERATIONS[0]
        fixes.append(f"remove taints other than {taint['key']}:{taint['effect']} from the pool's "
                     "nodes (kubectl taint node NODE KEY:EFFECT-)")
    if any(f"no allocatable {GPU}" in p for p in problems):
        fixes.append(f"install the NVIDIA device plugin (or GPU Operator) so the nodes advertise "
                     f"{GPU}")
    if any("cordoned" in p or "not Ready" in p for p in problems):
        fixes.append("uncordon the nodes or bring them back to Ready")
    if short or not fixes:
        fixes.append(f"add GPU nodes to the pool ({pool_commands()})")
    return "; ".join(fixes)


def check_gpu_nodes(nodes: Lookup, needs: Sequence[GpuNeed]) -> Check:
    """Nodes labelled for the pool, with kubeseg's toleration enough and allocatable GPUs for
    ``needs`` (a FAIL when the run needs GPUs, a warn otherwise)."""
    name, bad = "GPU nodes", FAIL if needs else WARN
    label = ",".join(f"{k}={v}" for k, v in SELECTOR.items())
    if nodes.obj is None:
        return Check(name, WARN, unreadable(nodes, "the nodes"),
                     f"ask a cluster admin: kubectl get nodes -l {label}")
    items = nodes.obj.get("items") or []
    pool = [node for node in items if in_pool(node)]
    if not pool:
        elsewhere = [f"{_name(n)} ({gpu_count(n)})" for n in items if gpu_count(n)]
        return Check(name, bad, f"no node labelled {label}" + (
            f"; nodes with {GPU}: {', '.join(elsewhere[:5])}" if elsewhere else ""),
            pool_commands())
    problems = [f"{_name(n)}: {'; '.join(node_problems(n))}" for n in pool if node_problems(n)]
    usable = [n for n in pool if not node_problems(n)]
    short = [need for need in needs if pods_that_fit(usable, need.gpus) < need.pods]
    text = (f"{len(usable)} of {len(pool)} node(s) labelled {label} usable, "
            f"{sum(gpu_count(n) for n in usable)} {GPU} allocatable")
    details = [f"too few for {need}" for need in short] + problems[:5]
    if short or not usable:
        return Check(name, bad, "; ".join([text] + details), _pool_fix(problems, short))
    untainted = [_name(n) for n in usable if not has_gpu_taint(n)]
    if untainted:
        details.append(f"not tainted {TOLERATIONS[0]['key']}:{TOLERATIONS[0]['effect']}, so "
                       f"other pods may take their GPUs: {', '.join(untainted[:5])}")
    if details:
        fixes = ([_pool_fix(problems, [])] if problems else []) + \
            ([taint_command()] if untainted else [])
        return Check(name, WARN, "; ".join([text] + details), "; ".join(fixes))
    return Check(name, OK, text + (f" ({'; '.join(map(str, needs))})" if needs else ""))


__all__ = ["GpuNeed", "check_gpu_nodes", "gpu_needs", "tolerates", "blocking_taints",
           "node_problems", "gpu_count", "in_pool", "pods_that_fit"]
