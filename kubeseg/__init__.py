"""kubeseg: Kubeflow-native semantic segmentation (core library)."""
__version__ = "0.1.0"


def load_model(uri, device="cpu"):
    """Load a kubeseg model artifact: returns ``(model in eval mode, ModelInfo)``."""
    from kubeseg.artifact import load_model as _load

    return _load(uri, device=device)
