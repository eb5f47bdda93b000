"""The storage checks: the Secret the steps read, what KServe's storage initializer reads from
it (key names of the released inferenceservice-config, s3-* annotations), the predictor's
service account, and a listing of the run's bucket on the real test S3 server."""
import base64
import json
from pathlib import Path

import pytest
import yaml

import crd_schema
from kubeseg.preflight import credentials
from kubeseg.preflight.base import FAIL, OK, WARN, failed, found

REPO = Path(__file__).resolve().parents[2]
NS = "kubeflow-user"


def secret(values, annotations=None, name="kubeseg-storage"):
    """A Secret as the API returns it: data base64-encoded."""
    metadata = {"name": name, "namespace": NS}
    if annotations:
        metadata["annotations"] = annotations
    return found({"apiVersion": "v1", "kind": "Secret", "type": "Opaque", "metadata": metadata,
                  "data": {k: base64.b64encode(v.encode()).decode() for k, v in values.items()}})


VALUES = {"KUBESEG_S3_ENDPOINT": "http://minio.kubeflow-user.svc:9000",
          "AWS_ACCESS_KEY_ID": "key", "AWS_SECRET_ACCESS_KEY": "secret"}
ANNOTATIONS = {"serving.kserve.io/s3-endpoint": "minio.kubeflow-user.svc:9000",
               "serving.kserve.io/s3-usehttps": "0"}


def kserve_config(s3):
    # inferenceservice-config's `credentials` key, as KServe's ConfigMap writes it.
    return found({"apiVersion": "v1", "kind": "ConfigMap", "data": {
        "credentials": json.dumps({"s3": s3})}})


def test_storage_secret():
    assert credentials.check_storage_secret(secret(VALUES), NS).status == OK
    missing = credentials.check_storage_secret(failed(404, "Not Found"), NS)
    assert missing.status == FAIL
    assert missing.fix == ("kubectl create secret generic kubeseg-storage -n kubeflow-user "
                           "--from-literal=KUBESEG_S3_ENDPOINT=... "
                           "--from-literal=AWS_ACCESS_KEY_ID=... "
                           "--from-literal=AWS_SECRET_ACCESS_KEY=...")
    partial = credentials.check_storage_secret(secret({**VALUES, "AWS_ACCESS_KEY_ID": ""}), NS)
    assert partial.status == FAIL and "AWS_ACCESS_KEY_ID" in partial.found
    in_url = credentials.check_storage_secret(
        secret({**VALUES, "KUBESEG_S3_ENDPOINT": "http://key:secret@minio:9000"}), NS)
    assert in_url.status == FAIL and "secret@" not in in_url.found
    assert credentials.check_storage_secret(failed(403, "Forbidden"), NS).status == WARN


@pytest.mark.parametrize("release", ["v0.15.0", "v0.20.0"])
def test_the_released_kserve_configmap_reads_kubeseg_secret_keys(release):
    config = yaml.safe_load(crd_schema.upstream(
        f"kserve-inferenceservice-config-{release}.yaml").read_text())
    s3, _ = credentials.kserve_s3_config(config)
    assert credentials.kserve_key_names(s3) == ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    check = credentials.check_kserve_s3(secret(VALUES, ANNOTATIONS), found(config), NS)
    assert check.status == OK
    assert check.found.endswith("models download from http://minio.kubeflow-user.svc:9000")


def test_without_the_endpoint_annotation_kserve_goes_to_aws():
    check = credentials.check_kserve_s3(secret(VALUES), failed(403, "Forbidden"), NS)
    assert check.status == FAIL and "downloads models from AWS S3" in check.found
    assert check.fix == ("kubectl annotate --overwrite secret kubeseg-storage -n kubeflow-user "
                         "serving.kserve.io/s3-endpoint=minio.kubeflow-user.svc:9000 "
                         "serving.kserve.io/s3-usehttps=0")


def test_key_names_kserve_reads_when_its_configmap_leaves_them_empty():
    check = credentials.check_kserve_s3(secret(VALUES, ANNOTATIONS),
                                        kserve_config({"s3AccessKeyIDName": ""}), NS)
    assert check.status == FAIL
    assert "no key awsAccessKeyID" in check.found and "no key awsSecretAccessKey" in check.found


