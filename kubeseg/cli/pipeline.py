"""``kubeseg run``, ``kubeseg compile`` and ``kubeseg submit``: the Kubeflow pipeline from the CLI.

- ``run``: the whole pipeline on this machine with ``kfp.local`` on a generated sample dataset
  (coloured shapes), then the trained model served on 127.0.0.1, one image sent to it, and the
  predicted mask and an overlay written as PNG files (``pipelines/local_run.py``); with
  ``--runner docker`` every step runs in its container image.
- ``compile``: regenerate ``pipelines/segmentation.yaml`` and the kustomize images component,
  with the image registry and tag given (``pipelines/compile.py``).
- ``submit``: create a run (or a recurring run) on a Kubeflow Pipelines API server from a
  parameters YAML file, checked before anything is sent (``pipelines/submit.py``).

This module holds only the options; the work is done by the ``pipelines`` package, imported
inside the functions below (the core library never imports it, nor kfp).
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
    from pipelines.settings import use_images

    if args.verb == "submit":
        return _submit(args)
    use_images(args.registry, args.tag)  # before the pipeline modules are imported
    if args.verb == "compile":
        return _compile(args)
    return _run_local(args)


def _compile(args: argparse.Namespace) -> int:
    from pipelines.compile import compile_all
    from pipelines.settings import use_settings

    use_settings(args.shm_size, args.step_timeout, args.train_timeout)
    print("\n".join(compile_all(args.output, args.manifests)))
    return 0


def _submit(args: argparse.Namespace) -> int:
    from pipelines.submit import SubmitOptions, submit

    print(submit(SubmitOptions(
        host=args.host, parameters=args.parameters, experiment=args.experiment,
        run_name=args.run_name, schedule=args.schedule, token=args.token,
        namespace=args.namespace, service_account=args.service_account,
        pipeline_file=args.pipeline_file, check_only=args.check_only)))
    return 0


def _run_local(args: argparse.Namespace) -> int:
    from pipelines.local_run import LocalRunOptions, run_local

    lines = run_local(LocalRunOptions(
        workdir=Path(args.workdir), num_images=args.images,
        num_validation_images=args.validation_images, size=args.size,
        num_classes=args.num_classes, epochs=args.epochs, min_miou=args.min_miou,
        assignments=tuple(args.assignments), s3_endpoint=args.s3_endpoint, bucket=args.bucket,
        runner=args.runner, serve=not args.no_serve, port=args.port,
        verbose=bool(getattr(args, "verbose", False))))
    print("\n".join(lines))
    return 0
