"""``kubeseg run``, ``kubeseg compile`` and ``kubeseg submit``: the Kubeflow pipeline from the CLI.

- ``run``: the whole pipeline on this machine with ``kfp.local`` on a generated sample dataset
  (coloured shapes), then the trained model served on 127.0.0.1, one image sent to it, and the
  predicted mask and an overlay written as PNG files.
- ``compile``: regenerate ``pipelines/segmentation.yaml``.
- ``submit``: create a run (or a recurring run) on a Kubeflow Pipelines API server from a
  parameters YAML file, checked before anything is sent.
"""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

VERBS = ("run", "compile", "submit")

logger = logging.getLogger(__name__)

DEFAULT_WORKDIR = "kubeseg-run"
DEFAULT_BUCKET = "kubeseg-run"
TOKEN_ENV = "KF_PIPELINES_TOKEN"
# In a pod, KFP's projected service-account token (audience pipelines.kubeflow.org).
SA_TOKEN_PATH_ENV = "KF_PIPELINES_SA_TOKEN_PATH"
DEFAULT_SA_TOKEN_PATH = "/var/run/secrets/kubeflow/pipelines/token"
HEALTHZ_PATH = "/apis/v2beta1/healthz"

# The sample run: small enough for a few minutes on 2 CPU cores, large enough to learn shapes.
SAMPLE_HYPERPARAMETERS = {
    "backbone": "resnet-18", "algorithm": "fcn", "use_pretrained_model": False,
    "base_size": 64, "crop_size": 64, "optimizer": "adam", "learning_rate": 0.005,
    "mini_batch_size": 4, "validation_mini_batch_size": 1, "aux_loss_weight": 0.2,
}


def compiled_pipeline_path() -> Path:
    """Where the checked-in compiled pipeline lives (inside the ``pipelines`` package)."""
    import pipelines

    return Path(pipelines.__file__).resolve().parent / "segmentation.yaml"


# -- arguments -------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    if verb == "run":
        _run_arguments(parser)
    elif verb == "compile":
        parser.add_argument("--output", metavar="FILE.yaml",
                            help="where to write the compiled pipeline (default: "
                                 "pipelines/segmentation.yaml in the installed package)")
    elif verb == "submit":
        _submit_arguments(parser)


