"""Object storage: one interface over ``s3://bucket/key`` URIs and local paths.

S3-compatible servers (MinIO on a cluster) are reached through the ``minio`` client. Settings
come from the environment:

=========================  ================================================================
``KUBESEG_S3_ENDPOINT``    endpoint URL, e.g. ``http://minio.kubeflow:9000`` (the scheme picks
                           TLS). Also read: ``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL``,
                           ``S3_ENDPOINT``, ``MINIO_ENDPOINT``. Default: ``https://s3.amazonaws.com``.
``AWS_ACCESS_KEY_ID``      access key (or ``MINIO_ACCESS_KEY``, ``MINIO_ROOT_USER``)
``AWS_SECRET_ACCESS_KEY``  secret key (or ``MINIO_SECRET_KEY``, ``MINIO_ROOT_PASSWORD``)
``AWS_SESSION_TOKEN``      optional session token
``AWS_REGION``             optional region (or ``AWS_DEFAULT_REGION``)
``KUBESEG_S3_VERIFY``      ``false`` skips TLS certificate checks; ``AWS_CA_BUNDLE`` names a CA
``KUBESEG_S3_TIMEOUT``     seconds one storage operation may take, retries included (default
                           120); each request also has a connect timeout of 5 s and a read
                           timeout of 60 s, both cut to what is left of that deadline
=========================  ================================================================

Credentials never travel in URLs: an endpoint or URI with ``user:password@`` is refused (the
message does not repeat it); give them through the environment (on a cluster, the storage Secret).

Writes are atomic: local files are written to a temporary name in the same folder and renamed;
S3 objects only become visible when the upload (single or multipart) completes. Transient
errors are retried with exponential backoff within the operation's deadline; an endpoint that
accepts connections but never answers fails with "timed out", naming the endpoint. Local special
files (FIFOs, devices, sockets) are refused, never opened: reading a FIFO would block forever.
"""
from __future__ import annotations

import concurrent.futures
import functools
import io
import os
import shutil
import stat
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, TypeVar
from urllib.parse import urlparse

from kubeseg.errors import StorageError

MULTIPART_PART_SIZE = 8 * 1024 * 1024  # objects above this are uploaded in parts
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 60.0
DEFAULT_OPERATION_TIMEOUT_S = 120.0
TIMEOUT_VARIABLE = "KUBESEG_S3_TIMEOUT"
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
    import re

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
class S3Settings:
    endpoint: str  # host[:port]
    secure: bool
    access_key: Optional[str]
    secret_key: Optional[str]
    session_token: Optional[str] = None
    region: Optional[str] = None
    verify: bool = True
    ca_bundle: Optional[str] = None
    timeout_s: float = DEFAULT_OPERATION_TIMEOUT_S  # one operation, retries included

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
        timeout = first(TIMEOUT_VARIABLE) or str(DEFAULT_OPERATION_TIMEOUT_S)
        try:
            timeout_s = float(timeout)
        except ValueError:
            timeout_s = -1.0
        if not 0 < timeout_s <= 86400:
            raise StorageError(f"{TIMEOUT_VARIABLE}={timeout!r}: must be a number of seconds in "
                               "(0, 86400]")
        return cls(endpoint=parsed.netloc, secure=parsed.scheme == "https", timeout_s=timeout_s,
                   access_key=first("AWS_ACCESS_KEY_ID", "MINIO_ACCESS_KEY", "MINIO_ROOT_USER"),
                   secret_key=first("AWS_SECRET_ACCESS_KEY", "MINIO_SECRET_KEY",
                                    "MINIO_ROOT_PASSWORD"),
                   session_token=first("AWS_SESSION_TOKEN"),
                   region=first("AWS_REGION", "AWS_DEFAULT_REGION"),
                   verify=verify, ca_bundle=first("AWS_CA_BUNDLE"))


_DEADLINE = threading.local()  # the deadline of the storage operation running on this thread


class OperationTimeout(TimeoutError):
    """The deadline of a storage operation passed before its next request could start."""


