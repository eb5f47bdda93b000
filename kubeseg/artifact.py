"""The model artifact: one self-describing folder (or S3 prefix) holding a trained model.

Layout::

    _COMPLETE             the pointer: {"version": "v-...", "format_version", "weights_sha256"};
                          written last; an artifact without it is incomplete and is not loaded
    kubeseg.json          a copy of the current version's kubeseg.json (for tools that read the
                          metrics), with "version" added
    v-<time>-<id>/        one complete version:
        model.pt          state dict of the model (tensors only; torch.load(weights_only=True))
        hyperparams.json  the resolved hyperparameters (every SPEC section 2 name, values as JSON)
        kubeseg.json      format_version, algorithm, backbone, output_stride, num_classes,
                          aux_head, crop_size,
                          class_names, label_map, class_weights (the loss weights used, also
                          when computed with class_weights=auto; null: unweighted), mean, std
                          (input normalisation), metrics, epoch, torch/torchvision versions,
                          sha256 of model.pt, training_baseline (what drift monitoring
                          compares served images with: the training split's pixels per class,
                          and the model's confidence histogram and predicted pixels per class
                          on the validation split; see kubeseg.monitoring.drift; absent in
                          artifacts written before it was recorded)

A model never goes missing. A writer puts every file of a new version below a fresh
``v-<time>-<id>/`` (a local version folder appears by one rename), then switches the pointer
``_COMPLETE`` in one atomic step (a rename locally, a single PUT on S3, where objects appear
whole). A reader resolves the pointer once and reads one version, so it finds the previous
complete model or the new one, whenever the writer is killed. Locally the version's files, its
folder's rename and the pointer reach the disk in that order (fsync of each file and folder),
so a power loss leaves a loadable model too. Each writer first removes what an
interrupted writer left (versions nobody points to, temporary files); the version it replaces is
kept until the next write, for readers still reading it. Artifacts written in the earlier flat
layout (files next to a ``_COMPLETE`` without "version") still load.

Loading with kubeseg::

    model, info = kubeseg.load_model("s3://bucket/run/model")   # eval mode
    logits = model(images)["out"]          # images normalised with info.mean / info.std

Loading with plain PyTorch (the architecture is rebuilt from kubeseg.json)::

    import json, torch
    from kubeseg.models import build_model
    version = json.load(open("model/_COMPLETE"))["version"]
    meta = json.load(open(f"model/{version}/kubeseg.json"))
    model = build_model(algorithm=meta["algorithm"], backbone=meta["backbone"],
                        num_classes=meta["num_classes"], aux_loss=meta["aux_head"],
                        output_stride=meta.get("output_stride", 8))
    model.load_state_dict(torch.load(f"model/{version}/model.pt", map_location="cpu",
                                     weights_only=True))
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
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from kubeseg import storage
from kubeseg.config import Hyperparameters
from kubeseg.errors import DataError
from kubeseg.strict_json import json_safe

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.pt"
HYPERPARAMS_FILE = "hyperparams.json"
META_FILE = "kubeseg.json"
MARKER_FILE = "_COMPLETE"
VERSION_PREFIX = "v-"
_FILES = (WEIGHTS_FILE, HYPERPARAMS_FILE, META_FILE)


@dataclass(frozen=True)
class ModelInfo:
    """What a loaded artifact says about its model."""

    hyperparameters: Hyperparameters
    class_names: List[str]
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    label_map: Optional[dict] = None
    metrics: Dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    epoch: Optional[int] = None
    uri: str = ""
    files_uri: str = ""  # the folder/prefix of the version read (``uri`` for the flat layout)
    class_weights: Optional[List[float]] = None  # the loss weights the model was trained with
    aux_head: bool = True  # whether the weights include the auxiliary head
    weights_sha256: Optional[str] = None  # of model.pt, as recorded when it was written
    # kubeseg.monitoring.drift.TrainingBaseline.to_dict(); None for artifacts without one
    training_baseline: Optional[Dict[str, Any]] = None

    @property
    def num_classes(self) -> int:
        return self.hyperparameters.num_classes

    @property
    def algorithm(self) -> str:
        return self.hyperparameters.algorithm

    @property
    def backbone(self) -> str:
        return self.hyperparameters.backbone

    @property
    def crop_size(self) -> int:
        """The crop the model was trained on (rounded up to the output stride)."""
        return self.hyperparameters.effective_crop_size


def _state_dict_bytes(model: torch.nn.Module) -> bytes:
    module = getattr(model, "module", model)  # unwrap DistributedDataParallel
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


@dataclass(frozen=True)
class ClassInfo:
    """What an artifact records about the classes: their ``names`` (None: ``class_0 ..``), the
    dataset's ``label_map``, and the loss ``weights`` training used (None: unweighted)."""

    names: Optional[Sequence[str]] = None
    label_map: Optional[dict] = None
    weights: Optional[Sequence[float]] = None

    def checked_names(self, num_classes: int) -> List[str]:
        """The class names to record; raises DataError when a list does not fit
        ``num_classes``."""
        names = list(self.names) if self.names else [f"class_{i}" for i in range(num_classes)]
        if len(names) != num_classes:
            raise DataError(f"{len(names)} class names given for num_classes={num_classes}: "
                            f"{names[:10]}")
        if self.weights is not None and len(self.weights) != num_classes:
            raise DataError(f"{len(self.weights)} class weights given for num_classes="
                            f"{num_classes}")
        return names