def _run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "Everything lands below --workdir (default ./kubeseg-run): data/ (the sample dataset),\n"
        "pipeline/ (kfp.local artifacts per task), work/ (checkpoints, metrics, model,\n"
        "evaluation), prediction/ (mask and overlay PNG). With --s3-endpoint the dataset and\n"
        "the work files go to s3://BUCKET instead (credentials from AWS_ACCESS_KEY_ID /\n"
        "AWS_SECRET_ACCESS_KEY).")
    parser.add_argument("--workdir", default=DEFAULT_WORKDIR,
                        help="local folder for everything (default: ./%(default)s)")
    parser.add_argument("--s3-endpoint", metavar="URL",
                        help="S3/MinIO endpoint (e.g. http://127.0.0.1:9000): keep the dataset "
                             "and the run's files there instead of --workdir")
    parser.add_argument("--bucket", default=DEFAULT_BUCKET,
                        help="bucket used with --s3-endpoint (default: %(default)s)")
    parser.add_argument("--images", type=int, default=24,
                        help="training images to generate (default: %(default)s)")
    parser.add_argument("--validation-images", type=int, default=6,
                        help="validation images to generate (default: %(default)s)")
    parser.add_argument("--size", type=int, default=64, help="image side (default: %(default)s)")
    parser.add_argument("--num-classes", type=int, default=3,
                        help="classes, background included (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=8, help="(default: %(default)s)")
    parser.add_argument("--min-miou", type=float, default=0.5,
                        help="quality gate before the (dry-run) deploy step "
                             "(default: %(default)s)")
    parser.add_argument("--set", metavar="NAME=VALUE", action="append", default=[],
                        dest="assignments", help="override a hyperparameter (repeatable)")
    parser.add_argument("--port", type=int, default=0,
                        help="port for the local server (default: a free one)")
    parser.add_argument("--no-serve", action="store_true",
                        help="stop after the pipeline (no server, no prediction)")


def _submit_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "The parameters file is a YAML mapping of pipeline parameters: hyperparameters\n"
        "(num_classes, num_training_samples, backbone, ...) and the others (train,\n"
        "validation, ..., output_root, min_miou, endpoint_name, ...). It is checked before\n"
        "anything is sent. Example:\n\n"
        "  num_classes: 11\n  num_training_samples: 367\n  backbone: resnet-50\n"
        "  train: s3://data/camvid/train\n  train_annotation: s3://data/camvid/train_annotation\n"
        "  validation: s3://data/camvid/validation\n"
        "  validation_annotation: s3://data/camvid/validation_annotation\n"
        "  output_root: s3://kubeseg/runs\n  min_miou: 0.5\n")
    parser.add_argument("--host", required=True,
                        help="KFP API server, e.g. http://localhost:8080 (port-forwarded "
                             "ml-pipeline-ui) or https://kubeflow.example.com/pipeline")
    parser.add_argument("--parameters", required=True, metavar="FILE.yaml",
                        help="pipeline parameters (YAML mapping; path or s3:// URI)")
    parser.add_argument("--experiment", default="kubeseg",
                        help="experiment name, created when missing (default: %(default)s)")
    parser.add_argument("--run-name", help="run (or recurring run) name")
    parser.add_argument("--schedule", metavar="CRON",
                        help="create a recurring run instead: cron with 5 fields "
                             "('0 3 * * 1') or KFP's 6 (seconds first)")
    parser.add_argument("--token", default=None,
                        help=f"bearer token (default: ${TOKEN_ENV}, else the service-account "
                             f"token file ${SA_TOKEN_PATH_ENV} when running in a pod)")
    parser.add_argument("--namespace", help="Kubeflow profile namespace (multi-user "
                                            "deployments)")
    parser.add_argument("--service-account", help="service account the run's pods use")
    parser.add_argument("--pipeline-file", metavar="FILE.yaml",
                        help="compiled pipeline (default: the packaged "
                             "pipelines/segmentation.yaml)")
    parser.add_argument("--check-only", action="store_true",
                        help="check the parameters and print them; send nothing")


def run(args: argparse.Namespace) -> int:
    if args.verb == "compile":
        return _compile(args)
    if args.verb == "submit":
        return _submit(args)
    return _run_local(args)


# -- compile ---------------------------------------------------------------------------------
def _compile(args: argparse.Namespace) -> int:
    from pipelines.batch_predict import compile_pipeline as compile_batch_predict
    from pipelines.segmentation import compile_pipeline

    path = Path(args.output) if args.output else compiled_pipeline_path()
    compile_pipeline(str(path))
    print(f"compiled pipeline written to {path}")
    batch_path = path.with_name("batch_predict.yaml")  # beside the training pipeline
    compile_batch_predict(str(batch_path))
    print(f"compiled batch prediction pipeline written to {batch_path}")
    return 0


# -- submit ----------------------------------------------------------------------------------
def pipeline_arguments(values: Mapping[str, Any]) -> Dict[str, Any]:
    """Check a parameters mapping and return the pipeline arguments to send.

    Hyperparameters are checked with :class:`kubeseg.config.Hyperparameters` (every problem at
    once); the other names must be pipeline parameters of the right type. Raises ConfigError.
    """
    import difflib

    from kubeseg.config import Hyperparameters
    from kubeseg.errors import ConfigError
    from pipelines.segmentation import OTHER_PARAMETERS

    if not isinstance(values, Mapping):
        raise ConfigError(["the parameters file must hold a YAML mapping of name: value"],
                          what="parameter")
    specs = Hyperparameters.specs()
    others = {name: kind for name, kind, _, _ in OTHER_PARAMETERS}
    problems = []
    hp_values = {k: v for k, v in values.items() if k in specs}
    arguments: Dict[str, Any] = {}
    for name, value in values.items():
        if name in specs:
            continue
        if name not in others:
            close = difflib.get_close_matches(name, list(specs) + list(others), n=1)
            problems.append(f"unknown pipeline parameter '{name}'"
                            + (f"; did you mean '{close[0]}'?" if close else ""))
            continue
        converted = _convert(others[name], value)
        if converted is None:
            problems.append(f"{name}={value!r}: expected {others[name].__name__}")
        else:
            arguments[name] = converted
    try:
        hp = Hyperparameters.from_dict(hp_values)
    except ConfigError as exc:
        problems.extend(exc.problems)
        hp = None
    for name in ("min_miou", "max_regression"):
        if name in arguments and not 0.0 <= arguments[name] <= 1.0:
            problems.append(f"{name}={arguments[name]}: allowed range is [0, 1]")
    if problems:
        raise ConfigError(problems, what="pipeline parameter")
    checked = hp.to_dict()
    for name in hp_values:
        value = checked[name]
        arguments[name] = ", ".join(map(str, value)) if isinstance(value, list) else value
    return arguments


