"""Parquet shards: writing them, reading the index, and streaming row groups.

A shard set is a prefix holding ``<split>-NNNNN.parquet`` files and ``index.json`` (written
last). Each shard has the columns ``key`` (string), ``image`` (the encoded image bytes as
ingested: JPEG or PNG), ``mask`` (single-channel PNG of class ids), ``height`` and ``width``,
in row groups of a fixed number of rows, uncompressed (the payloads are compressed already).

``index.json``::

    {"format": "kubeseg-shards", "format_version": 1,
     "class_names": ["sky", ...] or null, "num_classes": 11 or null,
     "splits": {"train": {"num_samples": 367, "source": "s3://.../train.manifest",
                          "shards": [{"path": "train-00000.parquet", "num_samples": 123,
                                      "row_groups": [32, 32, 32, 27], "bytes": 67108864,
                                      "sha256": "...", "first_key": "...", "last_key": "..."}]}}}

Shard paths are relative to the prefix. Reading streams row groups through pyarrow's
filesystem (S3 range reads), so nothing is staged on local disk.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
from typing import Dict, Optional, Sequence

from kubeseg import storage
from kubeseg.errors import DataError

INDEX_NAME = "index.json"
FORMAT = "kubeseg-shards"
FORMAT_VERSION = 1
DEFAULT_ROW_GROUP_ROWS = 32
COLUMNS = ("key", "image", "mask", "height", "width")
FINGERPRINT_KEY = b"kubeseg.fingerprint"
NOTES_KEY = b"kubeseg.notes"  # JSON list: what ingestion reported about the shard's samples


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.parquet"


def shard_pattern(split: str) -> "re.Pattern":
    return re.compile(rf"^{re.escape(split)}-(\d{{5}})\.parquet$")


def schema(fingerprint: str = "", notes: Sequence[dict] = ()):
    import pyarrow as pa

    metadata = {FINGERPRINT_KEY: fingerprint.encode()}
    if notes:
        metadata[NOTES_KEY] = json.dumps(list(notes), sort_keys=True).encode()
    return pa.schema([("key", pa.string()), ("image", pa.binary()), ("mask", pa.binary()),
                      ("height", pa.int32()), ("width", pa.int32())], metadata=metadata)


def encode_shard(rows: Sequence[dict], *, fingerprint: str = "",
                 row_group_rows: int = DEFAULT_ROW_GROUP_ROWS,
                 notes: Sequence[dict] = ()) -> bytes:
    """Rows (dicts with the five columns) -> Parquet file bytes. Same rows, same bytes.

    ``notes``: what ingestion reported about these samples (kept with the shard, so a resumed
    ingestion reports it again)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pydict({c: [r[c] for r in rows] for c in COLUMNS},
                                 schema=schema(fingerprint, notes))
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=max(1, int(row_group_rows)), compression="none",
                   write_statistics=["key", "height", "width"], use_dictionary=["key"])
    return sink.getvalue().to_pybytes()


def describe_shard(path: str, data: bytes) -> dict:
    """The index entry of a shard from its bytes."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(io.BytesIO(data))
    keys = pf.read(columns=["key"]).column("key").to_pylist()
    meta = pf.metadata
    return {"path": path, "num_samples": meta.num_rows,
            "row_groups": [meta.row_group(i).num_rows for i in range(meta.num_row_groups)],
            "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
            "first_key": keys[0] if keys else None, "last_key": keys[-1] if keys else None,
            "_keys": keys,
            "_fingerprint": (pf.schema_arrow.metadata or {}).get(FINGERPRINT_KEY, b"").decode(),
            "_notes": json.loads((pf.schema_arrow.metadata or {}).get(NOTES_KEY, b"[]"))}


def public_entry(entry: dict) -> dict:
    return {k: v for k, v in entry.items() if not k.startswith("_")}


# --------------------------------------------------------------------------------------------
# index
def index_uri(shards_uri: str) -> str:
    return storage.join(shards_uri, INDEX_NAME)


def read_index(shards_uri: str, *, missing_ok: bool = False) -> Optional[dict]:
    """The parsed ``index.json`` of a shard set (DataError when absent or malformed)."""
    uri = index_uri(shards_uri)
    if not storage.exists(uri):
        if missing_ok:
            return None
        raise DataError(f"no {INDEX_NAME} at {shards_uri}: not a shard set, or its ingestion did "
                        "not finish (rerun 'kubeseg ingest' to complete it)")
    try:
        index = json.loads(storage.read_text(uri))
    except json.JSONDecodeError as exc:
        raise DataError(f"{uri}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT \
            or not isinstance(index.get("splits"), dict):
        raise DataError(f"{uri}: not a kubeseg shard index (format {FORMAT!r} expected)")
    if int(index.get("format_version", 0)) > FORMAT_VERSION:
        raise DataError(f"{uri}: format_version {index['format_version']} is newer than this "
                        f"kubeseg reads ({FORMAT_VERSION}); upgrade kubeseg")
    return index


def empty_index() -> dict:
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "class_names": None,
            "num_classes": None, "splits": {}}


def write_index(shards_uri: str, index: dict) -> None:
    storage.write_text(index_uri(shards_uri), json.dumps(index, indent=1, sort_keys=True) + "\n")


def split_entry(index: dict, split: str, shards_uri: str) -> dict:
    entry = index["splits"].get(split)
    if entry is None:
        raise DataError(f"the shard set {shards_uri} has no {split!r} split (it has "
                        f"{', '.join(sorted(index['splits'])) or 'none'}); ingest it with "
                        f"'kubeseg ingest --split {split}'")
    return entry


# --------------------------------------------------------------------------------------------
# reading
class ShardReader:
    """Opens shards of one shard set on demand (one open file at a time) and reads row groups.

    Create it where it is used (in a DataLoader worker), not before a fork.
    """

    def __init__(self, shards_uri: str, columns: Sequence[str] = ("key", "image", "mask")):
        self.shards_uri = shards_uri
        self.columns = list(columns)
        self._fs = None
        self._base = None
        self._open_path: Optional[str] = None
        self._file = None
        self._parquet = None

    def _filesystem(self):
        if self._fs is None:
            self._fs, self._base = storage.arrow_filesystem(self.shards_uri)
        return self._fs

    def read_row_group(self, path: str, row_group: int) -> Dict[str, list]:
        """The columns of one row group. Storage failures (on S3: counted against the
        command's deadline) raise StorageError naming the endpoint and the shard."""
        import pyarrow.parquet as pq

        uri = storage.join(self.shards_uri, path)
        if path != self._open_path:
            self.close()
            fs = self._filesystem()
            full = f"{self._base.rstrip('/')}/{path}"
            self._file = storage.arrow_call(uri, lambda: fs.open_input_file(full))
            self._parquet = storage.arrow_call(uri, lambda: pq.ParquetFile(self._file))
            self._open_path = path
        table = storage.arrow_call(
            uri, lambda: self._parquet.read_row_group(row_group, columns=self.columns))
        return {c: table.column(c).to_pylist() for c in self.columns}

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file = self._parquet = self._open_path = None
