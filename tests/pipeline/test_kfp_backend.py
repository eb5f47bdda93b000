"""The compiled pipelines for a stated Kubeflow Pipelines backend: no field newer than the target
is written (the committed files are for the lowest supported backend), ``--kfp-backend`` keeps
what a newer backend knows, and ``kubeseg submit`` refuses a server older than the target.

The backend's rule: from 2.14.0 its workflow compiler parses each task's kfp-kubernetes executor
config with strict protojson (kubeflow/pipelines 2.14.0
backend/src/v2/compiler/argocompiler/container.go), so a field missing from its release's
kubernetes_platform/proto/kubernetes_executor_config.proto refuses the run. Where the upstream
proto files are at hand (tests/schemas/UPSTREAM.md), that rule itself runs: protoc builds each
release's message and protobuf's strict JSON parser reads the compiled configs.
"""
import json
import os
import subprocess
import sys
import threading
from functools import lru_cache
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import yaml

from kubeseg import versions
from kubeseg.errors import ConfigError, KubesegError

REPO = Path(__file__).resolve().parents[2]
COMPILED = (REPO / "pipelines" / "segmentation.yaml", REPO / "pipelines" / "batch_predict.yaml")
PROTOS_ENV = "KUBESEG_UPSTREAM_KFP_PROTOS"
PROTOS_DEFAULT = REPO.parents[0] / "shared" / "kfp-protos"  # shared/ beside the checkout


def _platform(path: Path):
    from kubeseg_platform.pipelines.kfp_backend import split_compiled

    _, documents = split_compiled(path.read_text())
    (platform,) = [d for d in documents if "platforms" in d]
    return platform


def _executors(platform):
    return platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def _secret_envs(platform):
    return [entry for config in _executors(platform).values()
            for entry in config.get("secretAsEnv", [])]


# -- the table, over the committed files ------------------------------------------------------
@pytest.mark.parametrize("path", COMPILED, ids=lambda p: p.name)
def test_committed_pipelines_write_nothing_newer_than_the_lowest_backend(path):
    from kubeseg_platform.pipelines.kfp_backend import platform_fields, required_backend_of_text

    platform = _platform(path)
    newer = [(where, field.since) for field, _, _, where in platform_fields(platform)
             if not versions.at_least(versions.KFP_BACKEND_LOWEST, field.since)]
    assert newer == [], f"{path.name} writes fields the {versions.KFP_BACKEND_LOWEST} " \
                        f"backend refuses: {newer}"
    assert required_backend_of_text(path.read_text()) == versions.KFP_BACKEND_LOWEST
    # the storage Secret still reaches the steps, without the 2.15.0-only field
    assert _secret_envs(platform) and all("optional" not in e for e in _secret_envs(platform))
    assert f"# Kubeflow Pipelines backend: {versions.KFP_BACKEND_LOWEST} or newer" \
        in path.read_text()


def test_a_newer_target_keeps_what_that_backend_knows(tmp_path):
    from kubeseg_platform.pipelines.kfp_backend import required_backend_of_text
    from kubeseg_platform.pipelines.segmentation import compile_pipeline

    path = Path(compile_pipeline(str(tmp_path / "p.yaml"), "2.15.0"))
    entries = _secret_envs(_platform(path))
    assert entries and all(e["optional"] is False for e in entries)  # as kfp-kubernetes wrote
    assert required_backend_of_text(path.read_text()) == "2.15.0"
    assert "# Kubeflow Pipelines backend: 2.15.0 or newer" in path.read_text()


def test_a_field_whose_absence_changes_meaning_fails_naming_the_release():
    from kubeseg_platform.pipelines.kfp_backend import conform, required_backend

    platform = {"platforms": {"kubernetes": {"deploymentSpec": {"executors": {
        "exec-a": {"secretAsEnv": [{"secretName": "s", "optional": True,
                                    "keyToEnv": [{"secretKey": "k", "envVar": "K"}]}]},
        "exec-b": {"securityContext": {"runAsUser": "1000"},
                   "configMapAsEnv": [{"configMapName": "c", "optional": False}]}}}}}}
    assert required_backend(platform) == "2.16.0"
    with pytest.raises(ConfigError) as info:
        conform(platform, versions.KFP_BACKEND_LOWEST)
    text = str(info.value)
    assert len(info.value.problems) == 2, text
    assert "exec-a.secretAsEnv[0].optional=True needs Kubeflow Pipelines 2.15.0" in text
    assert "--kfp-backend 2.15.0" in text
    assert "exec-b.securityContext" in text and "2.16.0" in text
    # for 2.15.0, only the security context is too new; optional: false is simply left out
    with pytest.raises(ConfigError) as info:
        conform(platform, "2.15.0")
    assert len(info.value.problems) == 1 and "securityContext" in str(info.value)
    kept = conform(platform, "2.16.0")
    assert _executors(kept)["exec-a"]["secretAsEnv"][0]["optional"] is True
    stripped = conform({"platforms": {"kubernetes": {"deploymentSpec": {"executors": {
        "exec-b": {"configMapAsEnv": [{"configMapName": "c", "optional": False}]}}}}}},
        versions.KFP_BACKEND_LOWEST)
    assert _executors(stripped)["exec-b"]["configMapAsEnv"] == [{"configMapName": "c"}]