def _convert(kind: type, value: Any) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        return {"true": True, "false": False}.get(text)
    if kind is str:
        return "" if value is None else str(value)
    try:
        number = kind(value)
    except (TypeError, ValueError):
        return None
    if kind is int and isinstance(value, float) and not value.is_integer():
        return None
    return number


def kfp_cron(expression: str) -> str:
    """KFP wants 6 cron fields (seconds first); 5-field cron gets ``0`` seconds."""
    from kubeseg.errors import ConfigError

    fields = expression.split()
    if len(fields) == 5:
        return " ".join(["0", *fields])
    if len(fields) == 6:
        return " ".join(fields)
    raise ConfigError([f"--schedule {expression!r}: expected 5 cron fields (minute hour day "
                       "month weekday) or 6 (seconds first)"], what="option")


def check_server(host: str, token: Optional[str], timeout_s: float = 10.0) -> None:
    """GET the API server's healthz once, with a clear error when it cannot be reached."""
    import urllib.error
    import urllib.request

    from kubeseg.errors import KubesegError

    url = host.rstrip("/") + HEALTHZ_PATH
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            response.read()
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            raise KubesegError(f"the Kubeflow Pipelines API at {host} refused the request "
                               f"({exc.code}): give a valid token with --token or "
                               f"${TOKEN_ENV}") from None
        raise KubesegError(f"the Kubeflow Pipelines API at {host} answered GET {HEALTHZ_PATH} "
                           f"with {exc.code} {exc.reason}: check --host (it must point at the "
                           "KFP API, e.g. http://localhost:8080 after 'kubectl port-forward "
                           "-n kubeflow svc/ml-pipeline-ui 8080:80')") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise KubesegError(f"cannot reach the Kubeflow Pipelines API at {host} (GET "
                           f"{HEALTHZ_PATH}: {reason}): check --host and that the server is "
                           "running, e.g. 'kubectl port-forward -n kubeflow "
                           "svc/ml-pipeline-ui 8080:80' then --host http://localhost:8080") \
            from None


def _service_account_token() -> Optional[str]:
    path = Path(os.environ.get(SA_TOKEN_PATH_ENV, DEFAULT_SA_TOKEN_PATH))
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def _submit(args: argparse.Namespace) -> int:
    import yaml

    from kubeseg import storage
    from kubeseg.errors import KubesegError

    try:
        values = yaml.safe_load(storage.read_text(args.parameters)) or {}
    except yaml.YAMLError as exc:
        raise KubesegError(f"--parameters {args.parameters} is not valid YAML: {exc}") from None
    arguments = pipeline_arguments(values)
    cron = kfp_cron(args.schedule) if args.schedule else None
    pipeline_file = args.pipeline_file or str(compiled_pipeline_path())
    if not Path(pipeline_file).is_file():
        raise KubesegError(f"--pipeline-file {pipeline_file}: no such file (run 'kubeseg "
                           "compile')")
    if args.check_only:
        print(yaml.safe_dump(arguments, sort_keys=True), end="")
        return 0
    token = args.token or os.environ.get(TOKEN_ENV) or _service_account_token()
    check_server(args.host, token)

    import kfp

    try:
        client = kfp.Client(host=args.host, existing_token=token,
                            namespace=args.namespace or "kubeflow")
        name = args.run_name or f"kubeseg-{Path(args.parameters).stem}"
        if cron:
            experiment = client.create_experiment(args.experiment, namespace=args.namespace)
            job = client.create_recurring_run(
                experiment_id=experiment.experiment_id, job_name=name, cron_expression=cron,
                params=arguments, pipeline_package_path=pipeline_file,
                service_account=args.service_account)
            print(f"recurring run {job.recurring_run_id} ({cron}) created in experiment "
                  f"'{args.experiment}' on {args.host}")
            return 0
        result = client.create_run_from_pipeline_package(
            pipeline_file, arguments=arguments, run_name=name,
            experiment_name=args.experiment, namespace=args.namespace,
            service_account=args.service_account)
    except KubesegError:
        raise
    except Exception as exc:  # the API's exceptions carry the server's reason
        raise KubesegError(f"the Kubeflow Pipelines API at {args.host} rejected the "
                           f"submission: {exc}") from None
    print(f"run {result.run_id} created in experiment '{args.experiment}' on {args.host}")
    return 0


