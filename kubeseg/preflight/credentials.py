"""The storage credentials: the Secret the steps read, the annotations and keys KServe's storage
initializer reads from it, the predictor's service account, and one listing of the run's bucket
with those credentials (through :mod:`kubeseg.storage`, as the steps do)."""
from __future__ import annotations

import base64
import binascii
import json
import os
from typing import Any, Dict, Mapping, Optional, Tuple
from urllib.parse import urlparse

from kubeseg import storage
from kubeseg.deploy import placement
from kubeseg.errors import StorageError
from kubeseg.preflight.base import FAIL, OK, WARN, Check, Lookup, unreadable

SECRET = placement.STORAGE_SECRET
SECRET_KEYS = placement.STORAGE_SECRET_KEYS
ENDPOINT_KEY = "KUBESEG_S3_ENDPOINT"  # the key of SECRET_KEYS that storage reads the endpoint from

# KServe's storage initializer (kserve/kserve v0.15.0-v0.20.0, pkg/credentials/s3/s3_secret.go
# and utils.go): a Secret of the predictor's service account counts as S3 credentials when it
# holds the secret-key name of inferenceservice-config's credentials.s3 (awsSecretAccessKey when
# that is empty; the released ConfigMap sets AWS_SECRET_ACCESS_KEY and AWS_ACCESS_KEY_ID). The
# endpoint comes from the s3-endpoint annotation, else credentials.s3.s3Endpoint; without a
# scheme, s3-usehttps "0" means http, anything else https.
KSERVE = "serving.kserve.io/"
S3_ENDPOINT_ANNOTATION = KSERVE + "s3-endpoint"
S3_USEHTTPS_ANNOTATION = KSERVE + "s3-usehttps"
UNSET_KEY_NAMES = ("awsAccessKeyID", "awsSecretAccessKey")
RELEASED_KEY_NAMES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")

# S3 error codes of refused credentials (as kubeseg.storage reports them).
ACCESS_CODES = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken",
                "ExpiredToken")
PROBE_PREFIX = ".kubeseg-preflight/"  # listed, never written: an empty listing is enough
PROBE_TIMEOUT_S = "20"  # KUBESEG_S3_TIMEOUT of the bucket listing, unless the environment sets it
PASSED_THROUGH = ("KUBESEG_S3_VERIFY", "AWS_CA_BUNDLE", "AWS_REGION", storage.TIMEOUT_VARIABLE)


