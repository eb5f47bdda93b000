"""``kubeseg tune``: search hyperparameters for the best validation mIoU.

On a cluster the search is a Katib Experiment whose trials run ``kubeseg train`` in the trainer
image; with ``--local`` the same search runs here with Optuna, one real training per trial.

Examples::

    kubeseg tune --data-root s3://data/camvid --output s3://runs/camvid-tune \\
        --set num_classes=11 --set num_training_samples=367 --set epochs=20 \\
        --search learning_rate --search optimizer=sgd,adam --trials 16 --parallel 4 --dry-run
    kubeseg tune --local --trials 8 --data-root ./shapes --output ./tune \\
        --set num_classes=3 --set num_training_samples=16 --set backbone=resnet-18
"""
from __future__ import annotations

import argparse
import json

from kubeseg.cli.options import (add_channel_arguments, add_device_arguments,
                                 add_hyperparameter_arguments, channels_from_args,
                                 device_from_args, hyperparameter_values)


def add_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    from kubeseg.tuning.katib import GRID_POINTS
    from kubeseg.tuning.space import DEFAULT_SEARCH

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "--search NAME uses a suggested range (or the parameter's own closed range);\n"
        "NAME=LOW:HIGH[:log] and NAME=A,B,C (choices, or numbers to try) give one.\n"
        f"Default: {', '.join(DEFAULT_SEARCH)}.\n"
        f"On a grid (--algorithm grid) each range gets {GRID_POINTS} points: a step for\n"
        "linear ranges, log-spaced values for log ones.\n"
        "Every trial gets _tuning_objective_metric=validation:mIOU and writes to\n"
        "OUTPUT/<trial>/ (checkpoints, metrics.jsonl, model/).")
    add_hyperparameter_arguments(
        parser, title="fixed hyperparameters",
        file_help="hyperparameter JSON for every trial (path or s3:// URI)",
        set_help="fix one hyperparameter (repeatable)")
    _search_arguments(parser.add_argument_group("search"))
    add_channel_arguments(parser, shards=True)
    out = parser.add_argument_group("output")
    out.add_argument("--output", metavar="URI", required=True,
                     help="prefix receiving one folder per trial (and, locally, trials.csv "
                          "and best.json)")
    out.add_argument("--pretrained-weights", metavar="URI",
                     help="the backbone's published state dict (docs/models.md)")
    where = parser.add_argument_group("where the trials run")
    where.add_argument("--local", action="store_true",
                       help="run the trials on this machine with Optuna (no cluster)")
    where.add_argument("--dry-run", action="store_true",
                       help="print the Katib Experiment as YAML and create nothing")
    where.add_argument("--name", default="kubeseg-tune",
                       help="Experiment name (default: %(default)s)")
    where.add_argument("--namespace", default="kubeflow-user",
                       help="namespace of the Experiment (default: %(default)s)")
    where.add_argument("--gpus", type=int, default=1,
                       help="GPUs per trial pod (default: %(default)s; 0 = CPU)")
    where.add_argument("--cpu", default="8", help="CPU per trial pod (default: %(default)s)")
    where.add_argument("--memory", default="32Gi",
                       help="memory per trial pod (default: %(default)s)")
    where.add_argument("--image", default=None,
                       help="trainer image (default: the configured kubeseg trainer image)")
    where.add_argument("--service-account", default=None,
                       help="service account of the trial pods")
    add_device_arguments(where, workers=0, workers_help="data-loading processes per trial",
                         prefix="--local: ")


def _search_arguments(search) -> None:
    from kubeseg.tuning.katib import ALGORITHMS
    from kubeseg.versions import KATIB_DEFAULT_VERSION, KATIB_VERSIONS

    search.add_argument("--search", metavar="NAME[=RANGE]", action="append", default=[],
                        help="a hyperparameter to search (repeatable)")
    search.add_argument("--algorithm", default="tpe", choices=ALGORITHMS,
                        help="suggestion algorithm (default: %(default)s; --local runs tpe, "
                             "multivariate-tpe and random)")
    search.add_argument("--katib-version", default=KATIB_DEFAULT_VERSION,
                        choices=KATIB_VERSIONS,
                        help="Katib release of the cluster (default: %(default)s): Katib 0.17 "
                             "has no log-uniform search, so log-scaled ranges are refused "
                             "there instead of being searched uniformly")
    search.add_argument("--trials", type=int, default=12, help="trials in all (default: "
                                                               "%(default)s)")
    search.add_argument("--parallel", type=int, default=3,
                        help="trials at a time on the cluster (default: %(default)s)")
    search.add_argument("--max-failed", type=int, default=None,
                        help="failed trials after which Katib stops (default: --trials)")
    search.add_argument("--seed", type=int, default=0,
                        help="seed of the local search's sampler (default: %(default)s)")