# -- run (local) -----------------------------------------------------------------------------
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _newest_run_dir(pipeline_root: Path, name: str) -> Path:
    from kubeseg.errors import KubesegError

    runs = sorted(pipeline_root.glob(f"{name}-*"), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise KubesegError(f"no pipeline run found under {pipeline_root}")
    return runs[-1]


def _task_outputs(run_dir: Path, task: str) -> Dict[str, Any]:
    import json

    path = run_dir / task / "executor_output.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _artifact_metadata(outputs: Mapping[str, Any], name: str) -> Dict[str, Any]:
    artifacts = (outputs.get("artifacts") or {}).get(name, {}).get("artifacts") or [{}]
    return dict(artifacts[0].get("metadata") or {})


def _run_local(args: argparse.Namespace) -> int:
    import time

    from kfp import local

    from kubeseg import storage
    from kubeseg.config import Hyperparameters, parse_assignments
    from kubeseg.data.synthetic import class_names as shape_names
    from kubeseg.data.synthetic import make_shapes_dataset
    from kubeseg.errors import ConfigError
    from pipelines.segmentation import PIPELINE_NAME, segmentation_pipeline

    started = time.perf_counter()
    workdir = Path(args.workdir).resolve()
    hp_values = {**SAMPLE_HYPERPARAMETERS, "num_classes": args.num_classes,
                 "num_training_samples": args.images, "epochs": args.epochs,
                 "base_size": args.size, "crop_size": args.size,
                 **parse_assignments(args.assignments)}
    hp = Hyperparameters.from_dict(hp_values)  # fail before generating anything
    if args.images < 1 or args.validation_images < 1:
        raise ConfigError(["--images and --validation-images must be >= 1"], what="option")

    data_root = workdir / "data"
    channels = make_shapes_dataset(data_root, n_train=args.images,
                                   n_val=args.validation_images, size=args.size,
                                   num_classes=hp.num_classes, seed=hp.seed)
    output_root = str(workdir / "work")
    if args.s3_endpoint:
        os.environ["KUBESEG_S3_ENDPOINT"] = args.s3_endpoint  # read by every pipeline step
        bucket = f"s3://{args.bucket}"
        storage.ensure_bucket(bucket)
        storage.upload_prefix(str(data_root), storage.join(bucket, "data"))
        channels = {k: storage.join(bucket, "data", Path(v).name) for k, v in channels.items()}
        output_root = storage.join(bucket, "work")
    names = shape_names(hp.num_classes)
    pipeline_root = workdir / "pipeline"
    pipeline_root.mkdir(parents=True, exist_ok=True)
    logger.info("running the pipeline with kfp.local: %d training / %d validation images of "
                "%d px, %s/%s, %d epochs; artifacts in %s", args.images,
                args.validation_images, args.size, hp.algorithm, hp.backbone, hp.epochs,
                pipeline_root)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root))
    arguments = {name: (", ".join(map(str, v)) if isinstance(v, list) else v)
                 for name, v in hp.to_dict().items()}
    segmentation_pipeline(
        **arguments, **channels, class_names=",".join(names), output_root=output_root,
        min_miou=args.min_miou, deploy_dry_run=True, endpoint_name="kubeseg-sample")
    pipeline_seconds = time.perf_counter() - started

    run_dir = _newest_run_dir(pipeline_root, PIPELINE_NAME)
    model_dir = run_dir / "train" / "model"
    train_meta = _artifact_metadata(_task_outputs(run_dir, "train"), "model")
    eval_meta = _artifact_metadata(_task_outputs(run_dir, "evaluate"), "metrics")
    work_uri = str(train_meta.get("uri", "")).rsplit("/train/", 1)[0]
    lines = [
        "",
        f"kubeseg run: pipeline finished in {pipeline_seconds:.0f} s",
        f"  dataset (generated)     {channels['train'].rsplit('/', 1)[0]}",
        f"  kfp.local artifacts     {run_dir}",
        f"  model (KFP artifact)    {model_dir}",
        f"  model (work copy)       {train_meta.get('uri', '?')}",
        f"  checkpoints, metrics    {storage.join(work_uri, 'train')}",
        f"  evaluation report       {storage.join(work_uri, 'evaluation', 'report.html')}",
        f"  validation mIoU         {eval_meta.get('mIOU', float('nan')):.4f}",
        f"  quality gate            {eval_meta.get('gate_reason', '?')}",
    ]
    deploy_dir = run_dir / "deploy"
    if deploy_dir.is_dir():
        lines.append(f"  InferenceService (dry)  {deploy_dir / 'inference_service'}")
    else:
        lines.append("  InferenceService        not rendered (the quality gate failed)")
    if not args.no_serve:
        lines += _serve_and_predict(model_dir, channels, workdir / "prediction",
                                    hp.num_classes, args.port or _free_port())
    lines.append(f"  total time              {time.perf_counter() - started:.0f} s")
    print("\n".join(lines))
    return 0