def secret_values(secret: Mapping[str, Any]) -> Dict[str, str]:
    """A Secret's ``data`` decoded (the API returns it base64-encoded); undecodable keys are
    left out."""
    values = {}
    for key, encoded in (secret.get("data") or {}).items():
        try:
            values[key] = base64.b64decode(encoded or "", validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            continue
    return values


def create_secret_command(namespace: str) -> str:
    literals = " ".join(f"--from-literal={key}=..." for key in SECRET_KEYS)
    return f"kubectl create secret generic {SECRET} -n {namespace} {literals}"


def check_storage_secret(secret: Lookup, namespace: str) -> Check:
    """The Secret exists and holds every key the steps take as environment."""
    name, where = "storage Secret", f"Secret {namespace}/{SECRET}"
    if secret.absent:
        return Check(name, FAIL, f"no {where}", create_secret_command(namespace))
    if secret.obj is None:
        return Check(name, WARN, unreadable(secret, where),
                     f"make sure it holds {', '.join(SECRET_KEYS)}")
    values = secret_values(secret.obj)
    missing = [key for key in SECRET_KEYS if not values.get(key)]
    if missing:
        return Check(name, FAIL, f"{where} has no (or an empty) {', '.join(missing)}; the "
                                 "steps take every one of "
                                 f"{', '.join(SECRET_KEYS)} as environment",
                     f"{create_secret_command(namespace)} --dry-run=client -o yaml | "
                     "kubectl apply -f -")
    try:
        settings = storage.S3Settings.from_env(values)
    except StorageError as exc:
        return Check(name, FAIL, f"{where}: {exc}", f"fix {ENDPOINT_KEY} in the Secret")
    return Check(name, OK, f"{where} holds {', '.join(SECRET_KEYS)}; endpoint {settings.url}")


def kserve_s3_config(config: Optional[Mapping[str, Any]]) -> Tuple[Dict[str, Any], str]:
    """``credentials.s3`` of an inferenceservice-config ConfigMap, and where it came from (the
    released ConfigMap's key names when it cannot be read)."""
    if config is None:
        return ({"s3AccessKeyIDName": RELEASED_KEY_NAMES[0],
                 "s3SecretAccessKeyName": RELEASED_KEY_NAMES[1]},
                "KServe's released inferenceservice-config assumed")
    try:
        credentials = json.loads((config.get("data") or {}).get("credentials") or "{}")
    except ValueError:
        credentials = {}
    return dict(credentials.get("s3") or {}), "inferenceservice-config"


def kserve_key_names(s3_config: Mapping[str, Any]) -> Tuple[str, str]:
    """The Secret keys KServe reads the access key id and secret key from."""
    return (s3_config.get("s3AccessKeyIDName") or UNSET_KEY_NAMES[0],
            s3_config.get("s3SecretAccessKeyName") or UNSET_KEY_NAMES[1])


def kserve_s3_url(annotations: Mapping[str, str], s3_config: Mapping[str, Any]) -> Optional[str]:
    """The endpoint URL the storage initializer downloads models from (None: AWS's own)."""
    endpoint = annotations.get(S3_ENDPOINT_ANNOTATION) or s3_config.get("s3Endpoint") or ""
    endpoint = endpoint.strip()
    if not endpoint:
        return None
    if endpoint.lower().startswith(("http://", "https://")):
        return endpoint
    use_https = annotations.get(S3_USEHTTPS_ANNOTATION, s3_config.get("s3UseHttps") or "")
    return ("http://" if use_https == "0" else "https://") + endpoint


def _same_endpoint(a: str, b: str) -> bool:
    def key(url):
        parsed = urlparse(url if "://" in url else "https://" + url)
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        return parsed.scheme, (parsed.hostname or "").lower(), port

    return key(a) == key(b)


def annotate_command(namespace: str, endpoint: Optional[str]) -> str:
    parsed = urlparse(endpoint or "http://HOST:PORT")
    https = "1" if parsed.scheme == "https" else "0"
    return (f"kubectl annotate --overwrite secret {SECRET} -n {namespace} "
            f"{S3_ENDPOINT_ANNOTATION}={parsed.netloc or 'HOST:PORT'} "
            f"{S3_USEHTTPS_ANNOTATION}={https}")


def check_kserve_s3(secret: Lookup, config: Lookup, namespace: str) -> Optional[Check]:
    """The Secret as KServe's storage initializer reads it: the key names of its
    inferenceservice-config, and an endpoint annotation pointing where the steps write (None
    when the Secret cannot be read: the storage Secret's line says why)."""
    if secret.obj is None:
        return None
    name, where = "KServe S3 access", f"Secret {namespace}/{SECRET}"
    s3_config, source = kserve_s3_config(config.obj)
    values = secret_values(secret.obj)
    annotations = (secret.obj.get("metadata") or {}).get("annotations") or {}
    endpoint = values.get(ENDPOINT_KEY)
    problems = [f"no key {key} ({source} names it)" for key in kserve_key_names(s3_config)
                if key not in values]
    url = kserve_s3_url(annotations, s3_config)
    if url is None:
        problems.append(f"no {S3_ENDPOINT_ANNOTATION} annotation, so the storage initializer "
                        "downloads models from AWS S3")
    if problems:
        fix = annotate_command(namespace, endpoint) if url is None else \
            f"add the keys {', '.join(kserve_key_names(s3_config))} to the Secret"
        return Check(name, FAIL, f"{where}: " + "; ".join(problems), fix)
    text = f"{where}: models download from {url}"
    if annotations.get(S3_ENDPOINT_ANNOTATION, "").lower().startswith(("http://", "https://")):
        return Check(name, WARN, f"{text}; KServe 0.15 expects {S3_ENDPOINT_ANNOTATION} "
                                 "without a scheme", annotate_command(namespace, url))
    if endpoint and not _same_endpoint(url, endpoint):
        return Check(name, WARN, f"{text}, but the steps write to {endpoint} ({ENDPOINT_KEY})",
                     annotate_command(namespace, endpoint) + " (unless both reach one store)")
    return Check(name, OK, text)


def check_predictor_account(account: Lookup, name: str, namespace: str) -> Check:
    """The InferenceService's service account exists and lists the storage Secret, which is how
    KServe finds the credentials for the storage initializer."""
    title, where = "predictor account", f"ServiceAccount {namespace}/{name}"
    patch = (f"kubectl patch serviceaccount {name} -n {namespace} -p "
             f"'{{\"secrets\":[{{\"name\":\"{SECRET}\"}}]}}'")
    if account.absent:
        return Check(title, FAIL, f"no {where} (predictor_service_account: the deployed "
                                  "model's storage initializer reads the Secret through it)",
                     "kubectl apply -k manifests/overlays/kfp-multi-user (or kfp-standalone), "
                     "which creates it")
    if account.obj is None:
        return Check(title, WARN, unreadable(account, where), f"make sure it lists {SECRET}")
    listed = [s.get("name") for s in account.obj.get("secrets") or []]
    if SECRET not in listed:
        return Check(title, FAIL, f"{where} does not list Secret {SECRET}", patch)
    return Check(title, OK, f"{where} lists Secret {SECRET}")


def _cluster_internal(url: str) -> bool:
    host = (urlparse(url).hostname or "").lower()
    return "." not in host or host.endswith((".svc", ".svc.cluster.local", ".cluster.local"))


def probe_settings(values: Mapping[str, str], endpoint: Optional[str],
                   environ: Mapping[str, str]) -> storage.S3Settings:
    """The storage settings of the Secret's values, at ``endpoint`` when given (the address the
    endpoint is reachable at from here), with TLS and timeout settings from ``environ``."""
    env = {key: values[key] for key in SECRET_KEYS if values.get(key)}
    env[storage.TIMEOUT_VARIABLE] = PROBE_TIMEOUT_S
    env.update({key: environ[key] for key in PASSED_THROUGH if environ.get(key)})
    if endpoint:
        env[ENDPOINT_KEY] = endpoint
    return storage.S3Settings.from_env(env)


def check_s3_access(secret: Lookup, uri: str, endpoint: Optional[str] = None, *,
                    in_cluster: bool = False, environ: Optional[Mapping[str, str]] = None
                    ) -> Check:
    """One listing of the bucket of ``uri`` (the run's output_root) with the Secret's
    credentials, through kubeseg.storage, at ``endpoint`` when given (where the store is
    reachable from here). Nothing is written."""
    name = "S3 access"
    if not storage.is_s3(uri):
        return Check(name, OK, f"output_root {uri} is not in S3: nothing to check")
    if secret.obj is None:
        return Check(name, WARN, "not checked: " + ("there is no storage Secret" if secret.absent
                                                    else "the storage Secret could not be read"),
                     "fix the storage Secret first")
    try:
        settings = probe_settings(secret_values(secret.obj), endpoint,
                                  os.environ if environ is None else environ)
        bucket = storage.split_s3(uri)[0]
    except StorageError as exc:
        return Check(name, FAIL, str(exc), f"fix {ENDPOINT_KEY} in Secret {SECRET} or "
                                           "--s3-endpoint")
    try:
        storage.list_files(f"s3://{bucket}/{PROBE_PREFIX}", settings)
    except StorageError as exc:
        return _s3_failure(exc, settings.url, from_secret=not endpoint, in_cluster=in_cluster)
    return Check(name, OK, f"listed bucket {bucket} at {settings.url} with the Secret's "
                           "credentials (writing is not tried: preflight changes nothing)")


def _s3_failure(exc: StorageError, url: str, *, from_secret: bool, in_cluster: bool) -> Check:
    """A FAIL naming the fix for what the store answered; a warn when the Secret's endpoint is
    an address inside the cluster that cannot be reached from outside it."""
    from minio.error import S3Error

    cause = exc.__cause__
    code = cause.code if isinstance(cause, S3Error) else None
    if code == "NoSuchBucket":
        return Check("S3 access", FAIL, str(exc), "create the bucket (e.g. mc mb ALIAS/BUCKET) "
                                                  "or change output_root")
    if code in ACCESS_CODES:
        return Check("S3 access", FAIL, str(exc), f"fix AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY "
                                                  f"in Secret {SECRET}, or the bucket's policy")
    if from_secret and not in_cluster and _cluster_internal(url):
        return Check("S3 access", WARN, f"{exc} ({url} is an address inside the cluster)",
                     "port-forward the store (e.g. kubectl port-forward -n NS svc/minio 9000) "
                     "and rerun with --s3-endpoint http://localhost:9000")
    return Check("S3 access", FAIL, str(exc), f"check {ENDPOINT_KEY} in Secret {SECRET} (or "
                                              "--s3-endpoint) and that the store runs")


__all__ = ["check_storage_secret", "check_kserve_s3", "check_predictor_account",
           "check_s3_access", "kserve_s3_url", "kserve_key_names", "kserve_s3_config",
           "secret_values", "S3_ENDPOINT_ANNOTATION", "S3_USEHTTPS_ANNOTATION"]
