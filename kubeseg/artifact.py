"""The model artifact: one self-describing folder (or S3 prefix) holding a trained model.

Layout::

    model.pt          state dict of the model (tensors only; torch.load(weights_only=True) reads it)
    hyperparams.json  the resolved hyperparameters (every SPEC section 2 name, values as JSON)
    kubeseg.json      format_version, algorithm, backbone, num_classes, aux_head, crop_size,
                      class_names, label_map, class_weights (the loss weights used, also
                      when computed with class_weights=auto; null: unweighted), mean, std
                      (input normalisation), metrics, epoch, torch/torchvision versions,
                      sha256 of model.pt
    _COMPLETE         written last; an artifact without it is incomplete and is not loaded

Writes are atomic: a local artifact is written to a hidden temporary folder beside the target
and renamed into place; on S3 the old marker is removed first, the files are uploaded (each
object appears whole), and the marker comes last.

Loading with kubeseg::

    model, info = kubeseg.load_model("s3://bucket/run/model")   # eval mode
    logits = model(images)["out"]          # images normalised with info.mean / info.std

Loading with plain PyTorch (the architecture is rebuilt from kubeseg.json)::

    import json, torch
    from kubeseg.models import build_model
    meta = json.load(open("model/kubeseg.json"))
    model = build_model(algorithm=meta["algorithm"], backbone=meta["backbone"],
                        num_classes=meta["num_classes"], aux_loss=meta["aux_head"])
    model.load_state_dict(torch.load("model/model.pt", map_location="cpu", weights_only=True))
    model.eval()

``model.pt`` is a plain ``dict[str, Tensor]``: no pickled classes, so it is safe to load and
readable by any PyTorch >= 2.0.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from kubeseg import storage
from kubeseg.config import Hyperparameters
from kubeseg.errors import DataError
from kubeseg.metrics import json_safe

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.pt"
HYPERPARAMS_FILE = "hyperparams.json"
META_FILE = "kubeseg.json"
MARKER_FILE = "_COMPLETE"


@dataclass(frozen=True)
class ModelInfo:
    """What a loaded artifact says about its model."""

    hyperparameters: Hyperparameters
    class_names: List[str]
    num_classes: int
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    label_map: Optional[dict] = None
    metrics: Dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    algorithm: str = ""
    backbone: str = ""
    crop_size: int = 0
    epoch: Optional[int] = None
    uri: str = ""
    class_weights: Optional[List[float]] = None  # the loss weights the model was trained with





def _state_dict_bytes(model: torch.nn.Module) -> bytes:
    module = getattr(model, "module", model)  # unwrap DistributedDataParallel
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def save_artifact(uri: str, *, model: torch.nn.Module, hyperparameters: Hyperparameters,
                  class_names: Optional[Sequence[str]], label_map: Optional[dict] = None,
                  metrics: Optional[Mapping[str, Any]] = None, epoch: Optional[int] = None,
                  mean: Optional[Sequence[float]] = None,
                  std: Optional[Sequence[float]] = None,
                  class_weights: Optional[Sequence[float]] = None) -> str:
    """Write the artifact folder at ``uri`` (local path or s3:// prefix), atomically.

    ``class_names`` defaults to ``class_0 ..``; ``mean``/``std`` default to ImageNet's (what
    the data transforms use); ``class_weights``: the loss weights used (None: unweighted).
    Returns ``uri``.
    """
    if mean is None or std is None:
        from kubeseg.data.transforms import IMAGENET_MEAN, IMAGENET_STD

        mean = IMAGENET_MEAN if mean is None else mean
        std = IMAGENET_STD if std is None else std
    hp = hyperparameters
    names = list(class_names) if class_names else [f"class_{i}" for i in range(hp.num_classes)]
    if len(names) != hp.num_classes:
        raise DataError(f"{len(names)} class names given for num_classes={hp.num_classes}: "
                        f"{names[:10]}")
    if class_weights is not None and len(class_weights) != hp.num_classes:
        raise DataError(f"{len(class_weights)} class weights given for num_classes="
                        f"{hp.num_classes}")
    weights = _state_dict_bytes(model)
    module = getattr(model, "module", model)
    import torchvision

    meta = {
        "format_version": FORMAT_VERSION,
        "algorithm": hp.algorithm,
        "backbone": hp.backbone,
        "num_classes": hp.num_classes,
        "aux_head": getattr(module, "aux_head", None) is not None,
        "crop_size": hp.effective_crop_size,
        "class_names": names,
        "label_map": label_map,
        "class_weights": None if class_weights is None else [float(w) for w in class_weights],
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "metrics": json_safe(dict(metrics or {})),
        "epoch": epoch,
        "weights": WEIGHTS_FILE,
        "weights_sha256": hashlib.sha256(weights).hexdigest(),
        "torch_version": torch.__version__,
        "torchvision_version": torchvision.__version__,
    }
    files = {
        WEIGHTS_FILE: weights,
        HYPERPARAMS_FILE: hp.to_json().encode(),
        META_FILE: json.dumps(meta, indent=2, sort_keys=True).encode(),
    }
    marker = json.dumps({"format_version": FORMAT_VERSION,
                         "weights_sha256": meta["weights_sha256"]}).encode()
    if storage.is_s3(uri):
        storage.delete(storage.join(uri, MARKER_FILE))
        for name, data in files.items():
            storage.write_bytes(storage.join(uri, name), data)
        storage.write_bytes(storage.join(uri, MARKER_FILE), marker)
    else:
        _write_local_folder(Path(uri), {**files, MARKER_FILE: marker})
    logger.info("model artifact written to %s (epoch %s)", uri, epoch)
    return uri


def _write_local_folder(target: Path, files: Mapping[str, bytes]) -> None:
    target = target.absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it owner-only; servers may run as others
        for name, data in files.items():  # the marker is last in ``files``
            with open(tmp / name, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(target, old)
        os.rename(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _artifact_root(uri: str) -> str:
    uri = str(uri).rstrip("/")
    for name in (WEIGHTS_FILE, META_FILE, HYPERPARAMS_FILE, MARKER_FILE):
        if uri.endswith("/" + name) or uri == name:
            return uri[: -len(name)].rstrip("/") or "."
    return uri


def read_info(uri: str) -> ModelInfo:
    """Read and check an artifact's metadata without loading the weights."""
    root = _artifact_root(uri)
    if not storage.exists(storage.join(root, MARKER_FILE)):
        if storage.exists(storage.join(root, META_FILE)):
            raise DataError(f"model artifact {root} is incomplete (no {MARKER_FILE} marker): "
                            "it was being written or its writer was interrupted; train again "
                            "or point to a complete artifact")
        raise DataError(f"{root} is not a kubeseg model artifact: expected {META_FILE}, "
                        f"{WEIGHTS_FILE} and {MARKER_FILE} there")
    try:
        meta = json.loads(storage.read_text(storage.join(root, META_FILE)))
        hp_values = json.loads(storage.read_text(storage.join(root, HYPERPARAMS_FILE)))
    except json.JSONDecodeError as exc:
        raise DataError(f"model artifact {root}: corrupt JSON ({exc})") from None
    version = int(meta.get("format_version", 0))
    if version > FORMAT_VERSION or version < 1:
        raise DataError(f"model artifact {root} has format_version {version}; this kubeseg "
                        f"reads format_version 1..{FORMAT_VERSION}: upgrade kubeseg")
    hp = Hyperparameters.from_dict(hp_values)
    return ModelInfo(
        hyperparameters=hp, class_names=list(meta["class_names"]),
        num_classes=int(meta["num_classes"]), mean=tuple(meta["mean"]),
        std=tuple(meta["std"]), label_map=meta.get("label_map"),
        metrics=meta.get("metrics") or {}, format_version=version,
        algorithm=meta["algorithm"], backbone=meta["backbone"],
        crop_size=int(meta["crop_size"]), epoch=meta.get("epoch"), uri=root,
        class_weights=meta.get("class_weights"))


