"""Hyperparameters: the one place where names, defaults and valid ranges are declared.

CLI flags, pipeline parameters, the ``kubeseg hyperparameters`` table and the model artifact's
``hyperparams.json`` are all derived from :class:`Hyperparameters`. Values may arrive as strings
(a UI form, a SageMaker hyperparameter JSON): ``"True"``, ``"1e-3"`` and ``"10, 20"`` parse.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar, Mapping, Optional, Tuple, Union

from kubeseg.errors import ConfigError

REQUIRED = object()  # sentinel default for parameters the user must give
AUTO = "auto"  # class_weights computed from the training data
# Annotation value that marks a pixel as "no label": never trained on, never scored (SPEC 3).
IGNORE_INDEX = 255
# The backbones are dilated to an output stride of 8 (the reference's families) or 16
# (hyperparameter output_stride); training crops are rounded up to a multiple of it so that
# logits and labels line up pixel for pixel (SPEC 2).
OUTPUT_STRIDES = (8, 16)
OUTPUT_STRIDE = 8  # the default, and the reference's
# Distributed training runs as a Kubeflow Trainer v2 TrainJob or a Training Operator 1.9
# PyTorchJob (kubeseg.deploy.training_job builds both).
TRAINER_V2 = "trainer-v2"
PYTORCHJOB = "pytorchjob"
OPERATORS = (TRAINER_V2, PYTORCHJOB)
DEFAULT_RUNTIME = "torch-distributed"  # Kubeflow Trainer's ClusterTrainingRuntime for PyTorch


def round_crop_size(crop_size: int, output_stride: int = OUTPUT_STRIDE) -> int:
    """``crop_size`` rounded up to a multiple of ``output_stride``."""
    return int(math.ceil(int(crop_size) / output_stride) * output_stride)


def json_values(text: str, source: str = "hyperparameter JSON") -> dict:
    """The name: value pairs of a hyperparameter JSON text (values unchecked, may be strings);
    ConfigError naming ``source`` when it is not a JSON object."""
    try:
        values = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError([f"{source} is not valid JSON: {exc}"]) from None
    if not isinstance(values, dict):
        raise ConfigError([f"{source} must hold a JSON object of name: value pairs"])
    return values


@dataclass(frozen=True)
class Spec:
    """How one hyperparameter is parsed and checked."""

    kind: str  # "int", "float", "bool", "choice", "int_list", "float_list", "str"
    help: str
    choices: Tuple[str, ...] = ()  # the allowed values of a "choice" (or, as text, an "int")
    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False  # True: the value must be > low instead of >= low
    high_open: bool = False
    required: bool = False
    ours: bool = False  # beyond the reference product's contract
    extra_choices: Tuple[str, ...] = ()  # choices beyond the reference product's contract
    words: Tuple[str, ...] = ()  # words accepted instead of a list, e.g. "auto"

    def parse(self, raw: Any) -> Any:
        """``raw`` (a value or its text) parsed and checked; ValueError saying what is wrong."""
        return _parse(self, raw)

    def describe(self) -> str:
        """The allowed values, as shown in errors and in the parameter table."""
        if self.kind == "choice" or (self.kind == "int" and self.choices):
            return " | ".join(self.choices)
        if self.kind == "bool":
            return "True | False"
        if self.kind == "str":
            return "text"
        if self.kind in ("int_list", "float_list"):
            item = "integers" if self.kind == "int_list" else "numbers"
            rng = self._range_text()
            text = f"comma-separated {item}" + (f", each {rng}" if rng else "")
            return " | ".join((text,) + self.words)
        return self._range_text() or "any"

    def _range_text(self) -> str:
        if self.low is None and self.high is None:
            return ""
        fmt = (lambda v: str(int(v))) if self.kind in ("int", "int_list") else _fmt_number
        if self.low is not None and self.high is not None:
            left = "(" if self.low_open else "["
            right = ")" if self.high_open else "]"
            return f"{left}{fmt(self.low)}, {fmt(self.high)}{right}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {fmt(self.low)}"
        return f"{'<' if self.high_open else '<='} {fmt(self.high)}"


def _fmt_number(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def param(default: Any, kind: str, help: str, **spec: Any) -> Any:
    """Declare a dataclass field together with its :class:`Spec`."""
    required = default is REQUIRED
    s = Spec(kind=kind, help=help, required=required, **spec)
    if required:
        return field(default=None, metadata={"spec": s})
    if isinstance(default, (list, tuple)):
        return field(default=tuple(default), metadata={"spec": s})
    return field(default=default, metadata={"spec": s})


# Keys that a hyperparameter tuner adds to every training job's hyperparameters, such as
# SageMaker's ``_tuning_objective_metric``: accepted, kept in ``tuner_keys`` and written to
# hyperparams.json, never used for training.
TUNER_KEY_PREFIXES = ("_", "sagemaker_")


def is_tuner_key(name: str) -> bool:
    return isinstance(name, str) and name.startswith(TUNER_KEY_PREFIXES)


OPTIMIZERS = ("sgd", "adam", "adagrad", "nag", "rmsprop")
INFERENCE_SIZES = ("image", "base_size")
# base_size and crop_size must be larger: smaller crops leave the stride-8 network almost nothing.
MIN_IMAGE_SIDE = 16
# The model names, declared here once: kubeseg.models builds exactly these (a test checks that
# every name has a builder and every builder a name). The reference product's come first.
REFERENCE_BACKBONES = ("resnet-50", "resnet-101")
EXTRA_BACKBONES = ("resnet-18", "resnet-34", "mobilenet-v3-large", "efficientnet-lite0",
                   "convnext-tiny")
BACKBONES = REFERENCE_BACKBONES + EXTRA_BACKBONES
REFERENCE_ALGORITHMS = ("fcn", "psp", "deeplab")
EXTRA_ALGORITHMS = ("deeplabv3plus", "lraspp")
ALGORITHMS = REFERENCE_ALGORITHMS + EXTRA_ALGORITHMS
# Given as the pretrained weights URI: download the backbone's public ImageNet weights.
TORCHVISION_DEFAULT = "torchvision:imagenet"


@dataclass(frozen=True)
class Hyperparameters:
    """Every training hyperparameter of kubeseg (SPEC section 2 plus the ones marked ours)."""

    backbone: str = param(
        "resnet-50", "choice", "Encoder network, dilated to output_stride. resnet-18/34, "
        "mobilenet-v3-large and efficientnet-lite0 are small CPU-friendly extras; convnext-tiny "
        "is a larger, more accurate one for GPUs.", choices=BACKBONES,
        extra_choices=EXTRA_BACKBONES)
    algorithm: str = param(
        "fcn", "choice", "Decoder head: FCN, PSPNet pyramid pooling, DeepLabV3 ASPP; extras: "
        "DeepLabV3+ (ASPP and a decoder fusing stride-4 features) and Lite R-ASPP (MobileNetV3's "
        "light head fusing stride-8 features).", choices=ALGORITHMS,
        extra_choices=EXTRA_ALGORITHMS)
    use_pretrained_model: bool = param(
        True, "bool", "Initialise the backbone (only) from ImageNet weights given by URI.")
    num_classes: int = param(
        REQUIRED, "int", "Number of classes; annotation pixels are 0..num_classes-1, 255 ignored.",
        low=2, high=254)
    num_training_samples: int = param(
        REQUIRED, "int", "Number of training images; drives the learning-rate schedule.",
        low=0, low_open=True)
    base_size: int = param(
        520, "int", "Long image side is rescaled to base_size x U(0.5, 2.0) before cropping.",
        low=MIN_IMAGE_SIDE, low_open=True)
    crop_size: int = param(
        240, "int", "Side of the random square training crop (rounded up to a multiple of "
        "output_stride, 8 by default).",
        low=MIN_IMAGE_SIDE, low_open=True)
    epochs: int = param(10, "int", "Passes over the training data.", low=0, low_open=True)
    learning_rate: float = param(
        0.001, "float", "Initial learning rate.", low=0, high=1, low_open=True)
    lr_scheduler: str = param(
        "poly", "choice", "poly (power 0.9, per iteration), cosine, or step.",
        choices=("poly", "cosine", "step"))
    lr_scheduler_factor: float = param(
        0.1, "float", "Multiplier applied at each step epoch (step scheduler only).",
        low=0, high=1, low_open=True, high_open=True)
    lr_scheduler_step: Tuple[int, ...] = param(
        (), "int_list", "Epochs at which the step scheduler multiplies the rate, e.g. \"10, 20\"; "
        "required with lr_scheduler=step.", low=1)
    mini_batch_size: int = param(16, "int", "Training batch size per GPU/process.",
                                 low=0, low_open=True)
    validation_mini_batch_size: int = param(
        16, "int", "Validation batch size; 1 scores whole uncropped images.",
        low=0, low_open=True)
    optimizer: str = param("sgd", "choice", "Optimisation algorithm.", choices=OPTIMIZERS)
    momentum: float = param(0.9, "float", "Momentum (sgd and nag).", low=0, high=1,
                            low_open=True)
    weight_decay: float = param(0.0001, "float", "L2 weight decay.", low=0, high=1,
                                low_open=True, high_open=True)
    gamma1: float = param(0.9, "float", "rmsprop: decay of the squared-gradient average.",
                          low=0, high=1)
    gamma2: float = param(0.9, "float", "rmsprop: momentum.", low=0, high=1)
    early_stopping: bool = param(False, "bool", "Stop when validation mIoU stops improving.")
    early_stopping_min_epochs: int = param(
        5, "int", "Epochs always run before early stopping may trigger.", low=0)
    early_stopping_patience: int = param(
        4, "int", "Epochs without enough improvement before stopping.", low=0)
    early_stopping_tolerance: float = param(
        0.0, "float", "Relative mIoU gain below which an epoch counts as no improvement.",
        low=0, high=1)
    syncbn: bool = param(False, "bool", "Synchronise BatchNorm statistics across GPUs.")
    precision_dtype: str = param(
        "float32", "choice", "Training precision; bfloat16/float16 use mixed precision on CUDA.",
        choices=("float32", "bfloat16", "float16"), extra_choices=("bfloat16", "float16"))
    # -- ours ------------------------------------------------------------------------------
    seed: int = param(0, "int", "Random seed for weights, sampling and augmentation.", low=0,
                      ours=True)
    class_weights: Union[Tuple[float, ...], str] = param(
        (), "float_list", "Per-class loss weights (num_classes values) for imbalanced data; "
        "empty = all 1; auto = square-root median-frequency weights from the training split's "
        "class histogram.", low=0, ours=True, words=(AUTO,))
    aux_loss_weight: float = param(0.5, "float", "Weight of the auxiliary FCN head's loss.",
                                   low=0, high=1, ours=True)
    channels_last: bool = param(True, "bool", "Use channels-last memory format (CPU and CUDA).",
                                ours=True)
    compile: bool = param(False, "bool", "Compile the model with torch.compile (slow first "
                          "iterations, faster later ones).", ours=True)
    output_stride: int = param(
        OUTPUT_STRIDE, "int", "Resolution of the backbone's last features (input side / "
        "feature side): 8 as the reference's models, or 16 (less backbone and head work, "
        "coarser features). DeepLab's ASPP rates follow it; crop_size is rounded up to a "
        "multiple of it.", choices=tuple(map(str, OUTPUT_STRIDES)), ours=True)
    inference_size: str = param(
        "image", "choice", "Size whole images are scored at (validation with "
        "validation_mini_batch_size=1, kubeseg evaluate, serving and batch prediction): image = "
        "their own size; base_size = long side rescaled to base_size, the centre of the "
        "training scales, as GluonCV's evaluation does. Masks always come back at the image's "
        "own size.", choices=INFERENCE_SIZES, ours=True)

    # Tuner-added keys as given (strings); set by from_dict, not a hyperparameter.
    tuner_keys: ClassVar[Mapping[str, str]] = MappingProxyType({})

    # -- derived and checked ---------------------------------------------------------------
    @classmethod
    def specs(cls) -> "dict[str, Spec]":
        return {f.name: f.metadata["spec"] for f in dataclasses.fields(cls)}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "Hyperparameters":
        """Parse and check ``values``; every problem is reported at once in a ConfigError."""
        specs = cls.specs()
        tuner = {name: raw if isinstance(raw, str) else json.dumps(raw)
                 for name, raw in values.items() if name not in specs and is_tuner_key(name)}
        parsed, problems, failed = _parse_named(
            specs, {k: v for k, v in values.items() if k not in tuner}, "hyperparameter")
        for name, spec in specs.items():
            if spec.required and name not in values:
                problems.append(f"{name} is required; allowed: {spec.describe()}")
        # The cross-checks run on whatever parsed, so every problem is reported at once.
        problems.extend(_cross_checks({**cls._defaults(), **parsed}, failed))
        if problems:
            raise ConfigError(problems)
        hp = cls(**parsed)
        if tuner:
            object.__setattr__(hp, "tuner_keys", MappingProxyType(dict(sorted(tuner.items()))))
        return hp

    @classmethod
    def _defaults(cls) -> "dict[str, Any]":
        return {f.name: f.default for f in dataclasses.fields(cls)}

    def replace(self, **changes: Any) -> "Hyperparameters":
        """A checked copy with some values changed (strings parse as in from_dict)."""
        return type(self).from_dict({**self.tuner_keys, **self.to_dict(), **changes})

    @property
    def auto_class_weights(self) -> bool:
        """True when class_weights=auto: computed from the training split at training time."""
        return self.class_weights == AUTO

    def to_dict(self) -> "dict[str, Any]":
        """JSON-ready values; ``from_dict(to_dict())`` gives back an equal object."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def to_json(self) -> str:
        """The hyperparameters and the tuner-added keys (what hyperparams.json records)."""
        return json.dumps({**self.tuner_keys, **self.to_dict()}, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, overrides: Optional[Mapping[str, Any]] = None,
                  source: str = "hyperparameter JSON") -> "Hyperparameters":
        return cls.from_dict({**json_values(text, source), **(overrides or {})})

    @property
    def effective_crop_size(self) -> int:
        """crop_size rounded up to a multiple of the network's output stride."""
        return round_crop_size(self.crop_size, self.output_stride)

    @property
    def validates_whole_images(self) -> bool:
        """validation_mini_batch_size=1 scores whole uncropped images; larger batches score
        centre crops of crop_size."""
        return self.validation_mini_batch_size == 1

    @property
    def inference_long_side(self) -> Optional[int]:
        """The long side whole images are scored at (``inference_size=base_size``), or None
        for their own size."""
        return self.base_size if self.inference_size == "base_size" else None


