"""``kubeseg train``: train a segmentation model from the command line.

Hyperparameters come from a named preset (``--preset``, see :mod:`kubeseg.presets`), a JSON
file (the SageMaker-style hyperparameter JSON, values may be strings) and/or ``--set
name=value``, later winning in that order. The data comes from the four channel flags,
``--data-root`` (a folder or prefix with train/, train_annotation/, validation/,
validation_annotation/ and optionally label_map/), or ``--shards`` (an ingested shard set).

Examples::

    kubeseg train --data-root s3://data/camvid --output s3://runs/camvid-1 \\
        --set num_classes=11 --set num_training_samples=367 --set backbone=resnet-50 \\
        --pretrained-weights s3://weights/resnet50.pth
    kubeseg train --preset cpu-quality --data-root camvid/ --output runs/cpu-1 \\
        --set num_classes=11 --set num_training_samples=367
    torchrun --nproc_per_node=4 -m kubeseg train --hyperparameters hp.json --shards s3://... \\
        --output s3://runs/x
"""
from __future__ import annotations

import argparse
import logging

from kubeseg.cli.options import (add_channel_arguments, add_class_names_argument,
                                 add_device_arguments, add_hyperparameter_arguments,
                                 channels_from_args, hyperparameter_values)

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    from kubeseg.presets import PRESETS, describe_presets

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = ("Run 'kubeseg hyperparameters' for every hyperparameter, its default and "
                     "allowed values. Restarting with the same --output resumes from its last "
                     "checkpoint.")
    parser.epilog += "\n\nPresets (--preset NAME):\n" + describe_presets()
    parser.add_argument("--preset", choices=tuple(PRESETS),
                        help="start from a named set of hyperparameter values (listed below); "
                             "the JSON file and --set override it")
    add_hyperparameter_arguments(
        parser, title="hyperparameters",
        file_help="hyperparameter JSON (path or s3:// URI); values may be strings",
        set_help="set one hyperparameter (repeatable; overrides the JSON file)")
    add_channel_arguments(parser, shards=True)
    out = parser.add_argument_group("model and output")
    out.add_argument("--output", metavar="URI", required=True,
                     help="where metrics.jsonl, checkpoints/ and the model/ artifact go")
    out.add_argument("--pretrained-weights", metavar="URI",
                     help="the backbone's published ImageNet state dict: torchvision's "
                          "format, efficientnet-lite0-57934424.pth's for efficientnet-lite0 "
                          "(with use_pretrained_model=True; without it the public weights "
                          "are downloaded)")
    out.add_argument("--model", metavar="URI",
                     help="earlier kubeseg model artifact to continue from (incremental "
                          "training; algorithm, backbone, crop_size, num_classes must match)")
    run_group = parser.add_argument_group("execution")
    add_device_arguments(run_group, workers=2,
                         workers_help="data-loading processes per training process")
    run_group.add_argument("--log-every", type=int, default=10, metavar="N",
                           help="progress line every N iterations (default: 10)")
    add_class_names_argument(run_group, "comma-separated class names stored in the artifact",
                             json_file=False)


def load_hyperparameters(args: argparse.Namespace):
    from kubeseg.presets import hyperparameters_with_preset

    # the JSON file and --set, already layered, go over the preset
    return hyperparameters_with_preset(args.preset, hyperparameter_values(args))


def run(args: argparse.Namespace) -> int:
    import time

    from kubeseg.data.channels import split_class_names
    from kubeseg.engine.train import TrainOptions, train

    hp = load_hyperparameters(args)
    channels = channels_from_args(args, need=("train",))
    names = split_class_names(args.class_names)
    start = time.perf_counter()
    result = train(hp, channels, args.output, pretrained_uri=args.pretrained_weights,
                   initial_model_uri=args.model, device=args.device, class_names=names,
                   options=TrainOptions(workers=args.workers, log_every=args.log_every))
    logger.info("done in %.1f s: best validation mIoU %.4f at epoch %d%s; model at %s",
                time.perf_counter() - start, result.best_miou, result.best_epoch,
                " (stopped early)" if result.stopped_early else "", result.artifact_uri)
    return 0
