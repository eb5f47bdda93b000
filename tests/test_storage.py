"""kubeseg.storage against a real S3 server (SeaweedFS on loopback) and local folders."""
import os
import threading
import time
from pathlib import Path

import pytest

from kubeseg import storage
from kubeseg.errors import StorageError
from netfaults import SilentEndpoint, ThrottlingProxy
from s3server import start_s3_server


def test_round_trip_bytes_text_and_files(bucket, tmp_path):
    storage.write_bytes(f"{bucket}/a/b.bin", b"\x00\x01binary")
    storage.write_text(f"{bucket}/a/c.txt", "héllo")
    assert storage.read_bytes(f"{bucket}/a/b.bin") == b"\x00\x01binary"
    assert storage.read_text(f"{bucket}/a/c.txt") == "héllo"
    assert storage.exists(f"{bucket}/a/b.bin") and not storage.exists(f"{bucket}/a/zzz")
    src = tmp_path / "src.dat"
    src.write_bytes(os.urandom(1000))
    storage.upload_file(str(src), f"{bucket}/f/src.dat")
    storage.download_file(f"{bucket}/f/src.dat", str(tmp_path / "back" / "src.dat"))
    assert (tmp_path / "back" / "src.dat").read_bytes() == src.read_bytes()
    storage.delete(f"{bucket}/a/c.txt")
    assert storage.list_files(f"{bucket}/a") == ["b.bin"]


def test_listing_more_than_a_thousand_keys(bucket):
    names = [f"k{i:05d}.txt" for i in range(1100)]
    list(storage.iter_parallel(lambda n: storage.write_bytes(f"{bucket}/many/{n}", b"x"),
                               names, workers=16))
    assert storage.list_files(f"{bucket}/many") == names
    assert storage.list_files(f"{bucket}/many/") == names


def test_sizes_of_a_listing_local_and_on_s3(bucket, tmp_path):
    for root in (f"{bucket}/sized", str(tmp_path / "sized")):
        storage.write_bytes(storage.join(root, "a.bin"), b"x" * 3)
        storage.write_bytes(storage.join(root, "sub/b.bin"), b"y" * 1000)
        assert storage.list_sizes(root) == {"a.bin": 3, "sub/b.bin": 1000}


def test_twenty_megabyte_object_goes_multipart_and_round_trips(bucket, tmp_path):
    data = os.urandom(20 * 1024 * 1024)
    assert len(data) > 2 * storage.MULTIPART_PART_SIZE
    storage.write_bytes(f"{bucket}/big/blob", data)
    assert storage.read_bytes(f"{bucket}/big/blob") == data
    # An object uploaded in parts carries an ETag of the form "<md5>-<parts>".
    stat = storage.client().stat_object(bucket[5:], "big/blob")
    assert stat.etag.endswith("-3"), stat.etag
    local = tmp_path / "big.bin"
    local.write_bytes(data)
    storage.upload_file(str(local), f"{bucket}/big/file")
    storage.download_file(f"{bucket}/big/file", str(tmp_path / "big.back"))
    assert (tmp_path / "big.back").read_bytes() == data


def test_prefix_upload_and_download_concurrently(bucket, tmp_path):
    src = tmp_path / "src"
    for i in range(30):
        (src / f"d{i % 3}").mkdir(parents=True, exist_ok=True)
        (src / f"d{i % 3}" / f"f{i}.txt").write_text(str(i))
    uploaded = storage.upload_prefix(str(src), f"{bucket}/tree")
    assert len(uploaded) == 30
    got = storage.download_prefix(f"{bucket}/tree", str(tmp_path / "dst"))
    assert sorted(got) == sorted(uploaded)
    for name in got:
        assert (tmp_path / "dst" / name).read_text() == (src / name).read_text()


def test_missing_key_and_missing_bucket_name_what_is_missing(bucket, s3_env):
    with pytest.raises(StorageError, match="object not found") as err:
        storage.read_bytes(f"{bucket}/nope/key.bin")
    assert f"{bucket}/nope/key.bin" in str(err.value) and s3_env.endpoint in str(err.value)
    with pytest.raises(StorageError, match="bucket 'no-such-bucket-x' does not exist"):
        storage.read_bytes("s3://no-such-bucket-x/key")


