"""Object storage: one interface over ``s3://bucket/key`` URIs and local paths.

S3-compatible servers (MinIO on a cluster) are reached through the ``minio`` client. Settings
come from the environment:

==============================  ==========================================================
``KUBESEG_S3_ENDPOINT``         endpoint URL, e.g. ``http://minio.kubeflow:9000`` (the scheme
                                picks TLS). Also read: ``AWS_ENDPOINT_URL_S3``,
                                ``AWS_ENDPOINT_URL``, ``S3_ENDPOINT``, ``MINIO_ENDPOINT``.
                                Default: ``https://s3.amazonaws.com``.
``AWS_ACCESS_KEY_ID``           access key (or ``MINIO_ACCESS_KEY``, ``MINIO_ROOT_USER``)
``AWS_SECRET_ACCESS_KEY``       secret key (or ``MINIO_SECRET_KEY``, ``MINIO_ROOT_PASSWORD``)
``AWS_SESSION_TOKEN``           optional session token
``AWS_REGION``                  optional region (or ``AWS_DEFAULT_REGION``)
``KUBESEG_S3_VERIFY``           ``false`` skips TLS certificate checks; ``AWS_CA_BUNDLE``
                                names a CA
``KUBESEG_S3_TIMEOUT``          seconds a command may wait on an endpoint that does not
                                answer (default 45; ``--s3-timeout`` of the storage verbs)
``KUBESEG_S3_CONNECT_TIMEOUT``  seconds to open one connection (default 5)
``KUBESEG_S3_READ_TIMEOUT``     longest pause in seconds between two packets of a request or
                                of its response (default 20)
==============================  ==========================================================

Credentials never travel in URLs: an endpoint or URI with ``user:password@`` is refused (the
message does not repeat it); give them through the environment (on a cluster, the storage Secret).

Deadline. ``KUBESEG_S3_TIMEOUT`` bounds the whole command (one verb, one pipeline step), not
each call: it is the time the command may spend waiting on an endpoint since that endpoint
last answered. Any answer restarts the count, time spent computing is not counted, and a
transfer that keeps moving is never cut, however long it takes; an endpoint that accepts
connections and never answers, or cannot be reached, fails the command with "timed out",
naming the endpoint and the setting, within that time after the first request (45 s: with the
start of the process, within a minute). The rule in full is in :mod:`kubeseg.storage_deadline`.

Writes are atomic: local files are written to a temporary name in the same folder and renamed;
S3 objects only become visible when the upload (single or multipart) completes. Transient
errors are retried with exponential backoff within the deadline. Local special files (FIFOs,
devices, sockets) are refused, never opened: reading a FIFO would block forever.
"""
from __future__ import annotations

import concurrent.futures
import functools
import io
import logging
import os
import re
import shutil
import stat
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, TypeVar
from urllib.parse import urlparse

from kubeseg import storage_deadline
from kubeseg.errors import StorageError
from kubeseg.storage_deadline import command_deadline  # noqa: F401 (part of this interface)

logger = logging.getLogger(__name__)

MULTIPART_PART_SIZE = 8 * 1024 * 1024  # objects above this are uploaded in parts
RETRIES = 3
BACKOFF_S = 0.25
DEFAULT_WORKERS = 8

T = TypeVar("T")


# --------------------------------------------------------------------------------------------
# URIs
def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


CREDENTIALS_IN_URL = ("holds credentials (user:password@ before the host); they are not accepted "
                      "in URLs, which end up in logs and reports: remove them and set "
                      "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY in the environment (on a "
                      "cluster, from the storage Secret)")


