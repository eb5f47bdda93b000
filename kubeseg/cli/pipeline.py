"""``kubeseg run``, ``kubeseg compile`` and ``kubeseg submit``: the Kubeflow pipeline from the CLI.

- ``run``: the whole pipeline on this machine with ``kfp.local`` on a generated sample dataset
  (coloured shapes), then the trained model served on 127.0.0.1, one image sent to it, and the
  predicted mask and an overlay written as PNG files (``pipelines/local_run.py``); with
  ``--runner docker`` every step runs in its container image.
- ``compile``: regenerate ``pipelines/segmentation.yaml`` and the kustomize images component,
  with the image registry and tag given (``kubeseg.images``).
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
IMAGES_COMPONENT = Path("components") / "images" / "kustomization.yaml"  # below manifests/
TOKEN_ENV = "KF_PIPELINES_TOKEN"
# In a pod, KFP's projected service-account token (audience pipelines.kubeflow.org).
SA_TOKEN_PATH_ENV = "KF_PIPELINES_SA_TOKEN_PATH"
DEFAULT_SA_TOKEN_PATH = "/var/run/secrets/kubeflow/pipelines/token"
HEALTHZ_PATH = "/apis/v2beta1/healthz"

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
        _image_arguments(parser)
        parser.add_argument("--shm-size", metavar="QUANTITY",
                            help="memory-backed /dev/shm of the data-loading steps and training "
                                 "pods (default: $KUBESEG_SHM_SIZE, else 8Gi)")
        parser.add_argument("--step-timeout", type=int, metavar="SECONDS",
                            help="how long a step other than training may run (default: "
                                 "$KUBESEG_STEP_TIMEOUT, else 6 h)")
        parser.add_argument("--train-timeout", type=int, metavar="SECONDS",
                            help="how long training may run (default: $KUBESEG_TRAIN_TIMEOUT, "
                                 "else 7 days)")
        parser.add_argument("--manifests", metavar="DIR",
                            help="kustomize tree whose components/images/kustomization.yaml "
                                 "gets the same image names (default: the manifests/ folder "
                                 "beside the pipelines package, when there)")
    elif verb == "submit":
        _submit_arguments(parser)


def _image_arguments(parser: argparse.ArgumentParser) -> None:
    from kubeseg import images

    parser.add_argument("--registry", help=f"registry of kubeseg's images (default: "
                                           f"${images.REGISTRY_ENV}, else "
                                           f"{images.DEFAULT_REGISTRY})")
    parser.add_argument("--tag", help=f"tag of kubeseg's images (default: ${images.TAG_ENV}, "
                                      "else the kubeseg version)")


def _use_images(args: argparse.Namespace):
    """Put the chosen registry and tag in force for the pipeline modules imported after this."""
    import sys

    from kubeseg import images
    from kubeseg.errors import KubesegError

    chosen = images.configured(getattr(args, "registry", None), getattr(args, "tag", None))
    os.environ[images.REGISTRY_ENV], os.environ[images.TAG_ENV] = chosen.registry, chosen.tag
    loaded = sys.modules.get("components.images")
    if loaded is not None and loaded.IMAGES != chosen:
        raise KubesegError(f"the pipeline was already imported with images of "
                           f"{loaded.IMAGES.registry} (tag {loaded.IMAGES.tag}); run this "
                           "command in a fresh process")
    return chosen


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
    parser.add_argument("--runner", choices=("subprocess", "docker"), default="subprocess",
                        help="subprocess: steps run as local processes (default); docker: "
                             "every step runs in the trainer image and the model is served "
                             "from the predictor image (docker, or podman's Docker API; "
                             "needs --s3-endpoint)")
    _image_arguments(parser)
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
def _use_settings(args: argparse.Namespace) -> None:
    """Put --shm-size / --step-timeout / --train-timeout in force for the pipeline module."""
    from pipelines.settings import SHM_SIZE_ENV, STEP_TIMEOUT_ENV, TRAIN_TIMEOUT_ENV

    for value, name in ((args.shm_size, SHM_SIZE_ENV), (args.step_timeout, STEP_TIMEOUT_ENV),
                        (args.train_timeout, TRAIN_TIMEOUT_ENV)):
        if value is not None:
            os.environ[name] = str(value)


def _compile(args: argparse.Namespace) -> int:
    from kubeseg import images, storage

    chosen = _use_images(args)
    _use_settings(args)
    from pipelines.batch_predict import compile_pipeline as compile_batch_predict
    from pipelines.segmentation import compile_pipeline

    path = Path(args.output) if args.output else compiled_pipeline_path()
    compile_pipeline(str(path))
    print(f"compiled pipeline written to {path} (images {chosen.registry}/*:{chosen.tag})")
    batch_path = path.with_name("batch_predict.yaml")  # beside the training pipeline
    compile_batch_predict(str(batch_path))
    print(f"compiled batch prediction pipeline written to {batch_path}")
    manifests = Path(args.manifests) if args.manifests else default_manifests_dir()
    if manifests is not None:
        target = manifests / IMAGES_COMPONENT
        if not target.parent.is_dir():
            from kubeseg.errors import KubesegError

            raise KubesegError(f"--manifests {manifests}: no {IMAGES_COMPONENT.parent} folder "
                               "(give the manifests/ folder of a kubeseg checkout)")
        storage.write_text(str(target), images.kustomize_component(chosen))
        print(f"kustomize images written to {target}")
    return 0


def default_manifests_dir() -> Optional[Path]:
    """The manifests/ folder of the checkout the pipelines package lives in, if any."""
    folder = compiled_pipeline_path().parents[1] / "manifests"
    return folder if (folder / IMAGES_COMPONENT).parent.is_dir() else None


# -- submit ----------------------------------------------------------------------------------
def pipeline_arguments(values: Mapping[str, Any]) -> Dict[str, Any]:
    """Check a parameters mapping and return the pipeline arguments to send.

    Hyperparameters are checked with :class:`kubeseg.config.Hyperparameters`, the other
    parameters with :class:`kubeseg.config.PipelineParameters` (every problem at once); only
    the names given are sent. Raises ConfigError.
    """
    import difflib

    from kubeseg.config import Hyperparameters, PipelineParameters
    from kubeseg.errors import ConfigError

    if not isinstance(values, Mapping):
        raise ConfigError(["the parameters file must hold a YAML mapping of name: value"],
                          what="parameter")
    declarations = (Hyperparameters, PipelineParameters)
    given = [{k: v for k, v in values.items() if k in d.specs()} for d in declarations]
    known = [name for d in declarations for name in d.specs()]
    problems = []
    for name in values:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            problems.append(f"unknown pipeline parameter '{name}'"
                            + (f"; did you mean '{close[0]}'?" if close else ""))
    checked = []
    for declaration, subset in zip(declarations, given):
        try:
            checked.append(declaration.from_dict(subset).to_dict())
        except ConfigError as exc:
            problems.extend(exc.problems)
    if problems:
        raise ConfigError(problems, what="pipeline parameter")
    arguments: Dict[str, Any] = {}
    for subset, values_checked in zip(given, checked):
        for name in subset:
            value = values_checked[name]
            arguments[name] = ", ".join(map(str, value)) if isinstance(value, list) else value
    return arguments


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
def _run_local(args: argparse.Namespace) -> int:
    from pipelines.local_run import LocalRunOptions, run_local

    _use_images(args)
    lines = run_local(LocalRunOptions(
        workdir=Path(args.workdir), num_images=args.images,
        num_validation_images=args.validation_images, size=args.size,
        num_classes=args.num_classes, epochs=args.epochs, min_miou=args.min_miou,
        assignments=tuple(args.assignments), s3_endpoint=args.s3_endpoint, bucket=args.bucket,
        runner=args.runner, serve=not args.no_serve, port=args.port,
        verbose=bool(getattr(args, "verbose", False))))
    print("\n".join(lines))
    return 0