def test_wrong_and_missing_credentials(bucket, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    with pytest.raises(StorageError, match="access refused \\(SignatureDoesNotMatch\\)"):
        storage.read_bytes(f"{bucket}/x")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "nobody")
    with pytest.raises(StorageError, match="access refused \\(InvalidAccessKeyId\\)"):
        storage.write_bytes(f"{bucket}/x", b"1")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MINIO_ACCESS_KEY",
                 "MINIO_SECRET_KEY", "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(StorageError, match="no S3 credentials for endpoint .*AWS_ACCESS_KEY_ID"):
        storage.read_bytes(f"{bucket}/x")


def test_unreachable_endpoint_fails_fast_with_a_clear_error(monkeypatch):
    monkeypatch.setenv("KUBESEG_S3_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    start = time.monotonic()
    with pytest.raises(StorageError, match="endpoint http://127.0.0.1:9 unreachable"):
        storage.read_bytes("s3://bucket/key")
    assert time.monotonic() - start < 30


def test_server_killed_mid_test_gives_a_clear_error_without_hanging(tmp_path, monkeypatch):
    server = start_s3_server(tmp_path / "own-server")
    try:
        for name, value in server.env().items():
            monkeypatch.setenv(name, value)
        storage.ensure_bucket("s3://doomed")
        storage.write_bytes("s3://doomed/k", b"v")
        assert storage.read_bytes("s3://doomed/k") == b"v"
        server.stop()
        outcome = {}

        def read():
            try:
                storage.read_bytes("s3://doomed/k")
                outcome["result"] = "returned"
            except StorageError as exc:
                outcome["error"] = str(exc)

        worker = threading.Thread(target=read, daemon=True)
        worker.start()
        worker.join(timeout=60)
        assert not worker.is_alive(), "read hung after the server died"
        assert "unreachable" in outcome.get("error", ""), outcome
    finally:
        server.stop()


def test_local_writes_are_atomic_and_listing_skips_temporaries(tmp_path, monkeypatch):
    target = tmp_path / "out" / "model.bin"
    storage.write_bytes(str(target), b"first")
    (tmp_path / "out" / ".model.bin.abc.tmp").write_bytes(b"partial")
    assert storage.list_files(str(tmp_path / "out")) == ["model.bin"]

    # A write that fails before its rename leaves the old content and no temporary behind.
    def failing_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="No space left"):
        storage.write_bytes(str(target), b"second")
    monkeypatch.undo()
    assert target.read_bytes() == b"first"
    assert sorted(p.name for p in target.parent.iterdir()) == [".model.bin.abc.tmp", "model.bin"]
    with pytest.raises(StorageError, match="file not found"):
        storage.read_bytes(str(tmp_path / "missing"))
    with pytest.raises(StorageError, match="folder not found"):
        storage.list_files(str(tmp_path / "missing"))


def test_uri_helpers():
    assert storage.join("s3://b/a/", "/c", "d/") == "s3://b/a/c/d"
    assert storage.join("/tmp/x", "y") == str(Path("/tmp/x/y"))
    assert storage.split_s3("s3://bucket/a/b") == ("bucket", "a/b")
    with pytest.raises(StorageError, match="not a valid S3 URI"):
        storage.split_s3("s3://ab/key")
    settings = storage.S3Settings.from_env({"MINIO_ENDPOINT": "minio.kubeflow:9000",
                                            "MINIO_ACCESS_KEY": "a", "MINIO_SECRET_KEY": "b"})
    assert (settings.endpoint, settings.secure, settings.access_key) == (
        "minio.kubeflow:9000", True, "a")
    settings = storage.S3Settings.from_env({"KUBESEG_S3_ENDPOINT": "http://h:1"})
    assert settings.url == "http://h:1" and not settings.secure
    with pytest.raises(StorageError, match="not an http"):
        storage.S3Settings.from_env({"KUBESEG_S3_ENDPOINT": "ftp://h"})


