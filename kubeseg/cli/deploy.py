"""``kubeseg deploy``: serve a model artifact as a KServe InferenceService (or print it)."""
from __future__ import annotations

import argparse
import sys


def _key_values(items, what):
    from kubeseg.errors import ConfigError

    result = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError([f"{what} {item!r}: expected KEY=VALUE"], what="option")
        result[key] = value
    return result


def _toleration(text):
    """``KEY[=VALUE]:EFFECT`` (as kubectl taint writes it) -> a toleration dict."""
    from kubeseg.errors import ConfigError

    key_value, sep, effect = text.rpartition(":")
    if not sep:
        key_value, effect = text, ""
    key, has_value, value = key_value.partition("=")
    if not key:
        raise ConfigError([f"--toleration {text!r}: expected KEY[=VALUE][:EFFECT]"],
                          what="option")
    toleration = {"key": key, "operator": "Equal" if has_value else "Exists"}
    if has_value:
        toleration["value"] = value
    if effect:
        toleration["effect"] = effect
    return toleration


def add_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    from kubeseg import images

    parser.add_argument("model_uri", metavar="MODEL_URI",
                        help="model artifact (s3://bucket/run/model), downloaded by KServe's "
                             "storage initializer")
    parser.add_argument("--name", required=True, help="InferenceService name (a DNS label)")
    parser.add_argument("--namespace", default="kubeflow-user", help="(default: %(default)s)")
    configured = images.configured()
    parser.add_argument("--image", default=None,
                        help=f"predictor image (default: {configured.predictor}, or "
                             f"{configured.predictor_gpu} with --gpus; registry and tag from "
                             f"${images.REGISTRY_ENV} / ${images.TAG_ENV})")
    from kubeseg.config import DEFAULT_PREDICTOR_SERVICE_ACCOUNT

    parser.add_argument("--service-account", default=DEFAULT_PREDICTOR_SERVICE_ACCOUNT,
                        help="service account holding the storage credentials for KServe's "
                             "storage initializer (KServe S3 secret annotations; default: "
                             "%(default)s, as the pipeline; '' for the namespace's default "
                             "account)")
    parser.add_argument("--storage-secret", help="Secret with AWS_ACCESS_KEY_ID, "
                                                 "AWS_SECRET_ACCESS_KEY, KUBESEG_S3_ENDPOINT, "
                                                 "given to the server as environment")
    parser.add_argument("--cpu", default="2", help="CPU request and limit (default: %(default)s)")
    from kubeseg.serving.defaults import DEFAULT_POD_MEMORY_MIB, SERVING_POD_MEMORY

    parser.add_argument("--memory", default=SERVING_POD_MEMORY,
                        help="memory request and limit (default: %(default)s; the server's "
                             f"defaults need {DEFAULT_POD_MEMORY_MIB} MiB)")
    parser.add_argument("--gpus", type=int, default=0,
                        help="GPUs per replica; > 0 schedules on the GPU node pool")
    parser.add_argument("--node-selector", action="append", metavar="KEY=VALUE",
                        help="node selector (repeatable; GPU default kubeseg.io/node-pool=gpu)")
    parser.add_argument("--toleration", action="append", metavar="KEY[=VALUE][:EFFECT]",
                        help="toleration (repeatable; GPU default nvidia.com/gpu:NoSchedule)")
    parser.add_argument("--min-replicas", type=int, default=1)
    parser.add_argument("--max-replicas", type=int, default=1)
    parser.add_argument("--canary-traffic-percent", type=int, default=100,
                        help="share of traffic for the new revision, the previous one keeps "
                             "the rest (default: %(default)s: all traffic, which also promotes "
                             "an earlier canary)")
    parser.add_argument("--deployment-mode", default=None,
                        choices=("Serverless", "RawDeployment", "Knative", "Standard"),
                        help="KServe deployment mode, written as its annotation (default: the "
                             "cluster's; KServe ships Serverless). Knative = Serverless, "
                             "Standard = RawDeployment; canary traffic needs Serverless")
    parser.add_argument("--max-pixels", type=int, default=None,
                        help="server option: images above this many pixels are processed "
                             "downscaled and answered at full size")
    parser.add_argument("--timeout", type=float, default=600,
                        help="seconds to wait for Ready (default: %(default)s)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the InferenceService as YAML and apply nothing")


def run(args: argparse.Namespace) -> int:
    from kubeseg.deploy.inference_service import (ServingSpec, apply_inference_service,
                                                  build_inference_service, serving_notes)

    spec = ServingSpec(
        args.name, args.model_uri, namespace=args.namespace, image=args.image,
        service_account=args.service_account or None, storage_secret=args.storage_secret,
        cpu=args.cpu, memory=args.memory, gpus=args.gpus,
        node_selector=_key_values(args.node_selector, "--node-selector") or None,
        tolerations=[_toleration(t) for t in args.toleration] if args.toleration else None,
        min_replicas=args.min_replicas, max_replicas=args.max_replicas,
        canary_traffic_percent=args.canary_traffic_percent,
        deployment_mode=args.deployment_mode, max_pixels=args.max_pixels)
    obj = build_inference_service(spec)
    for note in serving_notes(spec):
        print(f"kubeseg deploy: note: {note}", file=sys.stderr)
    if args.dry_run:
        from kubeseg.manifest_yaml import dump

        sys.stdout.write(dump(obj))
        return 0
    url = apply_inference_service(obj, timeout_s=args.timeout)
    print(url)
    return 0
