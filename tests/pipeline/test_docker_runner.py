"""kfp.local's DockerRunner over podman: a container that removed itself between two API calls
is reported by podman as 500 "no such container"; for the duration of a run kubeseg makes that
the NotFound kfp.local handles, leaves every other error as it was, and afterwards gives the
docker SDK its own behaviour back. The run's environment is set for the run only."""
import os

import docker.errors
import pytest
import requests
from docker.api.client import APIClient

from kubeseg_platform.pipelines.container_engine import missing_container_as_not_found
from kubeseg_platform.pipelines.local_run import LocalRunOptions, run_environment, scoped_environ

MISSING = "container 46b2c890 does not exist in database: no such container"


def _response(status: int, message: str) -> requests.Response:
    response = requests.Response()
    response.status_code = status
    response.reason = "status"
    response.url = "http+docker://localhost/v1.41/containers/46b2c890/json"
    response._content = ('{"message": "%s"}' % message).encode()
    return response


@pytest.fixture
def client():
    return APIClient.__new__(APIClient)  # no connection needed to read a response


def test_podmans_missing_container_answer_is_not_found_during_the_run_only(client):
    with missing_container_as_not_found():
        with pytest.raises(docker.errors.NotFound, match="no such container"):
            client._raise_for_status(_response(500, MISSING))
    with pytest.raises(docker.errors.APIError) as caught:
        client._raise_for_status(_response(500, MISSING))
    assert not isinstance(caught.value, docker.errors.NotFound)


def test_other_errors_and_successes_are_unchanged(client):
    with missing_container_as_not_found():
        with pytest.raises(docker.errors.APIError) as caught:
            client._raise_for_status(_response(500, "image not known"))
        assert not isinstance(caught.value, docker.errors.NotFound)
        client._raise_for_status(_response(200, "ok"))


def test_the_runs_environment_is_put_back_after_it(monkeypatch, tmp_path):
    monkeypatch.delenv("KUBESEG_S3_ENDPOINT", raising=False)
    options = LocalRunOptions(workdir=tmp_path, s3_endpoint="http://127.0.0.1:9")
    with run_environment(options):
        assert os.environ["KUBESEG_S3_ENDPOINT"] == "http://127.0.0.1:9"
    assert "KUBESEG_S3_ENDPOINT" not in os.environ
    monkeypatch.setenv("KUBESEG_S3_ENDPOINT", "http://earlier:9000")
    with pytest.raises(RuntimeError):
        with run_environment(options):
            raise RuntimeError("a step failed")
    assert os.environ["KUBESEG_S3_ENDPOINT"] == "http://earlier:9000"
    monkeypatch.delenv("DOCKER_HOST", raising=False)
    with scoped_environ({"DOCKER_HOST": "unix:///run/podman.sock"}):
        assert os.environ["DOCKER_HOST"] == "unix:///run/podman.sock"
    assert "DOCKER_HOST" not in os.environ
