"""Options shared by several verbs, declared once: the dataset channels, the hyperparameter
file and ``--set``, class names, where the work runs (``--device``, ``--workers``) and how long
storage may stay silent (``--s3-timeout``)."""
from __future__ import annotations

import argparse


def add_channel_arguments(parser: argparse.ArgumentParser, *,
                          splits=("train", "validation"), shards: bool = False) -> None:
    """The dataset flags every data-reading verb shares: --data-root, per-split channels,
    --label-map and (optionally) --shards."""
    group = parser.add_argument_group(
        "dataset channels (S3 prefixes s3://bucket/prefix or local folders)")
    folders = ", ".join(f"{s}/, {s}_annotation/" for s in splits)
    group.add_argument("--data-root", metavar="URI",
                       help=f"folder/prefix holding {folders} and optionally label_map/")
    for split in splits:
        group.add_argument(f"--{split}", metavar="URI",
                           help=f"{split} images (overrides --data-root)")
        group.add_argument(f"--{split}-annotation", metavar="URI",
                           help=f"{split} annotation PNGs (overrides --data-root)")
    group.add_argument("--label-map", metavar="URI",
                       help="label_map channel (folder with train_label_map.json / "
                            "validation_label_map.json) or one JSON file")
    if shards:
        group.add_argument("--shards", metavar="URI",
                           help="an ingested Parquet shard set (folder/prefix with index.json) "
                                "instead of image/annotation channels")


def channels_from_args(args: argparse.Namespace, *, need=()):
    """The Channels the flags of :func:`add_channel_arguments` describe.

    ``need`` lists splits whose images and annotations must be given (shards satisfy any).
    """
    from kubeseg.data.channels import Channels
    from kubeseg.errors import DataError

    if getattr(args, "shards", None):
        return Channels(label_map=args.label_map, shards=args.shards)
    values = Channels.from_root(args.data_root).to_dict() if args.data_root else {}
    for name in ("train", "train_annotation", "validation", "validation_annotation",
                 "label_map"):
        given = getattr(args, name, None)
        if given:
            values[name] = given
    channels = Channels(**values)
    missing = [f"--{s} and --{s}-annotation" for s in need
               if not (channels.images(s) and channels.annotations(s))]
    if missing:
        alternatives = "--data-root" + (", --shards" if hasattr(args, "shards") else "")
        raise DataError(f"no {' or '.join(need)} data: give {alternatives}, or "
                        + " and ".join(missing))
    return channels


def add_hyperparameter_arguments(parser: argparse.ArgumentParser, *, title: str,
                                 file_help: str, set_help: str) -> None:
    """``--hyperparameters FILE.json`` and repeatable ``--set NAME=VALUE`` (later wins)."""
    group = parser.add_argument_group(title)
    group.add_argument("--hyperparameters", metavar="FILE.json", help=file_help)
    group.add_argument("--set", metavar="NAME=VALUE", action="append", default=[],
                       dest="assignments", help=set_help)


def hyperparameter_values(args: argparse.Namespace) -> dict:
    """The raw values of the flags of :func:`add_hyperparameter_arguments`: the JSON file's,
    then ``--set`` over them (strings, checked by the caller)."""
    from kubeseg import storage
    from kubeseg.config import json_values, parse_assignments

    values = {}
    if args.hyperparameters:
        values = json_values(storage.read_text(args.hyperparameters), args.hyperparameters)
    values.update(parse_assignments(args.assignments))
    return values


def add_class_names_argument(parser, help: str, *, json_file: bool = True) -> None:
    """``--class-names A,B,...`` (or a JSON list file where ``json_file``)."""
    parser.add_argument("--class-names", metavar="A,B,...|FILE.json" if json_file else "A,B,...",
                        help=help)


def class_names_from_args(args: argparse.Namespace):
    """The names of ``--class-names``: a JSON list file's, or the comma-separated ones with
    blanks dropped; None when not given."""
    value = args.class_names
    if value and value.lower().endswith(".json"):
        import json

        from kubeseg import storage

        return [str(n) for n in json.loads(storage.read_text(value))]
    from kubeseg.data.channels import split_class_names

    return split_class_names(value)


def add_device_arguments(group, *, workers: int, workers_help: str, prefix: str = "") -> None:
    """``--device`` (auto picks the GPU when there is one) and ``--workers``."""
    group.add_argument("--device", default="auto",
                       help=f"{prefix}auto (GPU if present), cpu, cuda or cuda:N (default: auto)")
    group.add_argument("--workers", type=int, default=workers,
                       help=f"{prefix}{workers_help} (default: {workers})")


def device_from_args(args: argparse.Namespace):
    """``--device``: None for auto (the library picks), else as given."""
    return None if args.device == "auto" else args.device


# Verbs that read or write object storage get --s3-timeout.
STORAGE_VERBS = ("validate", "ingest", "train", "evaluate", "tune", "predict", "serve", "export",
                 "quantize", "deploy", "preflight")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 86400:
        raise argparse.ArgumentTypeError(f"{text!r}: a number of seconds in (0, 86400]")
    return value


def add_storage_arguments(parser: argparse.ArgumentParser) -> None:
    """``--s3-timeout SECONDS``: the command's storage deadline (over KUBESEG_S3_TIMEOUT)."""
    from kubeseg.storage import DEADLINE, DEADLINE_OPTION

    group = parser.add_argument_group("object storage")
    group.add_argument(DEADLINE_OPTION, type=_seconds, metavar="SECONDS", dest="s3_timeout",
                       help=f"{DEADLINE.meaning} (default: {DEADLINE.variable} or "
                            f"{DEADLINE.default_s:g})")