def test_model_uri_prefers_the_recorded_store_location_to_the_local_mount():
    from types import SimpleNamespace

    recorded = SimpleNamespace(metadata={"uri": "s3://kubeseg/runs/r/train/model"},
                               path="/minio/mlpipeline/r/train/model")
    assert storage.model_uri(recorded) == "s3://kubeseg/runs/r/train/model"
    for metadata in ({}, {"uri": ""}, {"algorithm": "fcn"}):
        plain = SimpleNamespace(metadata=metadata, path="/tmp/imported/model")
        assert storage.model_uri(plain) == "/tmp/imported/model"


def test_arrow_filesystem_reads_what_storage_wrote(bucket):
    storage.write_bytes(f"{bucket}/arrow/x.bin", b"arrow-bytes")
    fs, path = storage.arrow_filesystem(f"{bucket}/arrow/x.bin")
    with fs.open_input_file(path) as f:
        assert f.read() == b"arrow-bytes"


@pytest.mark.parametrize("umask", [0o027, 0o002])
def test_local_results_get_the_permissions_the_umask_gives(tmp_path, umask):
    import stat
    import subprocess
    import sys

    # A process of its own sets the umask: this one's is left as it is.
    script = ("import os, sys\n"
              f"os.umask({umask:#o})\n"
              "from kubeseg import storage\n"
              "storage.write_bytes(sys.argv[1] + '/a.json', b'{}')\n"
              "storage.upload_file(sys.argv[1] + '/a.json', sys.argv[1] + '/b.json')\n")
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True, timeout=60)
    for name in ("a.json", "b.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask, name


def test_local_writes_never_read_or_change_the_umask(tmp_path, monkeypatch):
    def no_umask(mask):
        raise AssertionError("os.umask called during a write")

    monkeypatch.setattr(os, "umask", no_umask)
    storage.write_bytes(str(tmp_path / "a.json"), b"{}")
    storage.upload_file(str(tmp_path / "a.json"), str(tmp_path / "sub" / "b.json"))
    assert (tmp_path / "sub" / "b.json").read_bytes() == b"{}"
    assert not hasattr(storage, "_umask")


def test_a_temporary_name_already_taken_is_skipped(tmp_path, monkeypatch):
    import uuid

    first, second = uuid.UUID("11111111" + "0" * 24), uuid.UUID("22222222" + "0" * 24)
    names = iter([first, second])
    monkeypatch.setattr(uuid, "uuid4", lambda: next(names))
    taken = tmp_path / ".out.bin.11111111.tmp"
    taken.write_bytes(b"another writer's")
    created = Path(storage._temp_beside(tmp_path / "out.bin"))
    assert created.name == ".out.bin.22222222.tmp"
    assert created.read_bytes() == b"" and taken.read_bytes() == b"another writer's"


# --------------------------------------------------------------------------------------------
# An endpoint that accepts connections and never answers; a slow link; credentials in URLs;
# special files
DEADLINE_S = 3


@pytest.fixture
def silent_endpoint(monkeypatch):
    endpoint = SilentEndpoint()
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "S3_ENDPOINT", "MINIO_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KUBESEG_S3_ENDPOINT", endpoint.url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("KUBESEG_S3_TIMEOUT", str(DEADLINE_S))
    yield endpoint
    endpoint.close()


@pytest.mark.parametrize("operation", [
    lambda: storage.read_bytes("s3://bucket/key"),
    lambda: storage.exists("s3://bucket/key"),
    lambda: storage.list_files("s3://bucket/prefix"),
    lambda: storage.write_bytes("s3://bucket/key", b"x"),
])
def test_silent_endpoint_times_out_within_the_deadline(silent_endpoint, operation):
    start = time.monotonic()
    with pytest.raises(StorageError) as caught, storage.command_deadline():
        operation()
    elapsed = time.monotonic() - start
    assert "timed out" in str(caught.value) and silent_endpoint.url in str(caught.value)
    assert "KUBESEG_S3_TIMEOUT" in str(caught.value)
    assert silent_endpoint.accepted, "the client never connected"
    assert elapsed < DEADLINE_S + 2, elapsed  # the deadline, plus a little for the last read


def test_one_deadline_covers_every_call_of_a_command(silent_endpoint):
    """Once the endpoint has been silent for the deadline, later calls of the same command
    fail at once, without another connection; a new command counts afresh."""
    with storage.command_deadline():
        with pytest.raises(StorageError, match="timed out"):
            storage.list_files("s3://bucket/train")
        connections = len(silent_endpoint.accepted)
        for call in (lambda: storage.list_files("s3://bucket/train_annotation"),
                     lambda: storage.write_text("s3://bucket/report.json", "{}")):
            with pytest.raises(StorageError) as caught:
                call()
            assert "timed out" in str(caught.value) and silent_endpoint.url in str(caught.value)
            assert "KUBESEG_S3_TIMEOUT" in str(caught.value)
        assert len(silent_endpoint.accepted) == connections, "a call waited again"
    with storage.command_deadline(), pytest.raises(StorageError, match="timed out"):
        storage.read_bytes("s3://bucket/key")
    assert len(silent_endpoint.accepted) > connections


def test_timeout_settings_are_checked(monkeypatch):
    for name in ("KUBESEG_S3_TIMEOUT", "KUBESEG_S3_CONNECT_TIMEOUT", "KUBESEG_S3_READ_TIMEOUT"):
        with monkeypatch.context() as patch:
            patch.setenv(name, "soon")
            with pytest.raises(StorageError, match=f"{name}='soon'"):
                storage.S3Settings.from_env()
    settings = storage.S3Settings.from_env({"KUBESEG_S3_CONNECT_TIMEOUT": "2",
                                            "KUBESEG_S3_READ_TIMEOUT": "7"})
    assert (settings.timeout_s, settings.connect_timeout_s, settings.read_timeout_s) == (
        45.0, 2.0, 7.0)


def _cli(args, env, timeout=240):
    import subprocess
    import sys

    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "kubeseg", *args], env=env, timeout=timeout,
                          capture_output=True, text=True)
    return done, started, time.monotonic()