def test_kserve_endpoint_url_rules():
    url = credentials.kserve_s3_url
    assert url({"serving.kserve.io/s3-endpoint": "minio:9000"}, {}) == "https://minio:9000"
    assert url(ANNOTATIONS, {}) == "http://minio.kubeflow-user.svc:9000"
    assert url({}, {"s3Endpoint": "s3.example.com", "s3UseHttps": "0"}) == \
        "http://s3.example.com"
    assert url({}, {}) is None


def test_an_annotation_pointing_elsewhere_or_with_a_scheme_is_a_warning():
    elsewhere = credentials.check_kserve_s3(
        secret(VALUES, {"serving.kserve.io/s3-endpoint": "minio.kubeflow-user.svc:9000"}),
        failed(403), NS)  # no s3-usehttps: KServe uses https, the steps http
    assert elsewhere.status == WARN and "the steps write to http://" in elsewhere.found
    assert "s3-usehttps=0" in elsewhere.fix
    scheme = credentials.check_kserve_s3(
        secret(VALUES, {"serving.kserve.io/s3-endpoint": "http://minio.kubeflow-user.svc:9000"}),
        failed(403), NS)
    assert scheme.status == WARN and "KServe 0.15" in scheme.found


def test_predictor_account():
    shipped = yaml.safe_load((REPO / "manifests/base/predictor-serviceaccount.yaml").read_text())
    assert credentials.check_predictor_account(found(shipped), "kubeseg-predictor",
                                               NS).status == OK
    bare = {**shipped, "secrets": []}
    check = credentials.check_predictor_account(found(bare), "kubeseg-predictor", NS)
    assert check.status == FAIL and "kubectl patch serviceaccount kubeseg-predictor" in check.fix
    assert credentials.check_predictor_account(failed(404), "kubeseg-predictor",
                                               NS).status == FAIL


# -- S3, on the real test server ------------------------------------------------------------------
def server_values(s3_server, **changes):
    return {**s3_server.env(), **changes}


def test_s3_access_with_the_secret_credentials(s3_server, bucket):
    check = credentials.check_s3_access(secret(server_values(s3_server)), f"{bucket}/runs",
                                        environ={})
    assert check.status == OK and f"listed bucket {bucket[5:]}" in check.found


def test_wrong_credentials_fail_naming_the_fix(s3_server, bucket):
    values = server_values(s3_server, AWS_SECRET_ACCESS_KEY="not-the-secret")
    check = credentials.check_s3_access(secret(values), f"{bucket}/runs", environ={})
    assert check.status == FAIL and "access refused (SignatureDoesNotMatch)" in check.found
    assert "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY in Secret kubeseg-storage" in check.fix
    assert "not-the-secret" not in check.found


def test_a_missing_bucket_fails(s3_server):
    check = credentials.check_s3_access(secret(server_values(s3_server)),
                                        "s3://no-such-bucket-here/runs", environ={})
    assert check.status == FAIL and "does not exist" in check.found
    assert "create the bucket" in check.fix


def test_s3_endpoint_given_on_the_command_line_replaces_the_cluster_address(s3_server, bucket):
    values = server_values(s3_server, KUBESEG_S3_ENDPOINT="http://minio.kubeflow-user.svc:9000")
    check = credentials.check_s3_access(secret(values), f"{bucket}/runs",
                                        endpoint=s3_server.endpoint, environ={})
    assert check.status == OK and s3_server.endpoint in check.found


def test_an_endpoint_nothing_listens_on(s3_server):
    from s3server import free_port

    values = server_values(s3_server, KUBESEG_S3_ENDPOINT=f"http://127.0.0.1:{free_port()}")
    check = credentials.check_s3_access(secret(values), "s3://kubeseg/runs", environ={})
    assert check.status == FAIL and "unreachable" in check.found


def test_s3_access_not_checked_without_the_secret():
    check = credentials.check_s3_access(failed(404), "s3://kubeseg/runs")
    assert check.status == WARN and "no storage Secret" in check.found
    assert credentials.check_s3_access(failed(404), "/local/runs").status == OK
