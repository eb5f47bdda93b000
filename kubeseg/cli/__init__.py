"""``kubeseg <verb>``: every step of the pipeline, runnable without Kubeflow.

Each verb group is a module of this package exposing ``add_arguments(parser, verb)`` and
``run(args) -> int``, imported here by name. Those modules import only light things at the top
(argparse, kubeseg.config); torch, kfp and the rest are imported inside ``run``, so
``kubeseg --help`` stays fast. Only the pipeline verbs (``kubeseg.cli.pipeline``) reach into the
``kubeseg_platform.pipelines`` package, inside their functions.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional

from kubeseg.cli import (data, deploy, evaluate, hyperparameters, pipeline, preflight, predict,
                         serve, train, tune)
from kubeseg.cli.options import STORAGE_VERBS, add_storage_arguments
from kubeseg.errors import KubesegError, user_message
from kubeseg.storage_deadline import command_deadline

# verb -> (module implementing it, one-line summary)
VERBS = {
    "validate": (data, "Check a four-channel dataset and write a report."),
    "ingest": (data, "Turn an augmented manifest (or channels) into Parquet shards."),
    "train": (train, "Train a model; checkpoints every epoch, resumes after restarts."),
    "evaluate": (evaluate, "Score a model artifact: mIoU, confusion matrix, report, gate."),
    "tune": (tune, "Search hyperparameters: a Katib Experiment, or --local with Optuna."),
    "predict": (predict, "Batch prediction: one mask or probability file per image under a "
                         "prefix."),
    "serve": (serve, "Serve a model over HTTP (SageMaker-style and Open Inference v2)."),
    "export": (serve, "Add an ONNX export (model.onnx) to a model artifact."),
    "quantize": (serve, "Add an int8 model, calibrated and checked against float32."),
    "deploy": (deploy, "Deploy a model as a KServe InferenceService (or --dry-run)."),
    "run": (pipeline, "Run the whole pipeline locally with kfp.local on a sample."),
    "compile": (pipeline, "Compile the Kubeflow pipeline to YAML."),
    "submit": (pipeline, "Submit the pipeline to a Kubeflow Pipelines server."),
    "retrain-on-alert": (pipeline, "Alertmanager webhook: a firing drift alert submits one "
                                   "retraining run."),
    "preflight": (preflight, "Check a cluster before the first pipeline run (reads only)."),
    "hyperparameters": (hyperparameters, "Print the hyperparameter table, or --check a JSON "
                                         "file."),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kubeseg",
        description="Kubeflow-native semantic segmentation: validate, train, evaluate, serve "
                    "and deploy segmentation models, locally or on Kubernetes.",
        epilog="Run 'kubeseg VERB --help' for the options of a verb.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for verb, (module, summary) in VERBS.items():
        p = sub.add_parser(verb, help=summary, description=summary)
        p.set_defaults(_run=module.run)
        module.add_arguments(p, verb)
        if verb in STORAGE_VERBS:
            add_storage_arguments(p)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verb:
        parser.print_help()
        return 2
    try:
        # one storage deadline for the whole verb (see kubeseg.storage_deadline)
        with command_deadline(getattr(args, "s3_timeout", None)):
            return int(args._run(args) or 0)
    except KubesegError as exc:
        logging.getLogger(__name__).debug("kubeseg %s failed", args.verb, exc_info=True)
        print(f"kubeseg {args.verb}: error: {user_message(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"kubeseg {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