def save_artifact(uri: str, *, model: torch.nn.Module, hyperparameters: Hyperparameters,
                  classes: ClassInfo = ClassInfo(),
                  metrics: Optional[Mapping[str, Any]] = None, epoch: Optional[int] = None,
                  mean: Optional[Sequence[float]] = None,
                  std: Optional[Sequence[float]] = None,
                  baseline: Optional[Mapping[str, Any]] = None) -> str:
    """Write the artifact folder at ``uri`` (local path or s3:// prefix), atomically.

    ``classes``: names, label map and loss weights (:class:`ClassInfo`); ``mean``/``std``
    default to ImageNet's (what the data transforms use); ``baseline``: the training baseline
    of drift monitoring (``TrainingBaseline.to_dict()``). Returns ``uri``.
    """
    if mean is None or std is None:
        from kubeseg.data.transforms import IMAGENET_MEAN, IMAGENET_STD

        mean = IMAGENET_MEAN if mean is None else mean
        std = IMAGENET_STD if std is None else std
    hp = hyperparameters
    names = classes.checked_names(hp.num_classes)
    loss_weights = None if classes.weights is None else [float(w) for w in classes.weights]
    weights = _state_dict_bytes(model)
    module = getattr(model, "module", model)
    import torchvision

    meta = {
        "format_version": FORMAT_VERSION,
        "algorithm": hp.algorithm,
        "backbone": hp.backbone,
        "output_stride": hp.output_stride,
        "num_classes": hp.num_classes,
        "aux_head": getattr(module, "aux_head", None) is not None,
        "crop_size": hp.effective_crop_size,
        "class_names": names,
        "label_map": classes.label_map,
        "class_weights": loss_weights,
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "metrics": json_safe(dict(metrics or {})),
        "epoch": epoch,
        "weights": WEIGHTS_FILE,
        "weights_sha256": hashlib.sha256(weights).hexdigest(),
        "torch_version": torch.__version__,
        "torchvision_version": torchvision.__version__,
    }
    if baseline is not None:
        meta["training_baseline"] = json_safe(dict(baseline))
    files = {
        WEIGHTS_FILE: weights,
        HYPERPARAMS_FILE: hp.to_json().encode(),
        META_FILE: json.dumps(meta, indent=2, sort_keys=True).encode(),
    }
    version = _write_version(uri, files, meta)
    logger.info("model artifact written to %s (version %s, epoch %s)", uri, version, epoch)
    return uri


