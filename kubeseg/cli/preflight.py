"""``kubeseg preflight``: check a cluster before the first pipeline run (reads only)."""
from __future__ import annotations

import argparse
import os

from kubeseg.cli.pipeline import TOKEN_ENV

EPILOG = """\
Uses the kubeconfig ($KUBECONFIG, or ~/.kube/config), or the pod's service account inside a
cluster. It only reads (get, list, and access reviews): it changes nothing. Prints one line
per check (ok / warn / FAIL) and, short of ok, what to do; exits 1 when a check fails.
The step account's permissions are asked as that service account (impersonation), which
needs the right to impersonate it (a cluster admin has it), unless preflight runs in a pod as
that account."""


def add_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    from kubeseg.config import PipelineParameters

    parser.add_argument("--namespace", metavar="NS",
                        help="where the pipeline's steps run: the profile namespace "
                             "(multi-user Kubeflow) or kubeflow (standalone KFP) (default: the "
                             f"parameters' namespace, {PipelineParameters().namespace})")
    parser.add_argument("--parameters", metavar="FILE.yaml",
                        help="the run's parameters, as for kubeseg submit: what must pass "
                             "follows from them (GPU serving makes the Knative flags a must, "
                             "num_nodes or gpus_per_node > 1 the training operator; "
                             "output_root names the bucket to list)")
    parser.add_argument("--kfp-host", metavar="URL",
                        help="the KFP API, e.g. http://localhost:8080 after 'kubectl "
                             "port-forward -n kubeflow svc/ml-pipeline-ui 8080:80' (default: "
                             "its Service, through the Kubernetes API server)")
    parser.add_argument("--kfp-token", metavar="TOKEN", default=None,
                        help=f"bearer token for --kfp-host (default: ${TOKEN_ENV})")
    parser.add_argument("--s3-endpoint", metavar="URL",
                        help="where the S3 endpoint is reached from here, e.g. "
                             "http://localhost:9000 after 'kubectl port-forward -n NS svc/minio "
                             "9000' (default: the storage Secret's KUBESEG_S3_ENDPOINT)")
    parser.add_argument("--step-account", metavar="NAME",
                        help="service account of the pipeline's step pods (default: the one "
                             "kubeseg's RoleBinding names in manifests/components/kfp-multi-user, "
                             "or kfp-standalone when KFP runs standalone)")
    parser.add_argument("--manifests", metavar="DIR",
                        help="kubeseg's manifests/ folder, whose Role lists what the steps may "
                             "do (default: the one beside the installed package)")


def run(args: argparse.Namespace) -> int:
    from kubeseg.config import PipelineParameters
    from kubeseg.preflight import (ClusterReader, PreflightOptions, failures, format_report,
                                   read_parameters, run_preflight)

    parameters = read_parameters(args.parameters) if args.parameters else PipelineParameters()
    options = PreflightOptions(
        namespace=args.namespace, kfp_host=args.kfp_host,
        kfp_token=args.kfp_token or os.environ.get(TOKEN_ENV), s3_endpoint=args.s3_endpoint,
        step_account=args.step_account, manifests=args.manifests, parameters=parameters)
    reader = ClusterReader.connect()
    checks = run_preflight(options, reader)
    print(f"kubeseg preflight: cluster {reader.host}, namespace {options.checked_namespace}")
    print(format_report(checks))
    return 1 if failures(checks) else 0
