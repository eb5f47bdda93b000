"""ServerProcess: readiness, failure to start, and stopping by PID."""
import sys

import pytest

from kubeseg.errors import KubesegError
from kubeseg.serving.process import ServerProcess
from s3server import free_port


def test_waits_until_ready_and_stops_the_child(tmp_path):
    port = free_port()
    (tmp_path / "ping").write_text("ok")
    command = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
               "--directory", str(tmp_path)]
    with ServerProcess(command, f"http://127.0.0.1:{port}", ready_path="/ping",
                       log_path=tmp_path / "log" / "server.log") as server:
        assert server.process.poll() is None
    assert server.process.poll() is not None
    assert (tmp_path / "log" / "server.log").exists()


def test_a_server_that_exits_is_reported_with_its_log(tmp_path):
    command = [sys.executable, "-c", "import sys; print('bad flag'); sys.exit(3)"]
    with pytest.raises(KubesegError, match=r"exited with code 3 .*server\.log"):
        ServerProcess(command, f"http://127.0.0.1:{free_port()}",
                      log_path=tmp_path / "server.log").start()
    assert "bad flag" in (tmp_path / "server.log").read_text()


def test_a_server_that_never_answers_times_out_and_is_stopped(tmp_path):
    command = [sys.executable, "-c", "import time; time.sleep(60)"]
    server = ServerProcess(command, f"http://127.0.0.1:{free_port()}", ready_timeout_s=1.5)
    with pytest.raises(KubesegError, match="not ready within 2 s"):
        server.start()
    assert server.process.poll() is not None