def _write_version(uri: str, files: Mapping[str, bytes], meta: Mapping[str, Any]) -> str:
    """Write ``files`` as a new version of the artifact at ``uri``, switch the pointer to it,
    and return the version's name."""
    version = f"{VERSION_PREFIX}{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-" \
              f"{uuid.uuid4().hex[:8]}"
    pointer = json.dumps({"format_version": FORMAT_VERSION, "version": version,
                          "weights_sha256": meta["weights_sha256"]}).encode()
    previous = _current_version(uri)
    # an artifact of the flat layout keeps its files until the pointer has switched
    _remove_leftovers(uri, keep={previous}, keep_flat=previous is None)
    if storage.is_s3(uri):
        for name, data in files.items():
            storage.write_bytes(storage.join(uri, version, name), data)
    else:
        _write_local_version(Path(uri), version, files)
    # The switch. Locally: the pointer's temporary file and the folder are flushed to disk
    # before and after the rename, so a power loss leaves the old pointer or the new one,
    # never an empty file. On S3 the pointer is one PUT: the object appears whole, stored
    # durably, when the PUT is answered.
    storage.write_bytes(storage.join(uri, MARKER_FILE), pointer, durable=True)
    storage.write_bytes(storage.join(uri, META_FILE),
                        json.dumps({**meta, "version": version}, indent=2,
                                   sort_keys=True).encode(), durable=True)
    _remove_leftovers(uri, keep={previous, version})
    return version


def _read_pointer(root: str) -> Optional[dict]:
    """The parsed ``_COMPLETE`` of an artifact, ``{}`` for an empty legacy marker, or None."""
    marker = storage.join(root, MARKER_FILE)
    if not storage.exists(marker):
        return None
    text = storage.read_text(marker).strip()
    try:
        value = json.loads(text) if text else {}
    except json.JSONDecodeError:
        raise DataError(f"model artifact {root}: {MARKER_FILE} is not JSON; write the model "
                        "again") from None
    return value if isinstance(value, dict) else {}


def _current_version(uri: str) -> Optional[str]:
    try:
        pointer = _read_pointer(str(uri).rstrip("/"))
    except DataError:
        return None
    return (pointer or {}).get("version")