def redact(text: str) -> str:
    """``text`` with any ``scheme://user:password@`` credentials replaced by ``***``."""
    return re.sub(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/@\s'\"]+@", r"\1***@", str(text))


def split_s3(uri: str) -> Tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``."""
    rest = str(uri)[len("s3://"):]
    bucket, _, key = rest.partition("/")
    if "@" in bucket:
        raise StorageError(f"the URI {redact(uri)!r} {CREDENTIALS_IN_URL}")
    if len(bucket) < 3:
        raise StorageError(f"{uri!r}: not a valid S3 URI; expected s3://bucket/key with a bucket "
                           "name of at least 3 characters")
    return bucket, key


def join(base: str, *parts: str) -> str:
    """Join URI or path parts with single slashes (works for s3:// and local paths)."""
    base = str(base)
    if not is_s3(base):
        return str(Path(base).joinpath(*parts))
    out = base.rstrip("/")
    for p in parts:
        p = str(p).strip("/")
        if p:
            out += "/" + p
    return out


def basename(uri: str) -> str:
    return str(uri).rstrip("/").rsplit("/", 1)[-1]


def model_uri(model: Any) -> str:
    """Where a pipeline step reads a Model artifact (KFP's ``Input[Model]``) from: the ``uri``
    in its metadata, else its ``path``.

    The step that made the model ran in a pod of its own and recorded the model's object-store
    location (``s3://...``) as ``metadata["uri"]``; ``path`` is only this step's local mount of
    a copy, which does not exist outside this pod (a server or a later run could not read it).
    Artifacts made without that record (imported, or from a local run) have ``path`` alone.
    """
    return model.metadata.get("uri") or model.path


# --------------------------------------------------------------------------------------------
# S3 settings and client
@dataclass(frozen=True)
class TimingSetting:
    """A time limit of storage access, declared once: its S3Settings field, environment
    variable, default and meaning (the CLI's help and the docs use these)."""

    field: str
    variable: str
    default_s: float
    meaning: str


DEADLINE = TimingSetting(
    "timeout_s", "KUBESEG_S3_TIMEOUT", 45.0,
    "seconds a command may wait on an S3 endpoint that does not answer, counted from its last "
    "answer over all requests and retries; a transfer that keeps moving is never cut")
CONNECT_TIMEOUT = TimingSetting("connect_timeout_s", "KUBESEG_S3_CONNECT_TIMEOUT", 5.0,
                                "seconds to open one connection to the S3 endpoint")
READ_TIMEOUT = TimingSetting("read_timeout_s", "KUBESEG_S3_READ_TIMEOUT", 20.0,
                             "longest pause in seconds between two packets of a request or of "
                             "its response")
TIMING_SETTINGS = (DEADLINE, CONNECT_TIMEOUT, READ_TIMEOUT)
TIMEOUT_VARIABLE = DEADLINE.variable
DEADLINE_OPTION = "--s3-timeout"


def _timing_value(setting: TimingSetting, raw: Optional[str]) -> float:
    if not raw:
        return setting.default_s
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value <= 86400:
        raise StorageError(f"{setting.variable}={raw!r}: must be a number of seconds in "
                           "(0, 86400]")
    return value


@dataclass(frozen=True)
class S3Settings:
    endpoint: str  # host[:port]
    secure: bool
    access_key: Optional[str]
    secret_key: Optional[str]
    session_token: Optional[str] = None
    region: Optional[str] = None
    verify: bool = True
    ca_bundle: Optional[str] = None
    timeout_s: float = DEADLINE.default_s  # a command's waiting on silence (see the module)
    connect_timeout_s: float = CONNECT_TIMEOUT.default_s
    read_timeout_s: float = READ_TIMEOUT.default_s

    @property
    def url(self) -> str:
        return f"{'https' if self.secure else 'http'}://{self.endpoint}"

    @classmethod
    def from_env(cls, env: Optional[dict] = None) -> "S3Settings":
        env = os.environ if env is None else env

        def first(*names: str) -> Optional[str]:
            for n in names:
                if env.get(n):
                    return env[n]
            return None

        raw = first("KUBESEG_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL",
                    "S3_ENDPOINT", "MINIO_ENDPOINT") or "https://s3.amazonaws.com"
        if "://" not in raw:
            raw = "https://" + raw
        parsed = urlparse(raw)
        if "@" in parsed.netloc:
            raise StorageError(f"the S3 endpoint (KUBESEG_S3_ENDPOINT or AWS_ENDPOINT_URL) "
                               f"{redact(raw)!r} {CREDENTIALS_IN_URL}")
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise StorageError(f"S3 endpoint {raw!r} (KUBESEG_S3_ENDPOINT) is not an http(s) URL")
        verify = (first("KUBESEG_S3_VERIFY") or "true").lower() not in ("0", "false", "no")
        timings = {t.field: _timing_value(t, first(t.variable)) for t in TIMING_SETTINGS}
        return cls(endpoint=parsed.netloc, secure=parsed.scheme == "https", **timings,
                   access_key=first("AWS_ACCESS_KEY_ID", "MINIO_ACCESS_KEY", "MINIO_ROOT_USER"),
                   secret_key=first("AWS_SECRET_ACCESS_KEY", "MINIO_SECRET_KEY",
                                    "MINIO_ROOT_PASSWORD"),
                   session_token=first("AWS_SESSION_TOKEN"),
                   region=first("AWS_REGION", "AWS_DEFAULT_REGION"),
                   verify=verify, ca_bundle=first("AWS_CA_BUNDLE"))


class OperationTimeout(TimeoutError):
    """The command's deadline passed before another request could start."""


SEND_BLOCK = 64 * 1024  # a request body goes out in blocks, each with the read timeout
_SENDING = threading.local()  # the read timeout of the request this thread sends


def _block_sending_pools():
    """urllib3 connection pools whose connections send a body in SEND_BLOCK pieces, each
    bounded by the request's read timeout.

    A socket timeout bounds one ``sendall`` as a whole, urllib3 hands an 8 MiB part to a
    single ``sendall``, and it sends with the connect timeout in force: over a slow link that
    keeps moving, the part would time out. Sent in blocks, the timeout is the longest pause,
    as it is for reading."""
    from urllib3.connection import HTTPConnection, HTTPSConnection
    from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

    class BlockSending:
        def send(self, data):
            timeout = getattr(_SENDING, "timeout", None)
            if timeout is not None and self.sock is not None:
                self.sock.settimeout(timeout)
            if isinstance(data, (bytes, bytearray, memoryview)) and len(data) > SEND_BLOCK:
                view = memoryview(data)
                for start in range(0, len(view), SEND_BLOCK):
                    super().send(view[start:start + SEND_BLOCK])
                return
            super().send(data)

    class BlockHTTPConnection(BlockSending, HTTPConnection):
        pass

    class BlockHTTPSConnection(BlockSending, HTTPSConnection):
        pass

    class BlockHTTPConnectionPool(HTTPConnectionPool):
        ConnectionCls = BlockHTTPConnection

    class BlockHTTPSConnectionPool(HTTPSConnectionPool):
        ConnectionCls = BlockHTTPSConnection

    return {"http": BlockHTTPConnectionPool, "https": BlockHTTPSConnectionPool}


def _make_pool_manager(settings: "S3Settings", **kwargs):
    import urllib3

    class DeadlinePoolManager(urllib3.PoolManager):
        """Counts every request's wait for its answer against the command's deadline
        (:mod:`kubeseg.storage_deadline`), cutting its connect and read timeouts to what is
        left of it; once the answer has come, the body streams with the full read timeout."""

        def urlopen(self, method, url, redirect=True, **kw):
            scope = storage_deadline.current()
            watch = scope.watch(settings.url)
            remaining = scope.budget(settings.timeout_s) - watch.silence()
            if remaining <= 0:
                raise OperationTimeout("no time left for another request")
            read_s = min(settings.read_timeout_s, remaining)
            kw["timeout"] = urllib3.Timeout(connect=min(settings.connect_timeout_s, remaining),
                                            read=read_s)
            _SENDING.timeout = read_s
            watch.begin()
            try:
                response = super().urlopen(method, url, redirect=redirect, **kw)
            except BaseException:
                watch.end(answered=False)
                raise
            finally:
                _SENDING.timeout = None
            watch.end(answered=True)
            if read_s < settings.read_timeout_s:
                sock = getattr(getattr(response, "connection", None), "sock", None)
                if sock is not None:  # a body still to read: the answer came, so full time
                    sock.settimeout(settings.read_timeout_s)
            return response

    manager = DeadlinePoolManager(**kwargs)
    manager.pool_classes_by_scheme = _block_sending_pools()
    return manager


@functools.lru_cache(maxsize=8)
def _client_for(settings: S3Settings, pid: int):
    import certifi
    import urllib3
    from minio import Minio

    if not settings.access_key or not settings.secret_key:
        raise StorageError(
            f"no S3 credentials for endpoint {settings.url}: set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (on a cluster, from the storage Secret)")
    http = _make_pool_manager(
        settings,
        timeout=urllib3.Timeout(connect=settings.connect_timeout_s, read=settings.read_timeout_s),
        maxsize=32,
        cert_reqs="CERT_REQUIRED" if settings.verify else "CERT_NONE",
        ca_certs=settings.ca_bundle or certifi.where(),
        # Retries are done by _retry below, where the error can be classified and named.
        retries=urllib3.Retry(total=0, connect=0, read=0, redirect=0, status=0,
                              raise_on_status=False),
    )
    return Minio(settings.endpoint, access_key=settings.access_key,
                 secret_key=settings.secret_key, session_token=settings.session_token,
                 secure=settings.secure, region=settings.region, http_client=http)


def client(settings: Optional[S3Settings] = None):
    """The minio client for ``settings`` (default: from the environment), cached per process.

    A forked process (a DataLoader worker) gets a client of its own: sharing the parent's
    pooled connections would interleave two processes' requests on one socket and hand one
    worker the body of another's object.
    """
    return _client_for(settings or S3Settings.from_env(), os.getpid())


_TRANSIENT_CODES = {"SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout",
                    "RequestTimeTooSkewed", "OperationAborted"}


def _is_timeout(exc: BaseException) -> bool:
    import socket

    import urllib3.exceptions as ue

    if isinstance(exc, ue.MaxRetryError) and exc.reason is not None:
        return _is_timeout(exc.reason)
    if isinstance(exc, ue.NewConnectionError):  # a refused connection (a subclass, for history)
        return False
    return isinstance(exc, (ue.TimeoutError, socket.timeout, TimeoutError))


def _deadline_hint(settings: S3Settings, budget_s: float) -> str:
    return (f"check KUBESEG_S3_ENDPOINT and that the server runs, or raise {TIMEOUT_VARIABLE} "
            f"({DEADLINE_OPTION}; now {budget_s:g} s)")


def _timeout_message(uri: str, settings: S3Settings, budget_s: float, waited_s: float) -> str:
    return (f"timed out talking to S3 endpoint {settings.url} while accessing {uri}: it "
            f"accepted no connection or sent no answer for {waited_s:.0f} s of waiting; "
            + _deadline_hint(settings, budget_s))


def _describe(exc: BaseException, uri: str, settings: S3Settings,
              budget_s: float, waited_s: float) -> Tuple[str, bool]:
    """A message naming endpoint, bucket and key, and whether the error is transient."""
    from minio.error import S3Error, ServerError
    import urllib3.exceptions as ue

    where = f"{uri} at endpoint {settings.url}"
    if isinstance(exc, S3Error):
        code = exc.code
        if code in ("NoSuchKey", "NoSuchObject"):
            return f"object not found: {where}", False
        if code == "NoSuchBucket":
            return (f"bucket {exc.bucket_name or split_s3(uri)[0]!r} does not exist at endpoint "
                    f"{settings.url} (while accessing {uri}); create it or fix the URI"), False
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied",
                    "InvalidToken", "ExpiredToken"):
            return (f"access refused ({code}) for {where}: check AWS_ACCESS_KEY_ID / "
                    "AWS_SECRET_ACCESS_KEY and the bucket policy"), False
        return f"S3 error {code} for {where}: {exc.message}", code in _TRANSIENT_CODES
    if isinstance(exc, ServerError):
        return f"S3 server error {exc.status_code} for {where}", exc.status_code >= 500
    if _is_timeout(exc):
        return _timeout_message(uri, settings, budget_s, waited_s), True
    if isinstance(exc, (ue.MaxRetryError, ue.NewConnectionError, ue.ProtocolError,
                        ConnectionError)):
        return (f"S3 endpoint {settings.url} unreachable while accessing {uri} "
                f"({type(exc).__name__}); check KUBESEG_S3_ENDPOINT and that the server runs"), True
    if isinstance(exc, ue.HTTPError):
        return f"HTTP error talking to {where}: {exc}", True
    return f"{type(exc).__name__} for {where}: {exc}", False


def _retry(uri: str, settings: S3Settings, call: Callable[[], T]) -> T:
    """``call()``, retrying transient errors with backoff while the command's deadline
    (:mod:`kubeseg.storage_deadline`) leaves time; the pauses count as waiting."""
    scope = storage_deadline.current()
    watch, budget = scope.watch(settings.url), scope.budget(settings.timeout_s)
    attempt = 0
    while True:
        if watch.silence() >= budget:  # earlier calls of this command used the deadline up
            raise StorageError(_timeout_message(uri, settings, budget, watch.silence()))
        try:
            return call()
        except StorageError:
            raise
        except Exception as exc:  # classified below; unknown errors are not retried
            waited = watch.silence()
            message, transient = _describe(exc, uri, settings, budget, waited)
            pause = BACKOFF_S * 2 ** attempt
            if not transient or attempt >= RETRIES or budget - waited <= pause:
                if transient and budget - waited <= pause and not _is_timeout(exc):
                    message += (f" (gave up after {waited:.0f} s without an answer; "
                                f"{TIMEOUT_VARIABLE} is {budget:g} s)")
                raise StorageError(message) from exc
            with watch.unanswered():
                time.sleep(pause)
            attempt += 1


# --------------------------------------------------------------------------------------------
# The interface
def _temp_beside(dest: Path) -> str:
    """A new empty temporary file next to ``dest`` (same filesystem, so a rename is atomic).

    It is created with the permissions a plain ``open()`` gives (0o666 less the process umask,
    applied by the kernel), so renamed results are as readable as any other output; the umask
    is never read or changed, which would race with other threads.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = dest.parent / f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return str(tmp)


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a folder's entries (names created, renamed, removed), to disk."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if Path(path).is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_local_atomically(dest: Path, fill: Callable[[str], None],
                            durable: bool = False) -> None:
    """``fill(temporary path)``, then rename onto ``dest``; on failure nothing is left behind.

    ``durable``: the temporary file and its folder are flushed to disk before the rename, and
    the folder again after it, so that after a power loss ``dest`` holds the old content or
    the new, never an empty or partial file (a rename alone only orders the two for processes
    of a running system; without the flushes the kernel may persist the rename first)."""
    tmp = _temp_beside(dest)
    try:
        fill(tmp)
        if durable:
            fsync_path(Path(tmp))
            fsync_path(dest.parent)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        fsync_path(dest.parent)


_SPECIAL_KINDS = ((stat.S_ISFIFO, "FIFO (named pipe)"), (stat.S_ISCHR, "character device"),
                  (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket"))


def special_file_kind(path: str) -> Optional[str]:
    """``"FIFO (named pipe)"``, ``"character device"``... for a local special file, else None."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    for test, kind in _SPECIAL_KINDS:
        if test(mode):
            return kind
    return None


def _check_regular_file(path: str) -> None:
    """Refuse a special file before opening it (opening a FIFO blocks until a writer comes)."""
    kind = special_file_kind(path)
    if kind is not None:
        raise StorageError(f"{path} is a {kind}, not a regular file: it was not read; remove "
                           "it from the folder")


def read_bytes(uri: str, settings: Optional[S3Settings] = None) -> bytes:
    """The whole content of an object or file."""
    if not is_s3(uri):
        _check_regular_file(uri)
        try:
            return Path(uri).read_bytes()
        except FileNotFoundError:
            raise StorageError(f"file not found: {uri}") from None
        except OSError as exc:
            raise StorageError(f"cannot read {uri}: {exc.strerror}") from None
    settings = settings or S3Settings.from_env()
    bucket, key = split_s3(uri)

    def get() -> bytes:
        response = client(settings).get_object(bucket, key)
        try:
            return response.read()
        finally:
            response.close()
            response.release_conn()

    return _retry(uri, settings, get)


def read_text(uri: str, settings: Optional[S3Settings] = None) -> str:
    return read_bytes(uri, settings).decode("utf-8")


def write_bytes(uri: str, data: bytes, settings: Optional[S3Settings] = None,
                content_type: str = "application/octet-stream", *,
                durable: bool = False) -> None:
    """Write atomically: readers see the old content or the new, never a part.

    ``durable`` (local paths): flushed to disk before this returns, the new content or the old
    surviving a power loss (see :func:`_write_local_atomically`). An S3 object is stored
    durably by the server before its PUT is answered, so there is nothing more to do there.
    """
    if not is_s3(uri):
        _write_local_atomically(Path(uri), lambda tmp: Path(tmp).write_bytes(data), durable)
        return
    settings = settings or S3Settings.from_env()
    bucket, key = split_s3(uri)
    _retry(uri, settings, lambda: client(settings).put_object(
        bucket, key, io.BytesIO(data), len(data), content_type=content_type,
        part_size=MULTIPART_PART_SIZE))


def write_text(uri: str, text: str, settings: Optional[S3Settings] = None) -> None:
    write_bytes(uri, text.encode("utf-8"), settings, content_type="text/plain; charset=utf-8")


def upload_file(local_path: str, uri: str, settings: Optional[S3Settings] = None) -> None:
    """Copy a local file to ``uri`` (multipart above MULTIPART_PART_SIZE), atomically."""
    if not is_s3(uri):
        _check_regular_file(local_path)
        _write_local_atomically(Path(uri), lambda tmp: shutil.copyfile(local_path, tmp))
        return
    _check_regular_file(local_path)
    settings = settings or S3Settings.from_env()
    bucket, key = split_s3(uri)
    _retry(uri, settings, lambda: client(settings).fput_object(
        bucket, key, str(local_path), part_size=MULTIPART_PART_SIZE))


def download_file(uri: str, local_path: str, settings: Optional[S3Settings] = None) -> None:
    """Copy ``uri`` to a local file; the file appears complete or not at all."""
    dest = Path(local_path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not is_s3(uri):
        if not Path(uri).is_file():
            raise StorageError(f"file not found: {uri}")
        upload_file(uri, str(dest))
        return
    settings = settings or S3Settings.from_env()
    bucket, key = split_s3(uri)
    _write_local_atomically(dest, lambda tmp: _retry(
        uri, settings, lambda: client(settings).fget_object(bucket, key, tmp)))


def exists(uri: str, settings: Optional[S3Settings] = None) -> bool:
    if not is_s3(uri):
        return Path(uri).exists()
    from minio.error import S3Error

    settings = settings or S3Settings.from_env()
    bucket, key = split_s3(uri)

    def stat() -> bool:
        try:
            client(settings).stat_object(bucket, key)
            return True
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject", "ResourceNotFound"):
                return False
            raise

    return _retry(uri, settings, stat)


def delete(uri: str, settings: Optional[S3Settings] = None) -> None:
    """Remove one object or file; missing is not an error."""
    if not is_s3(uri):
        Path(uri).unlink(missing_ok=True)
        return
    settings = settings or S3Settings.from_env()
    bucket, key = split_s3(uri)
    _retry(uri, settings, lambda: client(settings).remove_object(bucket, key))


def list_files(prefix: str, settings: Optional[S3Settings] = None) -> List[str]:
    """Every object/file below ``prefix`` (recursive), as names relative to it, sorted.

    S3 listings are paginated by the client, so prefixes with many thousands of keys work.
    Hidden local files (starting with '.') such as in-progress temporary files are skipped.
    """
    if not is_s3(prefix):
        root = Path(prefix)
        if not root.is_dir():
            raise StorageError(f"folder not found: {prefix}")
        out = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                if not name.startswith("."):
                    out.append(Path(dirpath, name).relative_to(root).as_posix())
        return sorted(out)
    settings = settings or S3Settings.from_env()
    bucket, key = split_s3(prefix)
    key_prefix = key.rstrip("/") + "/" if key else ""

    def listing() -> List[str]:
        objects = client(settings).list_objects(bucket, prefix=key_prefix, recursive=True)
        return sorted(o.object_name[len(key_prefix):] for o in objects if not o.is_dir)

    return _retry(prefix, settings, listing)


def list_sizes(prefix: str, settings: Optional[S3Settings] = None) -> Dict[str, int]:
    """Every object/file below ``prefix`` (as :func:`list_files` names them) with its size in
    bytes; an S3 listing has the same deadline and retries as every operation."""
    if not is_s3(prefix):
        root = Path(prefix)
        return {name: (root / name).stat().st_size for name in list_files(prefix)}
    settings = settings or S3Settings.from_env()
    bucket, key = split_s3(prefix)
    key_prefix = key.rstrip("/") + "/" if key else ""

    def listing() -> Dict[str, int]:
        objects = client(settings).list_objects(bucket, prefix=key_prefix, recursive=True)
        return {o.object_name[len(key_prefix):]: int(o.size or 0) for o in objects
                if not o.is_dir}

    return _retry(prefix, settings, listing)


def iter_parallel(fn: Callable[[str], T], items: List[str],
                  workers: int = DEFAULT_WORKERS) -> Iterator[Tuple[str, T]]:
    """Apply ``fn`` to ``items`` on a thread pool; yields (item, result) as they finish."""
    if not items:
        return
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = {pool.submit(fn, item): item for item in items}
        for fut in concurrent.futures.as_completed(futures):
            yield futures[fut], fut.result()


def download_prefix(prefix: str, local_dir: str, settings: Optional[S3Settings] = None,
                    workers: int = DEFAULT_WORKERS) -> List[str]:
    """Copy every object below ``prefix`` into ``local_dir`` concurrently; returns the names."""
    names = list_files(prefix, settings)
    for _ in iter_parallel(
            lambda n: download_file(join(prefix, n), str(Path(local_dir, n)), settings),
            names, workers):
        pass
    return names


def upload_prefix(local_dir: str, prefix: str, settings: Optional[S3Settings] = None,
                  workers: int = DEFAULT_WORKERS) -> List[str]:
    """Copy every file below ``local_dir`` to ``prefix`` concurrently; returns the names."""
    names = list_files(local_dir)
    for _ in iter_parallel(
            lambda n: upload_file(str(Path(local_dir, n)), join(prefix, n), settings),
            names, workers):
        pass
    return names


def ensure_bucket(uri: str, settings: Optional[S3Settings] = None) -> None:
    """Create the bucket of an s3:// URI if it does not exist (no-op for local paths)."""
    if not is_s3(uri):
        return
    settings = settings or S3Settings.from_env()
    bucket, _ = split_s3(uri)
    c = client(settings)
    _retry(uri, settings, lambda: c.bucket_exists(bucket) or c.make_bucket(bucket))


def arrow_filesystem(uri: str, settings: Optional[S3Settings] = None):
    """A pyarrow filesystem and path for ``uri``, for streaming Parquet without staging.

    Call its methods through :func:`arrow_call`, which counts them against the command's
    deadline and turns the SDK's errors into :class:`StorageError`.
    """
    from pyarrow import fs

    if not is_s3(uri):
        return fs.LocalFileSystem(), str(Path(uri).resolve())
    settings = settings or S3Settings.from_env()
    bucket, key = split_s3(uri)
    budget = storage_deadline.current().budget(settings.timeout_s)
    # One call's attempts and the SDK's backoff between them stay within the deadline: fewer
    # attempts for short deadlines, one share kept for the backoff. Arrow's request timeout is
    # a silence limit too (less than 1 byte/s for that long), so moving transfers go on.
    attempts = max(1, min(RETRIES + 1, int(budget // 10)))
    per_attempt = budget / (attempts + 1)
    filesystem = fs.S3FileSystem(
        access_key=settings.access_key, secret_key=settings.secret_key,
        session_token=settings.session_token, region=settings.region or "us-east-1",
        endpoint_override=settings.url, scheme="https" if settings.secure else "http",
        connect_timeout=min(settings.connect_timeout_s, per_attempt),
        request_timeout=min(settings.read_timeout_s, per_attempt),
        retry_strategy=fs.AwsStandardS3RetryStrategy(max_attempts=attempts))
    return filesystem, f"{bucket}/{key}"


# Arrow's S3 errors carry the AWS SDK's text ("AWS Error NETWORK_CONNECTION during HeadObject
# operation: curlCode: 7, ..."): (markers, message, whether the endpoint answered).
_ARROW_ERRORS = (
    (("curlCode: 28", "Timeout was reached"), None, False),
    (("NETWORK_CONNECTION", "curlCode: "), "unreachable", False),
    (("ACCESS_DENIED", "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH", "InvalidAccessKeyId",
      "SignatureDoesNotMatch", "AccessDenied"), "access refused", True),
    (("NO_SUCH_BUCKET", "NoSuchBucket"), "bucket missing", True),
)


def _describe_arrow(exc: OSError, uri: str, settings: S3Settings, budget_s: float,
                    waited_s: float) -> Tuple[str, bool]:
    """The message for an error of the Arrow S3 filesystem, and whether the endpoint answered."""
    text = str(exc)
    if isinstance(exc, FileNotFoundError):
        return f"object not found: {uri} at endpoint {settings.url}", True
    for markers, kind, answered in _ARROW_ERRORS:
        if not any(m in text for m in markers):
            continue
        if kind is None:
            return _timeout_message(uri, settings, budget_s, waited_s), answered
        if kind == "unreachable":
            return (f"S3 endpoint {settings.url} unreachable while accessing {uri}; check "
                    "KUBESEG_S3_ENDPOINT and that the server runs"), answered
        if kind == "access refused":
            return (f"access refused for {uri} at endpoint {settings.url}: check "
                    "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and the bucket policy"), answered
        return (f"bucket {split_s3(uri)[0]!r} does not exist at endpoint {settings.url} (while "
                f"accessing {uri}); create it or fix the URI"), answered
    status = re.search(r"HTTP status (\d{3})", text)
    if status:
        return (f"S3 server error {status.group(1)} for {uri} at endpoint {settings.url}: "
                "check that the server runs and its logs"), True
    return (f"S3 error while accessing {uri} at endpoint {settings.url} (run with --verbose "
            "for the storage library's own message)"), True


def arrow_call(uri: str, call: Callable[[], T], settings: Optional[S3Settings] = None) -> T:
    """``call()``: reading ``uri`` through :func:`arrow_filesystem`.

    On S3 the call counts against the command's deadline like every other request, and the
    Arrow S3 filesystem's errors become a :class:`StorageError` naming the endpoint, the object
    and what to check; the SDK's own text goes to the debug log.
    """
    if not is_s3(uri):
        try:
            return call()
        except FileNotFoundError:
            raise StorageError(f"file not found: {uri}") from None
        except OSError as exc:
            raise StorageError(f"cannot read {uri}: {exc}") from None
    settings = settings or S3Settings.from_env()
    scope = storage_deadline.current()
    watch, budget = scope.watch(settings.url), scope.budget(settings.timeout_s)
    if watch.silence() >= budget:
        raise StorageError(_timeout_message(uri, settings, budget, watch.silence()))
    answered = True  # also when the data turns out unreadable (not an OSError)
    watch.begin()
    try:
        return call()
    except OSError as exc:  # pyarrow's IO errors (ArrowIOError is an OSError)
        message, answered = _describe_arrow(exc, uri, settings, budget, watch.silence())
        logger.debug("Arrow S3 filesystem error for %s: %s", uri, exc)
        raise StorageError(message) from None  # the SDK's text stays in the debug log
    finally:
        watch.end(answered)