def _serve_and_predict(model_dir: Path, channels: Mapping[str, str], out_dir: Path,
                       num_classes: int, port: int) -> list:
    """Start ``kubeseg serve`` on 127.0.0.1, send one validation image, write the PNGs."""
    import io
    import urllib.request

    import numpy as np
    from PIL import Image

    from kubeseg import report, storage
    from kubeseg.serving.process import model_server

    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / "server.log"
    with model_server(str(model_dir), port, log_path=log_path) as server:
        base = server.url
        images_uri = channels["validation"]
        key = sorted(storage.list_files(images_uri))[0]
        image_bytes = storage.read_bytes(storage.join(images_uri, key))
        request = urllib.request.Request(
            base + "/invocations", data=image_bytes, method="POST",
            headers={"Content-Type": "image/jpeg", "Accept": "image/png"})
        with urllib.request.urlopen(request, timeout=120) as response:
            mask_png = response.read()

    stem = Path(key).stem
    mask = np.asarray(Image.open(io.BytesIO(mask_png)))
    image = Image.open(io.BytesIO(image_bytes)).convert("RGB")
    truth_uri = storage.join(channels["validation_annotation"], f"{stem}.png")
    truth = np.asarray(Image.open(io.BytesIO(storage.read_bytes(truth_uri))))
    agreement = float((mask == truth).mean()) if truth.shape == mask.shape else float("nan")
    colours = report.palette(num_classes)
    mask_path, colour_path, overlay_path = (out_dir / f"{stem}_mask.png",
                                            out_dir / f"{stem}_mask_color.png",
                                            out_dir / f"{stem}_overlay.png")
    storage.write_bytes(str(mask_path), mask_png)
    for path, picture in ((colour_path, Image.fromarray(report.colorize(mask, colours))),
                          (overlay_path, report.overlay(image, mask, colours, alpha=0.5))):
        storage.write_bytes(str(path), report.png_bytes(picture))
    return [
        f"  served on               {base} (POST /invocations, stopped)",
        f"  sent                    {storage.join(images_uri, key)}",
        f"  predicted mask (ids)    {mask_path}",
        f"  predicted mask (colour) {colour_path}",
        f"  overlay                 {overlay_path}",
        f"  pixels matching truth   {agreement:.1%}",
        f"  server log              {log_path}",
    ]