def _remove_leftovers(uri: str, keep: set, keep_flat: bool = False) -> None:
    """Remove what is not part of a kept version: versions nobody points to (an interrupted
    writer's), temporary folders and files, and (unless ``keep_flat``) the files of the flat
    layout."""
    flat = () if keep_flat else (WEIGHTS_FILE, HYPERPARAMS_FILE)
    uri = str(uri).rstrip("/")
    if not storage.is_s3(uri):
        target = Path(uri).absolute()
        if target.parent.is_dir():  # leftovers of the earlier rename-the-folder writer
            for stale in target.parent.glob(f".{target.name}.tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
            for stale in target.parent.glob(f".{target.name}.old-*"):
                shutil.rmtree(stale, ignore_errors=True)
        if not target.is_dir():
            return
        for entry in target.iterdir():
            name = entry.name
            if name in (MARKER_FILE, META_FILE) or name in keep:
                continue
            if name.startswith((VERSION_PREFIX, f".{VERSION_PREFIX}")) and entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            elif name in flat or (
                    name.startswith(".") and name.endswith(".tmp") and entry.is_file()):
                entry.unlink(missing_ok=True)
        return
    try:
        names = storage.list_files(uri)
    except storage.StorageError:
        return  # nothing there yet (or no bucket): nothing to clean
    for name in names:
        top = name.split("/", 1)[0]
        if name in (MARKER_FILE, META_FILE) or top in keep:
            continue
        if top.startswith(VERSION_PREFIX) or name in flat:
            storage.delete(storage.join(uri, name))


def _write_local_version(target: Path, version: str, files: Mapping[str, bytes]) -> None:
    """Write ``target/version/`` whole: into a hidden folder, then one rename."""
    target = target.absolute()
    target.mkdir(parents=True, exist_ok=True)
    # os.mkdir applies the process umask itself (mkdtemp would make the folder owner-only,
    # and servers may run as other users); the umask is never changed, not even for a moment.
    tmp = target / f".{version}.{uuid.uuid4().hex[:8]}"
    os.mkdir(tmp, 0o777)
    try:
        for name, data in files.items():
            with open(tmp / name, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        storage.fsync_path(tmp)  # the files' names, before the folder becomes visible
        os.rename(tmp, target / version)
        storage.fsync_path(target)  # the rename, before the pointer can name the version
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _artifact_root(uri: str) -> str:
    uri = str(uri).rstrip("/")
    for name in (WEIGHTS_FILE, META_FILE, HYPERPARAMS_FILE, MARKER_FILE):
        if uri.endswith("/" + name) or uri == name:
            return uri[: -len(name)].rstrip("/") or "."
    return uri


def _has_versions(root: str) -> bool:
    try:
        names = storage.list_files(root)
    except storage.StorageError:
        return False
    return any(n.startswith(VERSION_PREFIX) or n == WEIGHTS_FILE for n in names)


def _resolve(uri: str) -> Tuple[str, str]:
    """``(artifact root, folder of the current version's files)``."""
    root = _artifact_root(uri)
    pointer = _read_pointer(root)
    if pointer is None:
        if storage.exists(storage.join(root, META_FILE)) or _has_versions(root):
            raise DataError(f"model artifact {root} is incomplete (no {MARKER_FILE} marker): "
                            "it was being written or its writer was interrupted; train again "
                            "or point to a complete artifact")
        raise DataError(f"{root} is not a kubeseg model artifact: expected {MARKER_FILE} and "
                        f"the files of a model version there")
    version = pointer.get("version")
    if version is None:
        return root, root  # the flat layout of earlier versions
    if not isinstance(version, str) or not version.startswith(VERSION_PREFIX) or "/" in version:
        raise DataError(f"model artifact {root}: {MARKER_FILE} names version {version!r}; "
                        "write the model again")
    return root, storage.join(root, version)


def read_info(uri: str) -> ModelInfo:
    """Read and check an artifact's metadata without loading the weights."""
    root, files = _resolve(uri)
    try:
        meta = json.loads(storage.read_text(storage.join(files, META_FILE)))
        hp_values = json.loads(storage.read_text(storage.join(files, HYPERPARAMS_FILE)))
    except json.JSONDecodeError as exc:
        raise DataError(f"model artifact {root}: corrupt JSON ({exc})") from None
    version = int(meta.get("format_version", 0))
    if version > FORMAT_VERSION or version < 1:
        raise DataError(f"model artifact {root} has format_version {version}; this kubeseg "
                        f"reads format_version 1..{FORMAT_VERSION}: upgrade kubeseg")
    hp = Hyperparameters.from_dict(hp_values)
    # kubeseg.json repeats these for readers without kubeseg; the two files must agree
    # (output_stride: artifacts written before it existed leave it out, and mean 8).
    for key, value in (("num_classes", hp.num_classes), ("algorithm", hp.algorithm),
                       ("backbone", hp.backbone), ("crop_size", hp.effective_crop_size),
                       ("output_stride", hp.output_stride)):
        if meta.get(key, value if key == "output_stride" else None) != value:
            raise DataError(f"model artifact {root}: {META_FILE} says {key}="
                            f"{meta.get(key)!r} but {HYPERPARAMS_FILE} says {value!r}; "
                            "write the model again")
    return ModelInfo(
        hyperparameters=hp, class_names=list(meta["class_names"]), mean=tuple(meta["mean"]),
        std=tuple(meta["std"]), label_map=meta.get("label_map"),
        metrics=meta.get("metrics") or {}, format_version=version,
        epoch=meta.get("epoch"), uri=root, files_uri=files,
        class_weights=meta.get("class_weights"), aux_head=bool(meta.get("aux_head", True)),
        weights_sha256=meta.get("weights_sha256"),
        training_baseline=meta.get("training_baseline") or None)


def _read_weights(folder: str, expected_sha256: Optional[str]) -> Dict[str, torch.Tensor]:
    """``folder``'s model.pt, checked against ``expected_sha256`` (when there is one)."""
    data = storage.read_bytes(storage.join(folder, WEIGHTS_FILE))
    if expected_sha256 and hashlib.sha256(data).hexdigest() != expected_sha256:
        raise DataError(f"model artifact {folder}: {WEIGHTS_FILE} does not match the sha256 in "
                        f"{META_FILE} (corrupt or overwritten); train again")
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def read_state_dict(uri: str) -> Dict[str, torch.Tensor]:
    """The artifact's weights (checked against the sha256 recorded in kubeseg.json).

    ``uri`` is an artifact or the folder of one of its versions.
    """
    folder = str(uri).rstrip("/")
    if not storage.exists(storage.join(folder, WEIGHTS_FILE)):
        folder = _resolve(uri)[1]
    meta = json.loads(storage.read_text(storage.join(folder, META_FILE)))
    return _read_weights(folder, meta.get("weights_sha256"))


def load_model(uri: str, device: str = "cpu") -> Tuple[torch.nn.Module, ModelInfo]:
    """``(model in eval mode on device, ModelInfo)`` from an artifact folder or S3 prefix."""
    from kubeseg.models import build_model

    try:
        info = read_info(uri)
        state = _read_weights(info.files_uri, info.weights_sha256)
    except storage.StorageError:
        # the version read was replaced twice meanwhile (and removed): read the current one
        info = read_info(uri)
        state = _read_weights(info.files_uri, info.weights_sha256)
    model = build_model(algorithm=info.algorithm, backbone=info.backbone,
                        num_classes=info.num_classes, aux_loss=info.aux_head,
                        output_stride=info.hyperparameters.output_stride)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise DataError(f"model artifact {info.uri}: weights do not fit {info.algorithm} / "
                        f"{info.backbone} / {info.num_classes} classes: "
                        f"{str(exc).splitlines()[0]}") from None
    model.to(device).eval()
    return model, info


__all__ = ["FORMAT_VERSION", "ModelInfo", "ClassInfo", "save_artifact", "load_model",
           "read_info", "read_state_dict", "add_files", "read_added_file"]


# -- files derived from a version (an ONNX export, a quantized model) -----------------------------

def add_files(uri: str, files: Mapping[str, bytes]) -> str:
    """Add derived files (an ONNX export, a quantized model) to the artifact's current version.

    Each file is written whole under a temporary name and then moved (locally) or put in one
    request (S3), so a reader sees it complete or not at all; the files a version is made of
    (model.pt, hyperparams.json, kubeseg.json) cannot be replaced this way. The files belong to
    that version: a later ``save_artifact`` starts a new version without them. Returns the
    version's folder (or prefix).
    """
    reserved = sorted(set(files) & {*_FILES, MARKER_FILE})
    bad = sorted(n for n in files if not n or "/" in n or n.startswith(".") or n in reserved)
    if bad:
        raise DataError(f"model artifact {uri}: cannot add file(s) {bad}: give plain names "
                        f"other than {', '.join(sorted({*_FILES, MARKER_FILE}))}")
    folder = _resolve(uri)[1]
    for name, data in files.items():
        storage.write_bytes(storage.join(folder, name), data)
    logger.info("added %s to model artifact %s", ", ".join(sorted(files)), folder)
    return folder


def read_added_file(uri: str, name: str) -> Optional[bytes]:
    """A file added with :func:`add_files` to the current version, or None when absent."""
    path = storage.join(_resolve(uri)[1], name)
    return storage.read_bytes(path) if storage.exists(path) else None