def _train_args(args: argparse.Namespace) -> list:
    flags = (("data_root", "--data-root"), ("train", "--train"),
             ("train_annotation", "--train-annotation"), ("validation", "--validation"),
             ("validation_annotation", "--validation-annotation"),
             ("label_map", "--label-map"), ("shards", "--shards"),
             ("pretrained_weights", "--pretrained-weights"))
    out = []
    for attr, flag in flags:
        if getattr(args, attr, None):
            out += [flag, getattr(args, attr)]
    return out


def run(args: argparse.Namespace) -> int:
    from kubeseg.config import is_tuner_key
    from kubeseg.errors import ConfigError
    from kubeseg.tuning.space import check_fixed, parse_search

    space = parse_search(args.search)
    fixed = hyperparameter_values(args)
    searched = sorted(set(space.names) & set(fixed))
    if searched:
        raise ConfigError([f"{name} is fixed (--set or --hyperparameters) and searched "
                           "(--search): drop one" for name in searched], what="tuning option")
    check_fixed(fixed, space)
    fixed = {k: v for k, v in fixed.items() if not is_tuner_key(k)}
    channels = channels_from_args(args, need=("train", "validation"))
    if args.local:
        return _run_local(args, space, fixed, channels)
    return _run_katib(args, space, fixed)


def _run_local(args, space, fixed, channels) -> int:
    from kubeseg.engine.train import TrainOptions
    from kubeseg.tuning.local import BEST_FILE, TRIALS_FILE, LocalSearch, tune_locally
    from kubeseg import storage

    print(f"searching {args.trials} trial(s) with Optuna ({args.algorithm}) over:\n"
          f"{space.describe()}", flush=True)
    search = LocalSearch(trials=args.trials, algorithm=args.algorithm, seed=args.seed)
    result = tune_locally(space, fixed, channels, args.output, search=search,
                          pretrained_uri=args.pretrained_weights,
                          device=device_from_args(args),
                          options=TrainOptions(workers=args.workers))
    print(result.table())
    print(f"trials table: {storage.join(args.output, TRIALS_FILE)}")
    if result.best is None:
        print("no trial completed: see the errors in the trials table")
        return 1
    best = result.best
    print(f"best trial {best.number}: validation:mIOU={best.miou:.6f} (epoch "
          f"{best.best_epoch}); model {storage.join(best.output_uri, 'model')}")
    print("best parameters: " + json.dumps(best.parameters, sort_keys=True))
    print(f"summary: {storage.join(args.output, BEST_FILE)}")
    return 0


def _run_katib(args, space, fixed) -> int:
    from kubeseg.images import configured
    from kubeseg.manifest_yaml import dump
    from kubeseg.tuning.katib import KatibSearch, TrialPod, build_experiment, run_experiment

    pod = TrialPod(image=args.image or configured().trainer, gpus=args.gpus, cpu=args.cpu,
                   memory=args.memory, service_account=args.service_account)
    search = KatibSearch(algorithm=args.algorithm, max_trials=args.trials,
                         parallel_trials=args.parallel, max_failed_trials=args.max_failed,
                         katib_version=args.katib_version)
    experiment = build_experiment(
        args.name, space, fixed=fixed, train_args=_train_args(args), output_uri=args.output,
        pod=pod, search=search, namespace=args.namespace)
    if args.dry_run:
        print(dump(experiment), end="")
        return 0
    best = run_experiment(experiment)
    print(f"best trial {best['trial']}: " + json.dumps(best["metrics"], sort_keys=True))
    print("best parameters: " + json.dumps(best["parameters"], sort_keys=True))
    return 0
