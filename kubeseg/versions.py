"""The versions of the cluster software kubeseg supports, as plain constants, each with the
release source it was checked against (project, tag, file), and the rule that compares two
version strings.

Nothing here talks to a cluster: ``kubeseg compile``, ``submit``, ``deploy`` and ``tune`` use
these to refuse early, naming the version needed, what a release would refuse later or ignore.
"""
from __future__ import annotations

import re
from typing import Tuple

from kubeseg.errors import ConfigError

# -- Kubeflow Pipelines backend (API server, driver, Argo workflow compiler) --------------------
# The lowest backend release that runs kubeseg's compiled pipelines as they mean to run:
# - the driver resolves the run id placeholder {{$.pipeline_job_uuid}} given as a task input
#   only from 2.5.0 (kubeflow/pipelines 2.5.0 backend/src/v2/driver/driver.go, kubeflow/pipelines
#   #11599); before, every run received the literal text, so all runs would share one output
#   folder and one training-job name;
# - a retry policy of a task inside a condition branch (train, evaluate) is honoured only from
#   2.14.0 (kubeflow/pipelines 2.14.0 backend/src/v2/compiler/argocompiler/container.go reads
#   task.GetRetryPolicy(); #11908); 2.5.0 looked retry policies up in the root DAG only, so the
#   train step's retries (which resume from the last checkpoint) were silently dropped.
# From 2.14.0 the workflow compiler parses each task's kfp-kubernetes executor config strictly
# (protojson.Unmarshal in the same file): a field newer than the backend refuses the run.
# pipelines/kfp_backend.py declares which field needs which release.
KFP_BACKEND_LOWEST = "2.14.0"
# The newest backend release whose source the field table was checked against.
KFP_BACKEND_NEWEST_CHECKED = "2.17.0"

# -- Kubeflow Trainer v2 and Training Operator v1 -----------------------------------------------
# TrainJob.spec.runtimePatches exists from Trainer v2.2.0 (kubeflow/trainer v2.2.0 and v2.3.0
# pkg/apis/trainer/v1alpha1/trainjob_types.go; v2.1.0 had podTemplateOverrides instead).
TRAINER_VERSIONS = ("2.2", "2.3")
# PyTorchJob (kubeflow.org/v1), kept on kubeflow/trainer's release-1.9 branch.
TRAINING_OPERATOR_VERSION = "1.9"

# -- KServe -------------------------------------------------------------------------------------
KSERVE_VERSIONS = ("0.15", "0.16", "0.17", "0.18", "0.19", "0.20")
# The mode an InferenceService without the serving.kserve.io/deploymentMode annotation gets from
# the released ConfigMap (kserve/kserve v0.15.0..v0.20.0 config/configmap/inferenceservice.yaml,
# deploy.defaultDeploymentMode).
KSERVE_DEFAULT_DEPLOYMENT_MODE = "Serverless"

# -- Knative Serving (KServe's Serverless mode) -------------------------------------------------
# A Knative Service may carry nodeSelector / tolerations only when these flags are "enabled" in
# the knative-serving/config-features ConfigMap; both are "disabled" by default
# (knative/serving config/core/configmaps/features.yaml at knative-v1.15.2, v1.18.0, v1.21.1 and
# v1.22.0), and a disabled field is a disallowed one (pkg/apis/serving/fieldmask.go, PodSpecMask,
# at the same tags).
KNATIVE_FEATURES_NAMESPACE = "knative-serving"
KNATIVE_FEATURES_CONFIGMAP = "config-features"
KNATIVE_NODE_SELECTOR_FLAG = "kubernetes.podspec-nodeselector"
KNATIVE_TOLERATIONS_FLAG = "kubernetes.podspec-tolerations"

# -- Katib --------------------------------------------------------------------------------------
KATIB_VERSIONS = ("0.17", "0.18")
KATIB_DEFAULT_VERSION = "0.18"
# feasibleSpace.distribution (logUniform) exists from Katib 0.18 (kubeflow/katib v0.18.0
# pkg/apis/controller/experiments/v1beta1/experiment_types.go); 0.17's FeasibleSpace has no such
# field, so its controller drops it and searches the range uniformly.
KATIB_LOG_UNIFORM_SINCE = "0.18"

# -- Argo CD (GitOps retraining) ----------------------------------------------------------------
# argoproj.io/v1alpha1 Application (argoproj/argo-cd v3.5.1 manifests/crds/application-crd.yaml)
# and the retrain Job as a Sync hook deleted BeforeHookCreation (v3.5.1
# gitops-engine/pkg/sync/common/types.go).
ARGO_CD_VERSION = "3.5"

_VERSION = re.compile(r"^v?(\d+(?:\.\d+)*)(?:[-+].*)?$")


def parse_version(text: str, what: str = "version") -> Tuple[int, ...]:
    """``"2.14.3"``, ``"v0.18"``, ``"2.15.0-rc.1"`` -> ``(2, 14, 3)``, ``(0, 18)``,
    ``(2, 15, 0)``; a ConfigError naming ``what`` for anything else."""
    match = _VERSION.match(str(text).strip())
    if not match:
        raise ConfigError([f"{what}={text!r}: not a version (e.g. 2.14.0)"], what="option")
    return tuple(int(part) for part in match.group(1).split("."))


def at_least(version: str, minimum: str) -> bool:
    """Whether ``version`` is ``minimum`` or newer; missing trailing parts count as 0."""
    a, b = parse_version(version), parse_version(minimum)
    width = max(len(a), len(b))
    return a + (0,) * (width - len(a)) >= b + (0,) * (width - len(b))


__all__ = ["KFP_BACKEND_LOWEST", "KFP_BACKEND_NEWEST_CHECKED", "TRAINER_VERSIONS",
           "TRAINING_OPERATOR_VERSION", "KSERVE_VERSIONS", "KSERVE_DEFAULT_DEPLOYMENT_MODE",
           "KNATIVE_FEATURES_NAMESPACE", "KNATIVE_FEATURES_CONFIGMAP",
           "KNATIVE_NODE_SELECTOR_FLAG", "KNATIVE_TOLERATIONS_FLAG", "KATIB_VERSIONS",
           "KATIB_DEFAULT_VERSION", "KATIB_LOG_UNIFORM_SINCE", "ARGO_CD_VERSION",
           "parse_version", "at_least"]