def _storage_verb(verb, tmp_path):
    """Arguments of a storage-bound verb whose inputs and outputs all live on S3."""
    channels = ["--data-root", "s3://data/camvid"]
    return {
        "validate": ["validate", *channels, "--num-classes", "3", "--output", "s3://data/report"],
        "ingest": ["ingest", *channels, "--output", "s3://data/shards"],
        "train": ["train", *channels, "--set", "num_classes=3", "--set",
                  "num_training_samples=4", "--set", "epochs=1", "--output", "s3://data/run",
                  "--device", "cpu"],
        "predict": ["predict", "s3://data/run/model", "--input", "s3://data/new",
                    "--output", "s3://data/masks", "--no-progress"],
        "serve": ["serve", "s3://data/run/model", "--port", "0"],
    }[verb]


def _silent_env(endpoint, **extra):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]),
               KUBESEG_S3_ENDPOINT=endpoint.url, AWS_ACCESS_KEY_ID="k",
               AWS_SECRET_ACCESS_KEY="s", **extra)
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "S3_ENDPOINT", "MINIO_ENDPOINT",
                 "KUBESEG_S3_TIMEOUT", "KUBESEG_S3_CONNECT_TIMEOUT", "KUBESEG_S3_READ_TIMEOUT"):
        if name not in extra:
            env.pop(name, None)
    return env


@pytest.mark.slow
@pytest.mark.parametrize("verb", ["validate", "ingest", "train", "predict", "serve"])
def test_every_step_fails_once_at_its_deadline_naming_endpoint_and_setting(tmp_path, verb):
    """--s3-timeout (over a long KUBESEG_S3_TIMEOUT) bounds the whole command: from its first
    storage request to its exit, the deadline and a margin for the exit, however many calls
    the verb makes (validate makes four: two listings, two report files)."""
    endpoint = SilentEndpoint()
    try:
        env = _silent_env(endpoint, KUBESEG_S3_TIMEOUT="600")
        done, _, ended = _cli([*_storage_verb(verb, tmp_path), "--s3-timeout", "5"], env)
    finally:
        endpoint.close()
    output = done.stdout + done.stderr
    assert done.returncode != 0, output[-2000:]
    assert "timed out" in output and endpoint.url in output, output[-2000:]
    assert "--s3-timeout" in output and "KUBESEG_S3_TIMEOUT" in output, output[-2000:]
    assert "Traceback" not in output, output[-3000:]
    assert endpoint.accepted_at, "the command never connected"
    after_first_request = ended - endpoint.accepted_at[0]
    assert after_first_request < 5 + 4, after_first_request


