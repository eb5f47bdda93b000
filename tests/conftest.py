"""Shared fixtures: a real S3 server on loopback, S3 environment, and small helpers."""
from __future__ import annotations

import sys
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/s3server.py, tests/sample helpers

from s3server import start_s3_server  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CAMVID = REPO.parent / "shared" / "datasets" / "camvid"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """One SeaweedFS server for the test session, stopped by its PID at the end."""
    server = start_s3_server(tmp_path_factory.mktemp("seaweedfs"))
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Point kubeseg.storage at the test server through the documented variables."""
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "S3_ENDPOINT", "MINIO_ENDPOINT",
                 "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return s3_server


@pytest.fixture
def bucket(s3_env):
    """A fresh bucket on the test server; returns its ``s3://name`` URI."""
    from kubeseg import storage

    name = f"t-{uuid.uuid4().hex[:12]}"
    storage.ensure_bucket(f"s3://{name}")
    return f"s3://{name}"


@pytest.fixture(scope="session")
def camvid():
    if not CAMVID.is_dir():
        pytest.skip(f"CamVid sample not found at {CAMVID} (../shared/datasets/camvid)")
    return CAMVID
