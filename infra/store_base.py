"""The Store interface (whole objects, conditional writes, local files, streaming) and its errors;
backends: `infra/store_local.py`, `infra/store_s3.py`; get one with `infra.store.shared_store`."""
from __future__ import annotations

from dataclasses import dataclass

import pyarrow.fs as pafs

from infra.redact import redact
from infra.store_counts import ACCESS


class StoreError(RuntimeError):
    """An object-store operation failed; the message names the key and the cause, never a secret.
    `transport`: the store gave no answer (connection, timeout, 5xx) after the retries."""

    transport: bool = False


class NotFound(StoreError):
    """The object does not exist (a definite answer from the store, not a failure to reach it)."""


class StoreUnavailable(StoreError):
    """The store failed `store_breaker` operations in a row (each past its retries): this process
    stops asking it for a while. Not retried by tasks: the run fails fast, naming the store."""


class PreconditionFailed(StoreError):
    """A conditional write lost: the object changed (or exists) since the caller read it.
    `retried`: the 412 answered a retry of the request (an earlier attempt may have landed)."""

    def __init__(self, msg: str, retried: bool = False) -> None:
        super().__init__(msg)
        self.retried = retried


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str

class Store:
    """Base class; use `shared_store(settings)`. Subclasses: LocalStore, S3Store.

    Every read and write is counted in `infra.store_counts.ACCESS` (per process)."""

    uri: str

    def _count_read(self, key: str) -> None:
        ACCESS.read(self.uri_of(key))

    def _count_write(self, key: str) -> None:
        ACCESS.wrote(self.uri_of(key))

    def read_count(self, prefix: str = "") -> int:
        """Object reads so far (this process) of keys under `prefix` in this store."""
        return ACCESS.reads_under(self.uri_of(prefix))

    def write_count(self, prefix: str = "") -> int:
        """Object writes so far (this process) of keys under `prefix` in this store."""
        return ACCESS.writes_under(self.uri_of(prefix))

    # -- whole objects ---------------------------------------------------------------------
    def read_bytes(self, key: str) -> bytes:
        raise NotImplementedError

    def read_with_etag(self, key: str) -> tuple[bytes, str]:
        raise NotImplementedError

    def write_bytes(self, key: str, data: bytes) -> str:
        """Atomically replace `key` with `data`; returns the new ETag."""
        raise NotImplementedError

    def put_if(self, key: str, data: bytes, *, if_match: str | None = None,
               if_none_match: bool = False) -> str:
        """Write only if the current ETag is `if_match` (or, with `if_none_match`, if absent).
        Raises PreconditionFailed otherwise. Returns the new ETag. A write whose response was lost
        and whose retry was refused (412) because that write had landed counts as a success when
        the object holds exactly `data` (S3Store._landed): give every writer unique bytes."""
        raise NotImplementedError

    def head(self, key: str) -> ObjectInfo | None:
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        return self.head(key) is not None

    def list(self, prefix: str) -> list[ObjectInfo]:
        """Objects under `prefix` (recursive), sorted by key. Temp files are never listed."""
        raise NotImplementedError

    def delete(self, key: str) -> None:
        raise NotImplementedError

    def delete_prefix(self, prefix: str) -> int:
        n = 0
        for info in self.list(prefix):
            self.delete(info.key)
            n += 1
        return n

    def copy(self, src: str, dst: str) -> None:
        self.write_bytes(dst, self.read_bytes(src))

    # -- local files (large objects: index files) ------------------------------------------
    def upload_file(self, key: str, path: str) -> str:
        """Write `key` from a local file; returns the new ETag. S3 streams it (multipart above
        `multipart_threshold`); this default reads the file into memory."""
        with open(path, "rb") as f:
            return self.write_bytes(key, f.read())

    def download_file(self, key: str, path: str) -> None:
        """Copy `key` into the local file `path` (S3: streamed in parts, never whole in memory)."""
        data = self.read_bytes(key)
        with open(path, "wb") as f:
            f.write(data)

    # -- streaming (pyarrow) ---------------------------------------------------------------
    def arrow_fs(self) -> tuple[pafs.FileSystem, str]:
        """(pyarrow filesystem, base path) for streaming reads of large objects."""
        raise NotImplementedError

    def open_input(self, key: str) -> pafs.NativeFile:
        fs, base = self.arrow_fs()
        self._count_read(key)
        try:
            return fs.open_input_file(f"{base}/{key}")
        except (FileNotFoundError, OSError) as e:
            raise StoreError(f"cannot open {self.uri_of(key)}: {clean_error(e)}") from None

    def uri_of(self, key: str) -> str:
        return f"{self.uri.rstrip('/')}/{key}"

    def holds_anything(self) -> bool:
        """Whether the store exists and holds at least one object (a LIST of one key)."""
        raise NotImplementedError

    def require_existing(self) -> "Store":
        """This store, or ValueError when it does not exist or is empty: for commands that only
        read, so a mistyped --store is an error instead of an empty store. One LIST."""
        if not self.holds_anything():
            raise ValueError(f"no store at {self.uri} (nothing there): check --store / CODESHARD_STORE, or "
                             f"create it by ingesting a dataset (`codeshard ingest …`)")
        return self

    def check(self) -> str:
        """Cheap reachability + write check (list, put, get, delete of `_health/probe`); returns a
        one-line status, or raises StoreError naming the step that failed, whatever the cause
        (a read-only folder's PermissionError included), with secrets masked."""
        key = "_health/probe"
        step = "list"
        try:
            self.list("_health/")  # a missing bucket fails here, before any write could create it
            step = "write"
            etag = self.write_bytes(key, b"ok")
            step = "read back"
            if self.read_bytes(key) != b"ok":
                raise StoreError(f"{self.uri}: read-after-write returned other bytes")
            step = "delete"
            self.delete(key)
        except StoreError:
            raise
        except Exception as e:  # noqa: BLE001 - a health check reports every cause as one line
            raise StoreError(f"{step} {self.uri_of(key)} failed: {type(e).__name__}: {clean_error(e)}") from None
        return f"{self.uri}: read/write ok (etag {etag[:8]}…)"


def transport_error(msg: str) -> StoreError:
    """A StoreError for a request that got no answer from the store (counts toward its breaker)."""
    err = StoreError(msg)
    err.transport = True
    return err


def clean_error(e: BaseException) -> str:
    """An exception's message with credentials masked: URI userinfo and the AWS chain's secrets."""
    return redact(str(e))