def parse_assignments(items) -> "dict[str, str]":
    """Turn ``["name=value", ...]`` (as from ``--set``) into a dict of raw strings."""
    out = {}
    for item in items or ():
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ConfigError([f"--set {item!r}: expected name=value"])
        out[name.strip()] = value.strip()
    return out


_TRUE = {"true", "1", "yes", "y", "on"}
_FALSE = {"false", "0", "no", "n", "off"}


def _parse_named(specs: Mapping[str, Spec], values: Mapping[str, Any],
                 what: str) -> "Tuple[dict, list, set]":
    """Parse each of ``values`` with its spec: (parsed values, problems, names that failed).
    A name without a spec is a problem with a "did you mean" hint."""
    parsed, problems, failed = {}, [], set()
    for name, raw in values.items():
        if name not in specs:
            close = difflib.get_close_matches(name, list(specs), n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            problems.append(f"unknown {what} '{name}'{hint}")
            continue
        try:
            parsed[name] = _parse(specs[name], raw)
        except ValueError as exc:
            failed.add(name)
            problems.append(f"{name}={raw!r}: {exc}; allowed: {specs[name].describe()}")
    return parsed, problems, failed


def _parse(spec: Spec, raw: Any) -> Any:
    if spec.kind == "str":
        return "" if raw is None else str(raw)
    if spec.kind == "bool":
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise ValueError("not a boolean")
    if spec.kind == "choice":
        text = str(raw).strip()
        if text not in spec.choices:
            close = difflib.get_close_matches(text, spec.choices, n=1)
            raise ValueError("not one of the choices" + (f" (did you mean '{close[0]}'?)"
                                                         if close else ""))
        return text
    if spec.kind in ("int", "float"):
        value = _number(raw, spec.kind)
        _check_range(spec, value)
        if spec.choices and str(value) not in spec.choices:
            raise ValueError("not one of the choices")
        return value
    if spec.kind in ("int_list", "float_list"):
        item_kind = spec.kind.split("_")[0]
        if isinstance(raw, str) and raw.strip().lower() in spec.words:
            return raw.strip().lower()
        if isinstance(raw, str):
            text = raw.strip().strip("[]()")
            items = [t for t in (s.strip() for s in text.split(",")) if t]
        elif isinstance(raw, (list, tuple)):
            items = list(raw)
        else:
            items = [raw]
        values = tuple(_number(item, item_kind) for item in items)
        for v in values:
            _check_range(spec, v)
        return values
    raise AssertionError(f"unknown kind {spec.kind}")


def _number(raw: Any, kind: str) -> Any:
    if isinstance(raw, bool):
        raise ValueError("a boolean is not a number")
    try:
        value = float(str(raw).strip()) if isinstance(raw, str) else float(raw)
    except (TypeError, ValueError):
        raise ValueError(f"not a{'n integer' if kind == 'int' else ' number'}") from None
    if not math.isfinite(value):
        raise ValueError("not a finite number")
    if kind == "int":
        if not value.is_integer():
            raise ValueError("not an integer")
        return int(value)
    return value


def _check_range(spec: Spec, value: float) -> None:
    if spec.low is not None and (value <= spec.low if spec.low_open else value < spec.low):
        raise ValueError("out of range")
    if spec.high is not None and (value >= spec.high if spec.high_open else value > spec.high):
        raise ValueError("out of range")


def _cross_checks(values: Mapping[str, Any], failed=frozenset()) -> "list[str]":
    """Checks between parameters; a check involving a value that did not parse is left out
    (that value's own problem is reported instead)."""
    problems = []
    if not {"lr_scheduler", "lr_scheduler_step"} & failed and values["lr_scheduler"] == "step" \
            and not values["lr_scheduler_step"]:
        problems.append("lr_scheduler_step is required when lr_scheduler=step, "
                        "e.g. lr_scheduler_step=\"10, 20\" (epochs)")
    steps = values["lr_scheduler_step"]
    if "lr_scheduler_step" not in failed and list(steps) != sorted(set(steps)):
        problems.append(f"lr_scheduler_step={','.join(map(str, steps))}: epochs must be "
                        "strictly increasing")
    weights = values["class_weights"]
    if not {"class_weights", "num_classes"} & failed and weights and weights != AUTO \
            and values["num_classes"] is not None and len(weights) != values["num_classes"]:
        problems.append(f"class_weights has {len(weights)} values; it needs num_classes="
                        f"{values['num_classes']} values (or none)")
    return problems


TRAIN_DEVICES = ("cuda", "cpu", "auto")
# The account KServe's storage initializer downloads the model as (manifests/base creates it, the
# storage Secret attached); the pipeline's deploy step and `kubeseg deploy` default to it.
DEFAULT_PREDICTOR_SERVICE_ACCOUNT = "kubeseg-predictor"


@dataclass(frozen=True)
class PipelineParameters:
    """The pipeline's parameters that are not hyperparameters: the dataset, where the run's
    files go, training placement, the quality gate and the deployment. Declared here like the
    hyperparameters, so ``kubeseg submit``, the pipeline's signature, the quality gate and the
    CLI help take their types, defaults and ranges from one place."""

    train: str = param("", "str", "Training images: s3:// prefix or folder (four-channel "
                                  "layout).")
    validation: str = param("", "str", "Validation images.")
    train_annotation: str = param("", "str", "Training annotations: single-channel PNG, same "
                                             "base names.")
    validation_annotation: str = param("", "str", "Validation annotations.")
    label_map: str = param("", "str", "Folder with train_label_map.json (optional; default "
                                      "scale 1).")
    manifest_uri: str = param("", "str", "Augmented manifest (JSON Lines) for training; "
                                         "replaces the four channels when set.")
    validation_manifest_uri: str = param("", "str", "Augmented manifest for validation (needs "
                                                    "manifest_uri).")
    manifest_attribute_names: str = param(
        "", "str", "Comma-separated manifest attributes, image first (default: source-ref and "
                   "the other -ref one).")
    class_names: str = param("", "str", "Comma-separated class names (optional).")
    strict_labels: bool = param(
        False, "bool", "Validation fails on annotation pixel values that neither the label map "
                       "nor num_classes explains (above num_classes and in no label-map entry); "
                       "by default they are a warning and become ignore (255).")
    pretrained_weights_uri: str = param(
        "", "str", "The backbone's published ImageNet state dict (torchvision's format; "
                   "efficientnet-lite0-57934424.pth's for efficientnet-lite0); empty: the "
                   "public download.")
    initial_model_uri: str = param(
        "", "str", "Earlier kubeseg model to continue from (the model channel; incremental "
                   "training).")
    output_root: str = param(
        "s3://kubeseg/runs", "str", "Where the run's files go: "
                                    "<output_root>/<run id>/{validation,shards,train,evaluation}.")
    train_device: str = param(
        "cuda", "choice", "Device of one-GPU training: cuda (fails at once without a usable "
                          "GPU), cpu or auto.", choices=TRAIN_DEVICES)
    num_nodes: int = param(1, "int", "Training pods; > 1 (or gpus_per_node > 1) launches a "
                                     "distributed training job.", low=1)
    gpus_per_node: int = param(1, "int", "GPUs per training pod in a distributed training "
                                         "job.", low=0)
    training_operator: str = param(
        TRAINER_V2, "choice", "Distributed training: trainer-v2 (Kubeflow Trainer TrainJob) or "
                              "pytorchjob (Training Operator 1.9).", choices=OPERATORS)
    training_runtime: str = param(DEFAULT_RUNTIME, "str",
                                  "ClusterTrainingRuntime of the TrainJob.")
    min_miou: float = param(0.5, "float", "Quality gate: lowest validation mIoU that deploys.",
                            low=0, high=1)
    champion_uri: str = param(
        "s3://kubeseg/models/champion", "str", "Where a deployed model is promoted (model/ and "
                                               "metrics.json); the next run gates against it. "
                                               "Empty: no promotion.")
    previous_metrics_uri: str = param("", "str", "Quality gate: metrics.json to beat instead "
                                                 "of the champion's.")
    max_regression: float = param(0.0, "float", "Quality gate: allowed mIoU drop against it.",
                                  low=0, high=1)
    endpoint_name: str = param("kubeseg", "str", "InferenceService name.")
    namespace: str = param("kubeflow-user", "str", "Namespace for the InferenceService and "
                                                   "PyTorchJob.")
    serving_gpus: int = param(0, "int", "GPUs per serving replica (0 = CPU serving).", low=0)
    canary_traffic_percent: int = param(100, "int", "Traffic share for the new model (100 = "
                                                    "all).", low=0, high=100)
    predictor_service_account: str = param(
        DEFAULT_PREDICTOR_SERVICE_ACCOUNT, "str", "Service account with the storage credentials for KServe.")
    deploy_dry_run: bool = param(False, "bool", "Render the InferenceService without applying "
                                                "it.")

    @classmethod
    def specs(cls) -> "dict[str, Spec]":
        return {f.name: f.metadata["spec"] for f in dataclasses.fields(cls)}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "PipelineParameters":
        """Parse and check ``values`` (strings parse as for hyperparameters); every problem is
        reported at once in a ConfigError."""
        parsed, problems, _ = _parse_named(cls.specs(), values, "pipeline parameter")
        merged = {f.name: f.default for f in dataclasses.fields(cls)}
        merged.update(parsed)
        if merged["validation_manifest_uri"] and not merged["manifest_uri"]:
            problems.append("validation_manifest_uri is set but manifest_uri is empty: the "
                            "validation manifest is only read with a training manifest; set "
                            "manifest_uri, or give the validation data as channels")
        if problems:
            raise ConfigError(problems, what="pipeline parameter")
        return cls(**parsed)

    def to_dict(self) -> "dict[str, Any]":
        return dataclasses.asdict(self)


def value_problem(name: str, value: Any) -> Optional[str]:
    """The problem with one hyperparameter or pipeline parameter checked alone (for library
    calls that take it as an argument), naming it and its allowed values; None when valid."""
    spec = {**Hyperparameters.specs(), **PipelineParameters.specs()}[name]
    try:
        _parse(spec, value)
    except ValueError as exc:
        return f"{name}={value!r}: {exc}; allowed: {spec.describe()}"
    return None


EXTRA_MARK = "[kubeseg extra]"


def parameter_table() -> str:
    """A plain-text table of every hyperparameter, its default and allowed values.

    What goes beyond the reference product's contract is marked: whole parameters with
    ``[kubeseg extra]``, extra values of a reference parameter with ``[kubeseg extra values:
    ...]``.
    """
    rows = [("name", "default", "allowed", "description")]
    for name, spec in Hyperparameters.specs().items():
        default = "(required)" if spec.required else _show(Hyperparameters._defaults()[name])
        mark = f" {EXTRA_MARK}" if spec.ours else ""
        if spec.extra_choices and not spec.ours:
            mark = f" [kubeseg extra values: {', '.join(spec.extra_choices)}]"
        rows.append((name, default, spec.describe(), spec.help + mark))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = []
    for i, r in enumerate(rows):
        lines.append("  ".join(r[j].ljust(widths[j]) for j in range(3)) + "  " + r[3])
        if i == 0:
            lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 11)
    lines.append("")
    lines.append(f"{EXTRA_MARK}: beyond the reference product (SageMaker's Semantic "
                 "Segmentation algorithm); everything else keeps its names, values and defaults.")
    return "\n".join(lines)


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return ", ".join(map(str, value)) or "(none)"
    return str(value)
