"""``kubeseg run``, ``kubeseg compile`` and ``kubeseg submit``: the Kubeflow pipeline from the CLI.

- ``run``: the whole pipeline on this machine with ``kfp.local`` on a generated sample dataset
  (coloured shapes), then the trained model served on 127.0.0.1, one image sent to it, and the
  predicted mask and an overlay written as PNG files (``pipelines/local_run.py``); with
  ``--runner docker`` every step runs in its container image.
- ``compile``: regenerate ``pipelines/segmentation.yaml`` and the kustomize images component,
  with the image registry and tag given (``pipelines/compile.py``).
- ``submit``: create a run (or a recurring run) on a Kubeflow Pipelines API server from a
  parameters YAML file, checked before anything is sent (``pipelines/submit.py``).
- ``retrain-on-alert``: the Alertmanager webhook of drift monitoring
  (:mod:`kubeseg.monitoring.receiver`); each drift episode submits one run, as ``submit``
  does, with the champion gate.

This module holds only the options; the work is done by the ``kubeseg_platform.pipelines``
package (the repository's ``pipelines/`` folder), imported inside the functions below (the core
library never imports it, nor kfp).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from kubeseg.pipeline_auth import SA_TOKEN_PATH_ENV, TOKEN_ENV

DEFAULT_WORKDIR = "kubeseg-run"
DEFAULT_BUCKET = "kubeseg-run"


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
        parser.add_argument("--kfp-backend", metavar="VERSION", default=None,
                            help="Kubeflow Pipelines backend release the cluster runs: fields "
                                 "of the Kubernetes settings newer than it are left out, or "
                                 "compiling fails naming the release they need (default: the "
                                 "oldest supported, "
                                 f"{_lowest_kfp_backend()})")
        parser.add_argument("--manifests", metavar="DIR",
                            help="kustomize tree whose components/images/kustomization.yaml "
                                 "gets the same image names (default: the manifests/ folder "
                                 "beside the pipelines package, when there)")
    elif verb == "submit":
        _submit_arguments(parser)
    elif verb == "retrain-on-alert":
        _retrain_arguments(parser)


def _lowest_kfp_backend() -> str:
    from kubeseg.versions import KFP_BACKEND_LOWEST

    return KFP_BACKEND_LOWEST


def _image_arguments(parser: argparse.ArgumentParser) -> None:
    from kubeseg import images

    parser.add_argument("--registry", help=f"registry of kubeseg's images (default: "
                                           f"${images.REGISTRY_ENV}, else "
                                           f"{images.DEFAULT_REGISTRY})")
    parser.add_argument("--tag", help=f"tag of kubeseg's images (default: ${images.TAG_ENV}, "
                                      "else the kubeseg version)")


def _run_arguments(parser: argparse.ArgumentParser) -> None:
    from kubeseg.config import Hyperparameters, PipelineParameters

    specs = {**Hyperparameters.specs(), **PipelineParameters.specs()}
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
                        help=f"classes, background included, {specs['num_classes'].describe()} "
                             "(default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=8, help="(default: %(default)s)")
    parser.add_argument("--min-miou", type=float, default=0.5,
                        help=f"quality gate before the (dry-run) deploy step, "
                             f"{specs['min_miou'].describe()} (default: %(default)s)")
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
    _kfp_arguments(parser, "the run")
    parser.add_argument("--schedule", metavar="CRON",
                        help="create a recurring run instead: cron with 5 fields "
                             "('0 3 * * 1') or KFP's 6 (seconds first)")
    parser.add_argument("--check-only", action="store_true",
                        help="check the parameters and print them; send nothing")


def _kfp_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    """Where and what ``submit`` and ``retrain-on-alert`` send (``what``: for the help)."""
    retrain = what != "the run"
    parser.add_argument("--host", required=not retrain,
                        help="KFP API server, e.g. http://localhost:8080 (port-forwarded "
                             "ml-pipeline-ui) or https://kubeflow.example.com/pipeline"
                             + (" (required unless --dry-run)" if retrain else ""))
    parser.add_argument("--parameters", required=True, metavar="FILE.yaml",
                        help="pipeline parameters (YAML mapping; path or s3:// URI)")
    parser.add_argument("--experiment", default="kubeseg-drift" if retrain else "kubeseg",
                        help="experiment name, created when missing (default: %(default)s)")
    if not retrain:
        parser.add_argument("--run-name", help="run (or recurring run) name")
    parser.add_argument("--token", default=None,
                        help=f"bearer token (default: ${TOKEN_ENV}, else the service-account "
                             f"token file ${SA_TOKEN_PATH_ENV} when running in a pod)")
    parser.add_argument("--namespace", help="Kubeflow profile namespace of " + what
                        + " (multi-user deployments)")
    parser.add_argument("--service-account", help=f"service account the pods of {what} use")
    parser.add_argument("--pipeline-file", metavar="FILE.yaml",
                        help="compiled pipeline (default: the packaged "
                             "pipelines/segmentation.yaml)")


def _retrain_arguments(parser: argparse.ArgumentParser) -> None:
    from kubeseg.monitoring.receiver import ALERTS_PATH, DEFAULT_COOLDOWN_S

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        f"Alertmanager sends the drift alerts (label kubeseg_drift=\"true\") to POST "
        f"{ALERTS_PATH}.\n"
        "Each drift episode of an alert group submits one run of the pipeline with\n"
        "--parameters (read again for every run, so a GitOps edit takes effect); repeats of\n"
        "the same episode and runs within --cooldown of the last one are logged and skipped.\n"
        "The parameters must keep the champion gate: champion_uri (default\n"
        "s3://kubeseg/models/champion) or previous_metrics_uri. Example:\n\n"
        "  kubeseg retrain-on-alert --host http://ml-pipeline.kubeflow.svc:8888 \\\n"
        "    --parameters parameters.yaml --namespace kubeflow-user --bind 0.0.0.0 \\\n"
        "    --state s3://kubeseg/monitoring/retrain-on-alert.json")
    _kfp_arguments(parser, "the retraining runs")
    group = parser.add_argument_group("webhook")
    group.add_argument("--bind", default="127.0.0.1",
                       help="address to listen on (default: %(default)s; 0.0.0.0 in a pod)")
    group.add_argument("--port", type=int, default=8080, help="(default: %(default)s)")
    group.add_argument("--cooldown", default=f"{DEFAULT_COOLDOWN_S // 3600}h",
                       metavar="DURATION", help="least time between two runs: seconds, or "
                                                "a number with s, m, h or d (default: "
                                                "%(default)s)")
    group.add_argument("--state", metavar="URI",
                       help="file or s3:// object keeping the episodes that started a run and "
                            "the last run's time across restarts (default: memory only)")
    group.add_argument("--dry-run", metavar="DIR",
                       help="send nothing: write each submission it would make to "
                            "DIR/<run name>.json (folder or s3:// prefix)")


def run(args: argparse.Namespace) -> int:
    if args.verb == "submit":
        return _submit(args)
    if args.verb == "retrain-on-alert":
        return _retrain_on_alert(args)
    from kubeseg_platform.pipelines.settings import use_images

    use_images(args.registry, args.tag)  # before the pipeline modules are imported
    if args.verb == "compile":
        return _compile(args)
    return _run_local(args)


def _compile(args: argparse.Namespace) -> int:
    from kubeseg_platform.pipelines.compile import compile_all
    from kubeseg_platform.pipelines.settings import use_settings

    use_settings(args.shm_size, args.step_timeout, args.train_timeout)
    print("\n".join(compile_all(args.output, args.manifests, args.kfp_backend)))
    return 0


def _submit(args: argparse.Namespace) -> int:
    from kubeseg_platform.pipelines.submit import SubmitOptions, submit

    print(submit(SubmitOptions(
        host=args.host, parameters=args.parameters, experiment=args.experiment,
        run_name=args.run_name, schedule=args.schedule, token=args.token,
        namespace=args.namespace, service_account=args.service_account,
        pipeline_file=args.pipeline_file, check_only=args.check_only)))
    return 0


DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str, option: str) -> float:
    """``"90"``, ``"90s"``, ``"30m"``, ``"6h"``, ``"1d"`` -> seconds; ConfigError naming
    ``option`` otherwise."""
    from kubeseg.errors import ConfigError

    value = str(text).strip().lower()
    unit = DURATION_UNITS.get(value[-1:], None)
    number = value[:-1] if unit else value
    try:
        seconds = float(number) * (unit or 1)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0 or seconds == float("inf"):
        raise ConfigError([f"{option} {text!r}: expected seconds or a number with s, m, h or d "
                           "(e.g. 6h)"], what="option")
    return seconds


def _retrain_on_alert(args: argparse.Namespace) -> int:
    from kubeseg.errors import ConfigError
    from kubeseg.monitoring.receiver import RetrainReceiver, serve
    from kubeseg_platform.pipelines.submit import (SubmitOptions, gated_parameters,
                                                   submit_retraining)

    if not args.host and not args.dry_run:
        raise ConfigError(["--host is required (the Kubeflow Pipelines API server), unless "
                           "--dry-run DIR"], what="option")
    cooldown = parse_duration(args.cooldown, "--cooldown")
    gated_parameters(args.parameters)  # refuse bad parameters before listening
    options = SubmitOptions(
        host=args.host or "", parameters=args.parameters, experiment=args.experiment,
        token=args.token, namespace=args.namespace, service_account=args.service_account,
        pipeline_file=args.pipeline_file)
    receiver = RetrainReceiver(lambda request: submit_retraining(options, request, args.dry_run),
                               cooldown_s=cooldown, state_uri=args.state)
    serve(receiver, args.bind, args.port)
    return 0


def _run_local(args: argparse.Namespace) -> int:
    from kubeseg_platform.pipelines.local_run import LocalRunOptions, run_local

    result = run_local(LocalRunOptions(
        workdir=Path(args.workdir), num_images=args.images,
        num_validation_images=args.validation_images, size=args.size,
        num_classes=args.num_classes, epochs=args.epochs, min_miou=args.min_miou,
        assignments=tuple(args.assignments), s3_endpoint=args.s3_endpoint, bucket=args.bucket,
        runner=args.runner, serve=not args.no_serve, port=args.port,
        verbose=bool(getattr(args, "verbose", False))))
    print("\n".join(result.summary()))
    return 0
