"""``kubeseg <verb>``: every step of the pipeline, runnable without Kubeflow.

Each verb lives in the module of its area, which exposes ``add_arguments(parser)`` and
``run(args) -> int``; this file only lists them, so ``kubeseg --help`` stays fast (nothing heavy
is imported until a verb runs).
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import List, Optional

from kubeseg.errors import KubesegError

# verb -> (module implementing it, one-line summary)
VERBS = {
    "validate": ("kubeseg.data.commands", "Check a four-channel dataset and write a report."),
    "ingest": ("kubeseg.data.commands", "Turn an augmented manifest (or channels) into Parquet shards."),
    "train": ("kubeseg.engine.train_cli", "Train a model; checkpoints every epoch, resumes after restarts."),
    "evaluate": ("kubeseg.engine.evaluate_cli", "Score a model artifact: mIoU, confusion matrix, report, gate."),
    "tune": ("kubeseg.tuning.commands", "Search hyperparameters: a Katib Experiment, or --local with Optuna."),
    "predict": ("kubeseg.engine.predict_cli", "Batch prediction: one mask or probability file per image under a prefix."),
    "serve": ("kubeseg.serving.commands", "Serve a model over HTTP (SageMaker-style and Open Inference v2)."),
    "export": ("kubeseg.serving.commands", "Add an ONNX export (model.onnx) to a model artifact."),
    "quantize": ("kubeseg.serving.commands", "Add an int8 model, calibrated and checked against float32."),
    "deploy": ("kubeseg.deploy.commands", "Deploy a model as a KServe InferenceService (or --dry-run)."),
    "run": ("kubeseg.pipeline_commands", "Run the whole pipeline locally with kfp.local on a sample."),
    "compile": ("kubeseg.pipeline_commands", "Compile the Kubeflow pipeline to YAML."),
    "submit": ("kubeseg.pipeline_commands", "Submit the pipeline to a Kubeflow Pipelines server."),
    "hyperparameters": ("kubeseg.cli", "Print the hyperparameter table, or --check a JSON file."),
}


def _hyperparameters_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    parser.add_argument("--check", metavar="FILE.json",
                        help="validate a hyperparameter JSON file (SageMaker-style: values may be "
                             "strings) and report every problem")


def _hyperparameters_run(args: argparse.Namespace) -> int:
    from kubeseg import storage
    from kubeseg.config import Hyperparameters, parameter_table

    if not args.check:
        print(parameter_table())
        return 0
    hp = Hyperparameters.from_json(storage.read_text(args.check), source=args.check)
    print(f"{args.check}: valid")
    print(hp.to_json())
    return 0


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
        p.set_defaults(_module=module)
        add = _verb_module(module, verb)
        if add is not None:
            add.add_arguments(p, verb)
    return parser


class _Local:
    add_arguments = staticmethod(_hyperparameters_arguments)
    run = staticmethod(_hyperparameters_run)


def _verb_module(module: str, verb: str):
    if module == "kubeseg.cli":
        return _Local
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and module.startswith(exc.name):
            return None  # the verb's module does not exist yet
        raise
    return mod if verb in getattr(mod, "VERBS", ()) else None


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verb:
        parser.print_help()
        return 2
    mod = _verb_module(args._module, args.verb)
    if mod is None:
        print(f"kubeseg {args.verb}: not available in this version", file=sys.stderr)
        return 2
    try:
        return int(mod.run(args) or 0)
    except KubesegError as exc:
        print(f"kubeseg {args.verb}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"kubeseg {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
