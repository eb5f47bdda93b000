"""The versions of the Kubeflow parts kubeseg supports, as plain constants.

Each was checked against the release's source; ``kubeseg preflight`` compares what a cluster
runs with them.
"""

# Kubeflow Pipelines backend: the lowest release whose API server accepts kubeseg's runs.
# Below 2.5.0 the job-uuid placeholder passed as a step input is not resolved.
KFP_BACKEND_LOWEST = "2.5.0"

# Kubeflow Trainer v2 releases (major.minor) whose TrainJob takes kubeseg's runtimePatches.
TRAINER_VERSIONS = ("2.2", "2.3")

# Training Operator v1 (PyTorchJob), kept on its release-1.9 branch.
TRAINING_OPERATOR_VERSION = "1.9"

# KServe releases (major.minor) whose InferenceService kubeseg writes, Serverless (Knative) and
# Standard (RawDeployment) modes.
KSERVE_VERSIONS = ("0.15", "0.16", "0.17", "0.18", "0.19", "0.20")

# Katib releases (major.minor) whose Experiment kubeseg writes.
KATIB_VERSIONS = ("0.17", "0.18")