def test_a_target_below_the_lowest_supported_backend_is_refused(tmp_path):
    from kubeseg_platform.pipelines.kfp_backend import check_target

    for bad in ("2.5.0", "2.4.1", "1.8"):
        with pytest.raises(ConfigError, match=versions.KFP_BACKEND_LOWEST):
            check_target(bad)
    with pytest.raises(ConfigError, match="not a version"):
        check_target("latest")
    result = subprocess.run([sys.executable, "-m", "kubeseg", "compile", "--output",
                             str(tmp_path / "p.yaml"), "--kfp-backend", "2.5.0",
                             "--manifests", str(REPO / "manifests")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "--kfp-backend 2.5.0" in result.stderr and versions.KFP_BACKEND_LOWEST in \
        result.stderr
    assert not (tmp_path / "p.yaml").exists()


# -- submit: the server's release against the compiled target ---------------------------------
class _Healthz(BaseHTTPRequestHandler):
    tag_name = "unknown"
    seen = []

    def do_GET(self):  # noqa: N802 (the handler's API)
        type(self).seen.append(self.path)
        body = json.dumps({"commit_sha": "abc", "tag_name": type(self).tag_name,
                           "multi_user": False, "pipeline_store": "database"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def healthz():
    """A server answering GET /apis/v2beta1/healthz as the KFP API server does (kubeflow/
    pipelines 2.14.0 backend/src/apiserver/main.go: commit_sha, tag_name, multi_user,
    pipeline_store); it answers nothing else, so no run can be created."""
    _Healthz.seen = []
    server = HTTPServer(("127.0.0.1", 0), _Healthz)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _submit(server, tmp_path, pipeline_file=None):
    from kubeseg_platform.pipelines.submit import SubmitOptions, submit

    params = tmp_path / "params.yaml"
    params.write_text("num_classes: 3\nnum_training_samples: 10\n")
    return submit(SubmitOptions(host=f"http://127.0.0.1:{server.server_port}",
                                parameters=str(params), pipeline_file=pipeline_file,
                                token="t"))


def test_submit_refuses_a_backend_older_than_the_lowest_supported(healthz, tmp_path):
    _Healthz.tag_name = "2.5.0"
    with pytest.raises(KubesegError) as info:
        _submit(healthz, tmp_path)
    text = str(info.value)
    assert "backend is 2.5.0" in text and f"{versions.KFP_BACKEND_LOWEST} or newer" in text
    assert _Healthz.seen == ["/apis/v2beta1/healthz"]  # refused before anything was created


def test_submit_refuses_a_backend_older_than_the_compiled_target(healthz, tmp_path):
    from kubeseg_platform.pipelines.segmentation import compile_pipeline

    newer = compile_pipeline(str(tmp_path / "p.yaml"), "2.15.0")
    _Healthz.tag_name = "2.14.3"
    with pytest.raises(KubesegError) as info:
        _submit(healthz, tmp_path, newer)
    text = str(info.value)
    assert "backend is 2.14.3" in text and "needs 2.15.0 or newer" in text
    assert "kubeseg compile --kfp-backend 2.14.3" in text
    assert _Healthz.seen == ["/apis/v2beta1/healthz"]


def test_backend_versions_compare_as_releases():
    from kubeseg_platform.pipelines.kfp_backend import reported_version, server_version_problem

    assert reported_version("unknown") is None and reported_version(None) is None
    assert reported_version("2.14.3") == "2.14.3"
    for server, needed in (("2.14.0", "2.14.0"), ("2.14.4", "2.14.0"), ("2.17.0", "2.15.0"),
                           ("v2.15.0", "2.15.0"), ("2.16.0-rc.1", "2.15.0")):
        assert server_version_problem(server, needed, "p.yaml") is None, (server, needed)
    for server, needed in (("2.14.4", "2.15.0"), ("2.5.0", "2.14.0"), ("2.9.0", "2.14.0")):
        assert server_version_problem(server, needed, "p.yaml"), (server, needed)


def test_check_server_reads_the_reported_release(healthz):
    from kubeseg_platform.pipelines.submit import check_server

    _Healthz.tag_name = "2.16.1"
    assert check_server(f"http://127.0.0.1:{healthz.server_port}", None) == "2.16.1"


# -- the upstream rule itself: protoc + strict JSON parsing -----------------------------------
def _protos(tag: str) -> Path:
    folder = Path(os.environ.get(PROTOS_ENV) or PROTOS_DEFAULT) / tag
    if not (folder / "kubernetes_executor_config.proto").is_file():
        pytest.skip(f"kubeflow/pipelines {tag} protos not found in {folder} (set ${PROTOS_ENV}; "
                    "tests/schemas/UPSTREAM.md lists the files)")
    return folder


@lru_cache(maxsize=None)
def _executor_config_class(folder: str):
    """KubernetesExecutorConfig of the release whose protos are in ``folder``, in a pool of its
    own (the installed kfp-kubernetes registers the same file name in the default pool)."""
    import tempfile

    import grpc_tools
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    site = Path(grpc_tools.__file__).parents[1]  # google/rpc/status.proto lives here
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "set.pb"
        subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{folder}",
                        f"-I{Path(grpc_tools.__file__).parent / '_proto'}", f"-I{site}",
                        f"--descriptor_set_out={out}", "--include_imports",
                        "kubernetes_executor_config.proto"], check=True, capture_output=True)
        files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    pool = descriptor_pool.DescriptorPool()
    for file in files.file:
        pool.Add(file)
    return message_factory.GetMessageClass(
        pool.FindMessageTypeByName("kfp_kubernetes.KubernetesExecutorConfig"))


def _strict_parse(tag: str, config) -> None:
    from google.protobuf import json_format

    json_format.ParseDict(config, _executor_config_class(str(_protos(tag)))(),
                          ignore_unknown_fields=False)


@pytest.mark.parametrize("path", COMPILED, ids=lambda p: p.name)
def test_the_lowest_backends_strict_parser_accepts_every_committed_executor_config(path):
    for name, config in _executors(_platform(path)).items():
        _strict_parse(versions.KFP_BACKEND_LOWEST, config)


def test_the_lowest_backends_strict_parser_refuses_what_kfp_kubernetes_writes(tmp_path):
    """Without --kfp-backend, kfp-kubernetes' secretAsEnv[].optional would refuse the run."""
    from google.protobuf import json_format

    from kubeseg_platform.pipelines.segmentation import compile_pipeline

    newest = Path(compile_pipeline(str(tmp_path / "p.yaml"), versions.KFP_BACKEND_NEWEST_CHECKED))
    config = _executors(_platform(newest))["exec-train"]
    with pytest.raises(json_format.ParseError, match="optional"):
        _strict_parse(versions.KFP_BACKEND_LOWEST, config)
    _strict_parse("2.15.0", config)


def _field_paths(descriptor, prefix=""):
    """JSON paths of every executor-config field (list items marked []), not descending into
    the pipeline spec's own messages."""
    paths = set()
    for field in descriptor.fields:
        path = prefix + field.json_name + ("[]" if field.is_repeated else "")
        paths.add(path)
        message = field.message_type
        if message is not None and message.full_name.startswith("kfp_kubernetes.") \
                and not message.GetOptions().map_entry:
            paths |= _field_paths(message, path + ".")
    return paths


def test_the_field_table_matches_the_protos_of_each_release():
    from kubeseg_platform.pipelines.kfp_backend import PLATFORM_FIELDS

    releases = ("2.14.0", "2.15.0", "2.16.0", "2.17.0")
    assert releases[0] == versions.KFP_BACKEND_LOWEST
    assert releases[-1] == versions.KFP_BACKEND_NEWEST_CHECKED
    known = {tag: _field_paths(_executor_config_class(str(_protos(tag))).DESCRIPTOR)
             for tag in releases}
    table = {f.path.replace("[]", ""): f.since for f in PLATFORM_FIELDS}
    for before, tag in zip(releases, releases[1:]):
        added = {p.replace("[]", "") for p in known[tag] - known[before]}
        # a field added inside a new message counts once, at the message
        added = {p for p in added if not any(p.startswith(q + ".") for q in added)}
        assert added == {p for p, since in table.items() if since == tag}, tag
        assert not known[before] - known[tag], f"{tag} removed fields"
    # the installed kfp-kubernetes knows nothing beyond the newest release checked
    from kfp.kubernetes import kubernetes_executor_config_pb2 as installed

    assert _field_paths(installed.KubernetesExecutorConfig.DESCRIPTOR) <= \
        known[versions.KFP_BACKEND_NEWEST_CHECKED]
