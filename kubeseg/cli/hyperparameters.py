"""``kubeseg hyperparameters``: the hyperparameter table, or a JSON file checked."""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    parser.add_argument("--check", metavar="FILE.json",
                        help="validate a hyperparameter JSON file (SageMaker-style: values may be "
                             "strings) and report every problem")


def run(args: argparse.Namespace) -> int:
    from kubeseg import storage
    from kubeseg.config import Hyperparameters, parameter_table

    if not args.check:
        print(parameter_table())
        return 0
    hp = Hyperparameters.from_json(storage.read_text(args.check), source=args.check)
    print(f"{args.check}: valid")
    print(hp.to_json())
    return 0