def _make_pool_manager(**kwargs):
    import urllib3

    class DeadlinePoolManager(urllib3.PoolManager):
        """Each request's connect and read timeouts are cut to what is left of the deadline of
        the operation it belongs to (set by ``_retry`` on this thread)."""

        def urlopen(self, method, url, redirect=True, **kw):
            deadline = getattr(_DEADLINE, "at", None)
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise OperationTimeout("no time left for another request")
                kw["timeout"] = urllib3.Timeout(connect=min(CONNECT_TIMEOUT_S, remaining),
                                                read=min(READ_TIMEOUT_S, remaining))
            return super().urlopen(method, url, redirect=redirect, **kw)

    return DeadlinePoolManager(**kwargs)


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
        timeout=urllib3.Timeout(connect=CONNECT_TIMEOUT_S, read=READ_TIMEOUT_S),
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


def _describe(exc: BaseException, uri: str, settings: S3Settings) -> Tuple[str, bool]:
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
        return (f"timed out talking to S3 endpoint {settings.url} while accessing {uri}: it "
                f"accepted no connection or sent no answer in time; check KUBESEG_S3_ENDPOINT "
                f"and the server, or raise {TIMEOUT_VARIABLE} (now {settings.timeout_s:g} s)"), True
    if isinstance(exc, (ue.MaxRetryError, ue.NewConnectionError, ue.ProtocolError,
                        ConnectionError)):
        return (f"S3 endpoint {settings.url} unreachable while accessing {uri} "
                f"({type(exc).__name__}); check KUBESEG_S3_ENDPOINT and that the server runs"), True
    if isinstance(exc, ue.HTTPError):
        return f"HTTP error talking to {where}: {exc}", True
    return f"{type(exc).__name__} for {where}: {exc}", False


def _retry(uri: str, settings: S3Settings, call: Callable[[], T]) -> T:
    """``call()``, retrying transient errors with backoff until the operation's deadline
    (``settings.timeout_s``), which also bounds every request's timeouts."""
    outer = getattr(_DEADLINE, "at", None)
    deadline = time.monotonic() + settings.timeout_s
    if outer is not None:
        deadline = min(deadline, outer)
    _DEADLINE.at = deadline
    try:
        attempt = 0
        while True:
            try:
                return call()
            except StorageError:
                raise
            except Exception as exc:  # classified below; unknown errors are not retried
                message, transient = _describe(exc, uri, settings)
                remaining = deadline - time.monotonic()
                pause = BACKOFF_S * 2 ** attempt
                if not transient or attempt >= RETRIES or remaining <= pause:
                    if transient and remaining <= pause and not _is_timeout(exc):
                        message += (f" (gave up: the operation's deadline of "
                                    f"{settings.timeout_s:g} s, {TIMEOUT_VARIABLE}, passed)")
                    raise StorageError(message) from exc
                time.sleep(pause)
                attempt += 1
    finally:
        _DEADLINE.at = outer


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


def _write_local_atomically(dest: Path, fill: Callable[[str], None]) -> None:
    """``fill(temporary path)``, then rename onto ``dest``; on failure nothing is left behind."""
    tmp = _temp_beside(dest)
    try:
        fill(tmp)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
                content_type: str = "application/octet-stream") -> None:
    """Write atomically: readers see the old content or the new, never a part."""
    if not is_s3(uri):
        _write_local_atomically(Path(uri), lambda tmp: Path(tmp).write_bytes(data))
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
    """A pyarrow filesystem and path for ``uri``, for streaming Parquet without staging."""
    from pyarrow import fs

    if not is_s3(uri):
        return fs.LocalFileSystem(), str(Path(uri).resolve())
    settings = settings or S3Settings.from_env()
    bucket, key = split_s3(uri)
    # every attempt's timeouts and the SDK's backoff between them stay within the deadline:
    # fewer attempts for short deadlines, one share of the deadline kept for the backoff
    attempts = max(1, min(RETRIES + 1, int(settings.timeout_s // 10)))
    per_attempt = settings.timeout_s / (attempts + 1)
    filesystem = fs.S3FileSystem(
        access_key=settings.access_key, secret_key=settings.secret_key,
        session_token=settings.session_token, region=settings.region or "us-east-1",
        endpoint_override=settings.url, scheme="https" if settings.secure else "http",
        connect_timeout=min(CONNECT_TIMEOUT_S, per_attempt),
        request_timeout=min(READ_TIMEOUT_S, per_attempt),
        retry_strategy=fs.AwsStandardS3RetryStrategy(max_attempts=attempts))
    return filesystem, f"{bucket}/{key}"
