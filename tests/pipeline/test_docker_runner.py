"""kfp.local's DockerRunner over podman: a container that removed itself between two API calls
is reported by podman as 500 "no such container"; kubeseg makes that the NotFound kfp.local
handles, and leaves every other error as it was."""
import docker.errors
import pytest
import requests
from docker.api.client import APIClient

from pipelines.local_run import treat_missing_container_as_not_found


def _response(status: int, message: str) -> requests.Response:
    response = requests.Response()
    response.status_code = status
    response.reason = "status"
    response.url = "http+docker://localhost/v1.41/containers/46b2c890/json"
    response._content = ('{"message": "%s"}' % message).encode()
    return response


@pytest.fixture(scope="module")
def client():
    treat_missing_container_as_not_found()
    treat_missing_container_as_not_found()  # a second call must not wrap twice
    return APIClient.__new__(APIClient)  # no connection needed to read a response


def test_podmans_missing_container_answer_is_not_found(client):
    with pytest.raises(docker.errors.NotFound, match="no such container"):
        client._raise_for_status(_response(
            500, "container 46b2c890 does not exist in database: no such container"))


def test_other_errors_and_successes_are_unchanged(client):
    with pytest.raises(docker.errors.APIError) as caught:
        client._raise_for_status(_response(500, "image not known"))
    assert not isinstance(caught.value, docker.errors.NotFound)
    client._raise_for_status(_response(200, "ok"))
