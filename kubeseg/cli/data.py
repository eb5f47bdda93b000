"""``kubeseg validate`` and ``kubeseg ingest``."""
from __future__ import annotations

import argparse

from kubeseg.cli.options import (add_channel_arguments, add_class_names_argument,
                                 channels_from_args, class_names_from_args)


def _dataset_channels(args: argparse.Namespace):
    from kubeseg.errors import DataError

    channels = channels_from_args(args)
    if not channels.train and not channels.validation:
        raise DataError("no dataset given: use --data-root or --train/--train-annotation "
                        "(and --validation/--validation-annotation)")
    return channels


def add_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    if verb == "validate":
        add_channel_arguments(parser)
        from kubeseg.config import Hyperparameters

        allowed = Hyperparameters.specs()["num_classes"].describe()
        parser.add_argument("--num-classes", type=int, required=True,
                            help=f"number of classes, {allowed}; label values >= it are errors")
        add_class_names_argument(parser, "class names for the report (comma-separated or a "
                                         "JSON list)")
        parser.add_argument("--output", metavar="URI",
                            help="where to write report.json and report.md")
        parser.add_argument("--workers", type=int, default=8,
                            help="items checked concurrently (default 8)")
        from kubeseg.config import PipelineParameters

        parser.add_argument("--strict-labels", action="store_true",
                            help=PipelineParameters.specs()["strict_labels"].help)
    elif verb == "ingest":
        parser.add_argument("--manifest", metavar="URI",
                            help="augmented manifest (JSON Lines with source-ref and a -ref "
                                 "label attribute); without it, the channels are ingested")
        parser.add_argument("--split", default="train", choices=("train", "validation"),
                            help="split the manifest holds (default train)")
        parser.add_argument("--attribute-names", metavar="IMAGE,LABEL",
                            help="manifest attribute names in order, image first (default: "
                                 "source-ref and the only other -ref attribute)")
        parser.add_argument("--skip-bad-lines", action="store_true",
                            help="leave out bad manifest lines (malformed, missing attribute or "
                                 "object, conflicting colour map) instead of failing; they are "
                                 "listed in <output>/<split>-ingest-report.json")
        parser.add_argument("--unknown-colours-as-ignore", action="store_true",
                            help="turn mask values found in no Ground Truth colour map into "
                                 "ignore (255) instead of failing; every such line and its "
                                 "pixel count goes into the ingestion report")
        add_channel_arguments(parser)
        add_class_names_argument(parser, "class names recorded in the index (channels only; "
                                         "manifests bring theirs from the Ground Truth colour "
                                         "map)")
        parser.add_argument("--output", metavar="URI", required=True,
                            help="prefix for the shards and index.json")
        parser.add_argument("--shard-size-mb", type=float, default=64.0,
                            help="target shard size in MB (default 64)")
        parser.add_argument("--workers", type=int, default=8,
                            help="objects fetched concurrently (default 8)")


def run(args: argparse.Namespace) -> int:
    if args.verb == "validate":
        from kubeseg import storage
        from kubeseg.data.validate import validate_dataset

        report = validate_dataset(_dataset_channels(args), args.num_classes, args.output,
                                  workers=args.workers, class_names=class_names_from_args(args),
                                  strict_labels=args.strict_labels)
        print(f"{len(report.fatal)} fatal problem(s), {len(report.warnings)} warning(s); "
              f"pairs: {', '.join(f'{s} {n}' for s, n in report.pairs.items()) or 'none'}")
        for group in report.summary:
            if group.severity == "warning":
                print(group.line())
        report.raise_if_fatal(storage.join(args.output, "report.md") if args.output else None)
        return 0
    if args.verb == "ingest":
        from kubeseg.data.ingest import ManifestLeniency, ingest_channels, ingest_manifest

        if args.manifest:
            names = [n.strip() for n in args.attribute_names.split(",")] \
                if args.attribute_names else None
            leniency = ManifestLeniency(skip_bad_lines=args.skip_bad_lines,
                                        unknown_colours_as_ignore=args.unknown_colours_as_ignore)
            index = ingest_manifest(args.manifest, args.output, split=args.split,
                                    attribute_names=names, shard_size_mb=args.shard_size_mb,
                                    workers=args.workers, leniency=leniency)
        else:
            index = ingest_channels(_dataset_channels(args), args.output,
                                    shard_size_mb=args.shard_size_mb, workers=args.workers,
                                    class_names=class_names_from_args(args))
        for split, entry in sorted(index["splits"].items()):
            print(f"{split}: {entry['num_samples']} samples in {len(entry['shards'])} shard(s)")
        if args.manifest:
            from kubeseg import storage
            from kubeseg.data.ingest import report_name

            entry = index["splits"][args.split]
            print(f"{args.split}: {entry['skipped_lines']} bad line(s) left out, "
                  f"{entry['repeated_lines']} repeated line(s) kept, "
                  f"{entry['unknown_colour_pixels']} pixel(s) of unknown colours made ignore; "
                  f"report: {storage.join(args.output, report_name(args.split))}")
        print(f"index: {args.output.rstrip('/')}/index.json")
        return 0
    raise ValueError(f"unknown verb {args.verb}")