def read_state_dict(uri: str) -> Dict[str, torch.Tensor]:
    """The artifact's weights (checked against the sha256 recorded in kubeseg.json)."""
    root = _artifact_root(uri)
    meta = json.loads(storage.read_text(storage.join(root, META_FILE)))
    data = storage.read_bytes(storage.join(root, meta.get("weights", WEIGHTS_FILE)))
    expected = meta.get("weights_sha256")
    if expected and hashlib.sha256(data).hexdigest() != expected:
        raise DataError(f"model artifact {root}: {WEIGHTS_FILE} does not match the sha256 in "
                        f"{META_FILE} (corrupt or overwritten); train again")
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def load_model(uri: str, device: str = "cpu") -> Tuple[torch.nn.Module, ModelInfo]:
    """``(model in eval mode on device, ModelInfo)`` from an artifact folder or S3 prefix."""
    from kubeseg.models import build_model

    info = read_info(uri)
    meta = json.loads(storage.read_text(storage.join(info.uri, META_FILE)))
    model = build_model(algorithm=info.algorithm, backbone=info.backbone,
                        num_classes=info.num_classes, aux_loss=bool(meta.get("aux_head", True)))
    state = read_state_dict(info.uri)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise DataError(f"model artifact {info.uri}: weights do not fit {info.algorithm} / "
                        f"{info.backbone} / {info.num_classes} classes: "
                        f"{str(exc).splitlines()[0]}") from None
    model.to(device).eval()
    return model, info


__all__ = ["FORMAT_VERSION", "ModelInfo", "save_artifact", "load_model", "read_info",
           "read_state_dict"]
