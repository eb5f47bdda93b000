"""Exceptions that carry a message naming what the user must fix."""
import re

# How PyTorch hands an exception raised in a DataLoader worker process to the main process:
# the same class, with the worker's formatted traceback as its message.
_WORKER_TRACEBACK = re.compile(r"^Caught \w+ in DataLoader worker process \d+\.\n"
                               r"Original Traceback \(most recent call last\):\n")


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


def user_message(exc: BaseException) -> str:
    """The message of ``exc`` as a person should read it: for an error raised in a DataLoader
    worker process, the worker's own message without PyTorch's traceback around it."""
    text = str(exc)
    if not _WORKER_TRACEBACK.match(text):
        return text
    prefix = f"{type(exc).__module__}.{type(exc).__qualname__}: "
    start = text.rfind("\n" + prefix)
    return text[start + 1 + len(prefix):].strip() if start >= 0 else text
