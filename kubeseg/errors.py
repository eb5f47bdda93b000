"""Exceptions that carry a message naming what the user must fix."""


class KubesegError(Exception):
    """Base class: the message says what is wrong and what to change."""


class ConfigError(KubesegError, ValueError):
    """Invalid hyperparameters or options; ``problems`` lists every one found."""

    def __init__(self, problems, what: str = "hyperparameter"):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} invalid {what}(s):\n{lines}")


class StorageError(KubesegError, OSError):
    """An object store or file operation failed; the message names endpoint, bucket and key."""


class DataError(KubesegError, ValueError):
    """The dataset, a manifest or a label map is unusable; the message names the key or line."""


class ClusterError(KubesegError):
    """A Kubernetes or Kubeflow API operation failed; the message names the object and why."""


class DeploymentError(ClusterError):
    """The InferenceService did not become Ready (the previous revision keeps serving)."""


class TrainingJobError(ClusterError):
    """A distributed training job (PyTorchJob) could not be created or did not succeed."""