@pytest.mark.slow
def test_with_the_defaults_a_silent_endpoint_fails_each_step_within_a_minute(tmp_path):
    """validate, ingest, train and predict, each against an endpoint of its own that accepts
    and never answers, with no storage setting given, run side by side."""
    import subprocess
    import sys

    verbs = ["validate", "ingest", "train", "predict"]
    endpoints = {verb: SilentEndpoint() for verb in verbs}
    try:
        started = time.monotonic()
        runs = {verb: subprocess.Popen(
            [sys.executable, "-m", "kubeseg", *_storage_verb(verb, tmp_path)],
            env=_silent_env(endpoints[verb]), stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True) for verb in verbs}
        results = {}
        for verb, run in runs.items():
            output, _ = run.communicate(timeout=240)
            results[verb] = (run.returncode, output, time.monotonic() - started)
    finally:
        for endpoint in endpoints.values():
            endpoint.close()
    for verb, (code, output, _) in results.items():
        assert code != 0 and "timed out" in output, (verb, output[-2000:])
        assert endpoints[verb].url in output and "KUBESEG_S3_TIMEOUT" in output, output[-2000:]
        assert f"now {storage.DEADLINE.default_s:g} s" in output, output[-2000:]
    # each finished when its communicate() returned: at most this long after the start
    elapsed = {verb: round(seconds, 1) for verb, (_, _, seconds) in results.items()}
    print("failed after (s, four commands side by side):", elapsed)
    assert max(elapsed.values()) < 75, elapsed


@pytest.mark.slow
def test_a_slow_transfer_that_keeps_moving_outlasts_the_deadline(bucket, s3_env, monkeypatch):
    """Through a proxy that passes about 2 MB/s, an object in two parts goes up and comes
    back in several seconds each, longer than the deadline of 3 s: the transfer keeps moving
    and each answer restarts the count, so nothing is cut."""
    port = int(s3_env.endpoint.rsplit(":", 1)[1])
    proxy = ThrottlingProxy(("127.0.0.1", port), bytes_per_s=2_000_000)
    data = os.urandom(storage.MULTIPART_PART_SIZE + 1024)
    try:
        monkeypatch.setenv("KUBESEG_S3_ENDPOINT", proxy.url)
        monkeypatch.setenv("KUBESEG_S3_TIMEOUT", "3")
        with storage.command_deadline():
            started = time.monotonic()
            storage.write_bytes(f"{bucket}/slow/blob", data)
            uploaded = time.monotonic()
            back = storage.read_bytes(f"{bucket}/slow/blob")
            downloaded = time.monotonic()
    finally:
        proxy.close()
    assert back == data
    assert proxy.moved > 2 * len(data)  # both ways through the slow link
    # the precondition of the test, not a speed claim: each way outlasted the deadline
    assert uploaded - started > 3 and downloaded - uploaded > 3, (uploaded - started,
                                                                  downloaded - uploaded)


def test_credentials_in_the_endpoint_are_refused_without_echoing_them(monkeypatch):
    monkeypatch.setenv("KUBESEG_S3_ENDPOINT", "http://AKIAEXAMPLE:t0pS3cret@127.0.0.1:9000")
    with pytest.raises(StorageError) as caught:
        storage.read_bytes("s3://bucket/key")
    message = str(caught.value)
    assert "t0pS3cret" not in message and "AKIAEXAMPLE" not in message
    assert "AWS_SECRET_ACCESS_KEY" in message and "Secret" in message
    with pytest.raises(StorageError) as caught:
        storage.read_bytes("s3://AKIAEXAMPLE:t0pS3cret@bucket/key")
    assert "t0pS3cret" not in str(caught.value)
    assert storage.redact("see s3://a:b@host/x and http://u:p@h:1") == \
        "see s3://***@host/x and http://***@h:1"


