"""``kubeseg compile``: the compiled pipelines (training and batch prediction) and the kustomize
images component, with the image registry and tag given (:mod:`kubeseg.images`)."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

IMAGES_COMPONENT = Path("components") / "images" / "kustomization.yaml"  # below manifests/


def compiled_pipeline_path() -> Path:
    """Where the checked-in compiled pipeline lives (inside the pipelines package)."""
    return Path(__file__).resolve().parent / "segmentation.yaml"


def default_manifests_dir() -> Optional[Path]:
    """The manifests/ folder of the checkout the pipelines package lives in, if any."""
    folder = compiled_pipeline_path().parents[1] / "manifests"
    return folder if (folder / IMAGES_COMPONENT).parent.is_dir() else None


def compile_all(output: Optional[str], manifests: Optional[str],
                kfp_backend: Optional[str] = None) -> List[str]:
    """Write both compiled pipelines (the batch one beside ``output``), for the Kubeflow
    Pipelines backend release ``kfp_backend`` (default: the lowest supported), and the
    manifests' images component; returns what was written, one line each. Call
    :func:`kubeseg_platform.pipelines.settings.use_images` (and ``use_settings``) first."""
    from kubeseg import images, storage, versions
    from kubeseg.errors import KubesegError
    from kubeseg_platform.pipelines.batch_predict import compile_pipeline as compile_batch_predict
    from kubeseg_platform.pipelines.kfp_backend import check_target
    from kubeseg_platform.pipelines.segmentation import IMAGES, compile_pipeline

    backend = check_target(kfp_backend or versions.KFP_BACKEND_LOWEST)
    path = Path(output) if output else compiled_pipeline_path()
    compile_pipeline(str(path), backend)
    lines = [f"compiled pipeline written to {path} (images {IMAGES.registry}/*:{IMAGES.tag}; "
             f"Kubeflow Pipelines backend {backend} or newer)"]
    batch_path = path.with_name("batch_predict.yaml")  # beside the training pipeline
    compile_batch_predict(str(batch_path), backend)
    lines.append(f"compiled batch prediction pipeline written to {batch_path}")
    folder = Path(manifests) if manifests else default_manifests_dir()
    if folder is not None:
        target = folder / IMAGES_COMPONENT
        if not target.parent.is_dir():
            raise KubesegError(f"--manifests {folder}: no {IMAGES_COMPONENT.parent} folder "
                               "(give the manifests/ folder of a kubeseg checkout)")
        storage.write_text(str(target), images.kustomize_component(IMAGES))
        lines.append(f"kustomize images written to {target}")
    return lines


__all__ = ["compile_all", "compiled_pipeline_path", "default_manifests_dir", "IMAGES_COMPONENT"]