@pytest.mark.timeout(60)
def test_special_files_are_refused_never_opened(tmp_path):
    fifo = tmp_path / "x.png"
    os.mkfifo(fifo)
    with pytest.raises(StorageError, match="FIFO"):
        storage.read_bytes(str(fifo))
    with pytest.raises(StorageError, match="FIFO"):
        storage.upload_file(str(fifo), str(tmp_path / "copy.png"))
    assert storage.special_file_kind("/dev/null") == "character device"
    with pytest.raises(StorageError, match="character device"):
        storage.read_bytes("/dev/zero")


KEY_IN_URL, SECRET_IN_URL = "AKIAKUBESEGEXAMPLE", "Zq8-sEcReT-vAlUe-9"


@pytest.mark.slow
def test_no_output_of_a_run_echoes_credentials_given_in_urls(tmp_path):
    """Credentials pasted into the endpoint or into s3:// URIs are refused; neither the
    messages, nor the logs, nor the reports written repeat them."""
    creds = f"{KEY_IN_URL}:{SECRET_IN_URL}@"
    base = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]),
                AWS_ACCESS_KEY_ID="k", AWS_SECRET_ACCESS_KEY="s", KUBESEG_S3_TIMEOUT="3")
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "S3_ENDPOINT", "MINIO_ENDPOINT"):
        base.pop(name, None)
    in_endpoint = dict(base, KUBESEG_S3_ENDPOINT=f"http://{creds}127.0.0.1:9")
    plain_endpoint = dict(base, KUBESEG_S3_ENDPOINT="http://127.0.0.1:9")
    channels = ["--train", "s3://data/train", "--train-annotation", "s3://data/ann"]
    uri_channels = ["--train", f"s3://{creds}data/train", "--train-annotation",
                    f"s3://{creds}data/ann"]
    runs = [
        (in_endpoint, ["validate", *channels, "--num-classes", "3", "--output",
                       str(tmp_path / "report-1")]),
        (plain_endpoint, ["validate", *uri_channels, "--num-classes", "3", "--output",
                          str(tmp_path / "report-2")]),
        (in_endpoint, ["ingest", *channels, "--output", "s3://data/shards"]),
        (in_endpoint, ["train", *channels, "--set", "num_classes=3", "--set",
                       "num_training_samples=4", "--output", "s3://data/run"]),
        (in_endpoint, ["serve", "s3://data/run/model", "--port", "0"]),
        (plain_endpoint, ["serve", f"s3://{creds}data/run/model", "--port", "0"]),
    ]
    outputs = []
    for env, args in runs:
        done, _, _ = _cli(args, env)
        output = done.stdout + done.stderr
        assert done.returncode != 0, (args, output[-2000:])
        assert "credentials" in output and "AWS_SECRET_ACCESS_KEY" in output, output[-2000:]
        outputs.append(output)
    written = [p.read_text(errors="replace") for p in tmp_path.rglob("*") if p.is_file()]
    assert len(written) >= 4  # report.json and report.md of both validations
    for text in outputs + written:
        assert SECRET_IN_URL not in text and KEY_IN_URL not in text, text[-2000:]


def test_parquet_filesystem_on_a_silent_endpoint_gives_up_within_the_deadline(silent_endpoint):
    uri = "s3://bucket/shards/part-0.parquet"
    filesystem, path = storage.arrow_filesystem(uri)
    start = time.monotonic()
    with storage.command_deadline(), pytest.raises(StorageError) as caught:
        storage.arrow_call(uri, lambda: filesystem.get_file_info(path))
    # its attempts' timeouts add up to the deadline; the SDK's backoff between them is short
    assert time.monotonic() - start < DEADLINE_S + 5
    assert silent_endpoint.accepted
    message = str(caught.value)
    assert "timed out" in message and silent_endpoint.url in message and uri in message
    assert "AWS Error" not in message and "curlCode" not in message


def test_the_deadline_option_is_checked_and_shown_in_help(capsys):
    from kubeseg.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["validate", "--data-root", "d", "--num-classes", "3", "--s3-timeout", "0"])
    assert exited.value.code == 2
    assert "--s3-timeout: '0': a number of seconds in (0, 86400]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["ingest", "--help"])
    assert "--s3-timeout SECONDS" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# The Arrow S3 filesystem (streamed shards): its errors read like every other storage error
RAW_SDK_TEXT = ("AWS Error", "curlCode", "Traceback")


def _shards_on_own_server(tmp_path, monkeypatch, n_train):
    """A server of the test's own, holding a small shard set at s3://doomed/shards."""
    from kubeseg.data.channels import Channels
    from kubeseg.data.ingest import ingest_channels
    from kubeseg.data.synthetic import make_shapes_dataset

    server = start_s3_server(tmp_path / "own-server")
    for name, value in server.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("KUBESEG_S3_TIMEOUT", "10")
    make_shapes_dataset(tmp_path / "data", n_train=n_train, n_val=2, size=32, num_classes=3)
    storage.ensure_bucket("s3://doomed")
    ingest_channels(Channels.from_root(str(tmp_path / "data")), "s3://doomed/shards",
                    shard_size_mb=0.005)
    return server


def _kill(server):
    import signal

    os.killpg(server.process.pid, signal.SIGKILL)  # its own session: the group is its pid
    server.process.wait(timeout=10)


def test_a_server_killed_during_a_shard_read_names_endpoint_and_shard(tmp_path, monkeypatch,
                                                                       caplog):
    import logging

    from kubeseg.data.datasets import ShardDataset

    server = _shards_on_own_server(tmp_path, monkeypatch, n_train=6)
    try:
        samples = iter(ShardDataset("s3://doomed/shards", "train", shuffle=False,
                                    return_key=True))
        next(samples)  # the first shard is read
        _kill(server)
        caplog.set_level(logging.DEBUG, logger="kubeseg")
        with pytest.raises(StorageError) as caught:
            for _ in samples:
                pass
    finally:
        server.stop()
    message = str(caught.value)
    assert server.endpoint in message and "s3://doomed/shards/train-0000" in message, message
    assert "unreachable" in message and "KUBESEG_S3_ENDPOINT" in message, message
    shown = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    for raw in RAW_SDK_TEXT:
        assert raw not in message and not any(raw in m for m in shown), (raw, message)
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert any("curlCode" in m for m in debug), debug  # the SDK's own words, for -v


@pytest.mark.slow
def test_training_from_shards_when_the_server_dies_ends_with_a_storage_message(tmp_path,
                                                                               monkeypatch):
    """The server is killed once training has started: the data-loading worker's failure
    reaches the user as one line naming the endpoint and the shard."""
    import subprocess
    import sys

    server = _shards_on_own_server(tmp_path, monkeypatch, n_train=64)
    args = ["train", "--shards", "s3://doomed/shards", "--output", str(tmp_path / "run"),
            "--device", "cpu", "--workers", "1", "--log-every", "1"]
    for name, value in dict(num_classes=3, num_training_samples=64, backbone="resnet-18",
                            use_pretrained_model=False, crop_size=32, base_size=32,
                            mini_batch_size=4, epochs=2).items():
        args += ["--set", f"{name}={value}"]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    try:
        run = subprocess.Popen([sys.executable, "-m", "kubeseg", *args], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines = []
        for line in run.stdout:
            lines.append(line)
            if "kubeseg.engine.train: training " in line:  # the loaders start next
                _kill(server)
                break
        lines.append(run.stdout.read())
        run.wait(timeout=120)
    finally:
        server.stop()
    output = "".join(lines)
    assert run.returncode == 1, output[-3000:]
    error = output.strip().splitlines()[-1]
    assert error.startswith("kubeseg train: error: "), output[-3000:]
    assert server.endpoint in error and "s3://doomed/shards/train-" in error, error
    for raw in RAW_SDK_TEXT:
        assert raw not in output, output[-3000:]
