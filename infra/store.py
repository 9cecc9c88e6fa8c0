"""One object-store API over `file://` and `s3://`.

Keys are '/'-separated paths relative to the store root (`raw/fashion-mnist/part-00000.parquet`).
Every write is whole-object and atomic: a reader sees the old object or the new one, never a
partial one (local: temp file + rename; S3: a single PUT). Conditional writes (`put_if`) are the
primitive behind `CURRENT` pointers: S3 If-Match / If-None-Match (SeaweedFS and AWS honour both),
and on the local store an fcntl lock + ETag compare + rename. A retried conditional PUT refused
with 412 is re-read: if the object holds exactly the bytes written, an earlier attempt landed and
only its response was lost, so the write succeeded (S3Store._landed).

Data goes through boto3 for whole objects and pyarrow's filesystem for streaming Parquet reads;
retries come from botocore's "standard" mode and pyarrow's AwsStandardS3RetryStrategy, never a
hand-rolled loop, except where botocore cannot retry: a response body cut after its retry loop
ended (S3Store._call, S3Store.read_with_etag), asked again within the same `s3_retries` budget.
Credentials come from the standard AWS chain and are never logged; a store URI carrying some is
refused (infra/redact.py). A store that stops answering trips a per-process circuit breaker
(`StoreBreaker`): after `store_breaker` consecutive operations failed past their retries, every
further operation on that store fails at once with `StoreUnavailable` (tasks do not retry it) until
a probe after `BREAKER_COOLDOWN_S` succeeds. Local objects are created with the process umask's
permissions (0644 under the usual 022), like any file the service writes.
"""
from __future__ import annotations

import collections
import dataclasses
import fcntl
import hashlib
import logging
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

from infra.redact import redact, refuse_credentials_in_uri
from infra.settings import Settings

LOG = logging.getLogger(__name__)
BREAKER_COOLDOWN_S = 30.0  # an open breaker lets one probe through after this long
# mkstemp creates 0600 files; objects get what open() would give (read once: os.umask both sets and gets)
_UMASK = os.umask(0o022)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK
MULTIPART_THRESHOLD = 512 * 2**20   # S3 objects above this go up in parts (a single PUT stops at 5 GB)
MULTIPART_PART_BYTES = 64 * 2**20   # 10,000 parts max: 640 GB objects


class StoreError(RuntimeError):
    """An object-store operation failed; the message names the key and the cause, never a secret.
    `transport`: the store gave no answer (connection, timeout, 5xx) after the retries."""

    transport: bool = False


class NotFound(StoreError):
    """The object does not exist (a definite answer from the store, not a failure to reach it)."""


class StoreUnavailable(StoreError):
    """The store failed `store_breaker` operations in a row (each past its retries): this process
    stops asking it for a while. Not retried by tasks: the run fails fast, naming the store."""


@dataclass
class StoreBreaker:
    """Consecutive-failure circuit breaker for one store in one process. `threshold` 0: never opens.
    Thread-safe; O(1) per call."""

    name: str
    threshold: int
    cooldown_s: float = BREAKER_COOLDOWN_S
    failures: int = 0
    opened_at: float | None = None
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

    def before(self) -> None:
        """Raise StoreUnavailable while open; after the cooldown, let one probe through."""
        with self._lock:
            if self.opened_at is None:
                return
            if time.monotonic() - self.opened_at < self.cooldown_s:
                raise StoreUnavailable(
                    f"store {self.name} is unavailable: {self.failures} operations in a row failed past their "
                    f"retries; failing fast (next probe in {self.cooldown_s - (time.monotonic() - self.opened_at):.0f}s). "
                    f"Check the endpoint, the network and the bucket, then rerun: committed shards are kept")
            self.opened_at = time.monotonic()  # this call is the probe; the others keep failing fast

    def failed(self) -> None:
        with self._lock:
            self.failures += 1
            if self.threshold and self.failures >= self.threshold:
                if self.opened_at is None:
                    LOG.error("store %s: %d operations in a row failed; failing fast for %.0fs",
                              self.name, self.failures, self.cooldown_s)
                self.opened_at = time.monotonic()

    def succeeded(self) -> None:
        with self._lock:
            self.failures, self.opened_at = 0, None


_BREAKERS: dict[tuple[str, str | None], StoreBreaker] = {}
_BREAKERS_LOCK = threading.Lock()


def breaker_for(uri: str, settings: Settings) -> StoreBreaker:
    """The process-wide breaker of the store at `uri` (and endpoint): every Store object on it shares it."""
    key = (uri.rstrip("/"), settings.s3_endpoint)
    with _BREAKERS_LOCK:
        if key not in _BREAKERS:
            _BREAKERS[key] = StoreBreaker(uri.rstrip("/"), settings.store_breaker)
        return _BREAKERS[key]


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
    """Base class; use `open_store(settings)`. Subclasses: LocalStore, S3Store.

    `reads` / `writes` count object reads and writes per store URI + key, shared by every Store
    of this process (tasks open their own), so tests and benchmarks can prove what was touched."""

    uri: str
    reads: collections.Counter[str] = collections.Counter()
    writes: collections.Counter[str] = collections.Counter()
    _lock = threading.Lock()

    def _count_read(self, key: str) -> None:
        with Store._lock:
            Store.reads[self.uri_of(key)] += 1

    def _count_write(self, key: str) -> None:
        with Store._lock:
            Store.writes[self.uri_of(key)] += 1

    def read_count(self, prefix: str = "") -> int:
        """Object reads so far (this process) of keys under `prefix` in this store."""
        full = self.uri_of(prefix)
        with Store._lock:
            return sum(n for k, n in Store.reads.items() if k.startswith(full))

    def write_count(self, prefix: str = "") -> int:
        """Object writes so far (this process) of keys under `prefix` in this store."""
        full = self.uri_of(prefix)
        with Store._lock:
            return sum(n for k, n in Store.writes.items() if k.startswith(full))

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
            raise StoreError(f"cannot open {self.uri_of(key)}: {_clean(e)}") from None

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
            raise StoreError(f"{step} {self.uri_of(key)} failed: {type(e).__name__}: {_clean(e)}") from None
        return f"{self.uri}: read/write ok (etag {etag[:8]}…)"


# ---------------------------------------------------------------------------------------------
class LocalStore(Store):
    """A folder on local disk. ETag = md5 of the content (cached by mtime+size)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)  # created by the first write, never by opening (a typo stays an error)
        self.uri = f"file://{self.root}"
        self._etags: dict[tuple[str, int, int], str] = {}

    def _path(self, key: str) -> Path:
        if key.startswith("/") or ".." in key.split("/"):
            raise StoreError(f"invalid key {key!r}")
        return self.root / key

    def read_bytes(self, key: str) -> bytes:
        self._count_read(key)
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"no object at {self.uri_of(key)}") from None
        except OSError as e:
            raise StoreError(f"get {self.uri_of(key)} failed: {_clean(e)}") from None

    def read_with_etag(self, key: str) -> tuple[bytes, str]:
        data = self.read_bytes(key)
        return data, hashlib.md5(data).hexdigest()

    def download_file(self, key: str, path: str) -> None:
        """A file copy (never whole in memory)."""
        import shutil

        self._count_read(key)
        try:
            shutil.copyfile(self._path(key), path)
        except FileNotFoundError:
            raise StoreError(f"no object at {self.uri_of(key)}") from None

    def write_bytes(self, key: str, data: bytes) -> str:
        """Temp file (mode FILE_MODE) + fsync + rename. OSError (disk full, read-only) -> StoreError."""
        path = self._path(key)
        self._count_write(key)
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), FILE_MODE)
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException as e:
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)
            if isinstance(e, OSError):
                raise StoreError(f"put {self.uri_of(key)} failed: {_clean(e)}") from None
            raise
        return hashlib.md5(data).hexdigest()

    def put_if(self, key: str, data: bytes, *, if_match: str | None = None,
               if_none_match: bool = False) -> str:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.parent / f".{path.name}.lock", "a+") as lockf:
            fcntl.flock(lockf, fcntl.LOCK_EX)
            try:
                current = self.head(key)
                if if_none_match and current is not None:
                    raise PreconditionFailed(f"{self.uri_of(key)} already exists")
                if if_match is not None and (current is None or current.etag != if_match):
                    raise PreconditionFailed(f"{self.uri_of(key)} changed since it was read")
                return self.write_bytes(key, data)
            finally:
                fcntl.flock(lockf, fcntl.LOCK_UN)

    def head(self, key: str) -> ObjectInfo | None:
        path = self._path(key)
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        if not path.is_file():
            return None
        return ObjectInfo(key, st.st_size, self._etag(path, st))

    def _etag(self, path: Path, st: os.stat_result) -> str:
        ck = (str(path), st.st_mtime_ns, st.st_size)
        et = self._etags.get(ck)
        if et is None:
            h = hashlib.md5()
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            et = self._etags[ck] = h.hexdigest()
        return et

    def list(self, prefix: str) -> list[ObjectInfo]:
        base = self._path(prefix.rstrip("/")) if prefix else self.root
        if base.is_file():
            info = self.head(prefix)
            return [info] if info else []
        out = []
        if not base.is_dir():
            return out
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                if name.startswith("."):
                    continue  # temp files and lock files
                p = Path(dirpath) / name
                key = p.relative_to(self.root).as_posix()
                info = self.head(key)
                if info:
                    out.append(info)
        return sorted(out, key=lambda i: i.key)

    def holds_anything(self) -> bool:
        if not self.root.is_dir():
            return False
        return any(not name.startswith(".") for _d, _s, files in os.walk(self.root) for name in files)

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink()
        except FileNotFoundError:
            pass
        except OSError as e:
            raise StoreError(f"delete {self.uri_of(key)} failed: {_clean(e)}") from None

    def arrow_fs(self) -> tuple[pafs.FileSystem, str]:
        return pafs.LocalFileSystem(), str(self.root)


# ---------------------------------------------------------------------------------------------
class S3Store(Store):
    """`s3://bucket/prefix` through boto3 (objects, conditional writes) and pyarrow (streaming)."""

    def __init__(self, uri: str, settings: Settings) -> None:
        import boto3
        from botocore.config import Config

        parsed = urlparse(uri)
        self.uri = uri.rstrip("/")
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        self.settings = settings
        self._session = boto3.session.Session(region_name=settings.s3_region)
        cfg = Config(
            retries={"max_attempts": settings.s3_retries, "mode": "standard"},
            s3={"addressing_style": "path"} if settings.s3_endpoint else {},
            connect_timeout=5,
            read_timeout=60,
        )
        self.client = self._session.client("s3", endpoint_url=settings.s3_endpoint, config=cfg)
        self._fs: pafs.S3FileSystem | None = None
        self.breaker = breaker_for(self.uri, settings)

    def _k(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _call(self, what: str, key: str, fn, **kw):
        """`fn(Bucket=…, **kw)` with errors mapped to StoreError, through the store's breaker: an
        answer from S3 (success, 4xx) closes it; a transport failure or 5xx past the retries counts."""
        self.breaker.before()
        try:
            r = self._call_once(what, key, fn, **kw)
        except StoreError as e:
            if getattr(e, "transport", False):
                self.breaker.failed()
            else:
                self.breaker.succeeded()
            raise
        self.breaker.succeeded()
        return r

    def _call_once(self, what: str, key: str, fn, **kw):
        from botocore.exceptions import BotoCoreError, ClientError
        from urllib3.exceptions import HTTPError

        try:
            attempt = 0
            for attempt in range(1, max(1, self.settings.s3_retries) + 1):
                try:
                    return fn(Bucket=self.bucket, **kw)
                except HTTPError as e:
                    # botocore reads a non-streamed body (an error document, a listing) after its
                    # retry checks (endpoint.convert_to_response_dict), so a body cut there escapes
                    # as a raw urllib3 error. Such a body is never a completed write's answer (those
                    # are empty): ask again, within the same budget.
                    if attempt >= self.settings.s3_retries:
                        raise _transport(f"{what} {self.uri_of(key)} failed: response cut after {attempt} "
                                         f"attempts: {_clean(e)}") from None
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("PreconditionFailed", "412") or status == 412:
                retried = attempt > 1 or e.response.get("ResponseMetadata", {}).get("RetryAttempts", 0) > 0
                raise PreconditionFailed(f"{self.uri_of(key)}: {what} lost (412 precondition failed)",
                                         retried=retried) from None
            if code in ("NoSuchKey", "404", "NotFound"):
                raise NotFound(f"no object at {self.uri_of(key)}") from None
            if code == "NoSuchBucket":
                raise StoreError(f"bucket {self.bucket!r} does not exist ({self.uri})") from None
            err = StoreError(f"{what} {self.uri_of(key)} failed: {code or status}: "
                             f"{redact(str(e.response.get('Error', {}).get('Message', '')))}")
            err.transport = isinstance(status, int) and status >= 500
            raise err from None
        except BotoCoreError as e:
            raise _transport(f"{what} {self.uri_of(key)} failed: {_clean(e)}") from None

    def read_bytes(self, key: str) -> bytes:
        return self.read_with_etag(key)[0]

    def read_with_etag(self, key: str) -> tuple[bytes, str]:
        """GET `key`. botocore retries the request but not the body read that follows it (the
        body streams after the call returns), so a body cut mid-transfer is fetched again here,
        within the same attempt budget (`s3_retries`), then reported as a StoreError."""
        from botocore.exceptions import BotoCoreError
        from urllib3.exceptions import HTTPError

        self._count_read(key)
        attempts = max(1, self.settings.s3_retries)
        for attempt in range(1, attempts + 1):
            r = self._call("get", key, self.client.get_object, Key=self._k(key))
            try:
                return r["Body"].read(), r["ETag"].strip('"')
            except (BotoCoreError, HTTPError, OSError) as e:
                if attempt == attempts:
                    raise StoreError(f"get {self.uri_of(key)} failed: body cut after {attempts} "
                                     f"attempts: {_clean(e)}") from None
                LOG.debug("get %s: body read failed (%s), fetching again", self.uri_of(key), type(e).__name__)
        raise AssertionError("unreachable")

    def write_bytes(self, key: str, data: bytes) -> str:
        """One PUT; above `multipart_threshold` (S3 refuses single PUTs over 5 GB) a multipart upload."""
        if len(data) > self.multipart_threshold:
            import io

            return self._upload(key, io.BytesIO(data))
        self._count_write(key)
        r = self._call("put", key, self.client.put_object, Key=self._k(key), Body=data)
        return r["ETag"].strip('"')

    # -- multipart: large objects go up in parts (boto3 transfer), streamed both ways ---------
    multipart_threshold = MULTIPART_THRESHOLD
    multipart_part_bytes = MULTIPART_PART_BYTES

    def _transfer_config(self):
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(multipart_threshold=self.multipart_threshold,
                              multipart_chunksize=self.multipart_part_bytes, max_concurrency=4, use_threads=True)

    def _upload(self, key: str, fileobj) -> str:
        """Multipart upload (boto3 transfer: parts retried one by one, the upload aborted on failure),
        then one HEAD for the ETag ('<md5 of part md5s>-<parts>')."""
        self._count_write(key)
        self._call("put", key, lambda Bucket, **kw: self.client.upload_fileobj(
            fileobj, Bucket, self._k(key), Config=self._transfer_config()))
        info = self.head(key)
        if info is None:
            raise StoreError(f"put {self.uri_of(key)}: the multipart upload completed but the object is missing")
        return info.etag

    def upload_file(self, key: str, path: str) -> str:
        if os.path.getsize(path) <= self.multipart_threshold:
            with open(path, "rb") as f:
                return self.write_bytes(key, f.read())
        with open(path, "rb") as f:
            return self._upload(key, f)

    def download_file(self, key: str, path: str) -> None:
        self._count_read(key)
        self._call("get", key, lambda Bucket, **kw: self.client.download_file(
            Bucket, self._k(key), path, Config=self._transfer_config()))

    def put_if(self, key: str, data: bytes, *, if_match: str | None = None,
               if_none_match: bool = False) -> str:
        kw: dict = {"Key": self._k(key), "Body": data}
        if if_match is not None:
            kw["IfMatch"] = f'"{if_match}"'
        if if_none_match:
            kw["IfNoneMatch"] = "*"
        self._count_write(key)
        try:
            r = self._call("conditional put", key, self.client.put_object, **kw)
        except PreconditionFailed as lost:
            etag = self._landed(key, data, lost)
            if etag is None:
                raise
            return etag
        return r["ETag"].strip('"')

    def _landed(self, key: str, data: bytes, lost: PreconditionFailed) -> str | None:
        """After a 412 on a *retried* conditional PUT: did an earlier attempt of ours land? When the
        response of a PUT that succeeded is lost, botocore retries it and the retry fails its own
        precondition (the ETag moved / the object now exists). If the object now holds exactly
        `data`, that write was ours: return its ETag (success). Callers make their payloads unique
        per writer (CURRENT and _claim.json carry a build id and a timestamp), so equal bytes cannot
        come from a rival. None: the 412 stands (not retried, other bytes, or unreadable)."""
        if not lost.retried:
            return None
        try:
            body, etag = self.read_with_etag(key)
        except StoreError:
            return None
        if body != data:
            return None
        LOG.info("conditional put %s: a retry was refused (412) but the object holds this write's bytes: "
                 "an earlier attempt landed and its response was lost; treated as success", self.uri_of(key))
        return etag

    def head(self, key: str) -> ObjectInfo | None:
        try:
            r = self._call("head", key, self.client.head_object, Key=self._k(key))
        except NotFound:
            return None
        return ObjectInfo(key, int(r["ContentLength"]), r["ETag"].strip('"'))

    def list(self, prefix: str) -> list[ObjectInfo]:
        out = []
        full = self._k(prefix)
        token = None
        while True:
            kw = {"Prefix": full}
            if token:
                kw["ContinuationToken"] = token
            r = self._call("list", prefix, self.client.list_objects_v2, **kw)
            for o in r.get("Contents", []):
                key = o["Key"][len(self.prefix) + 1:] if self.prefix else o["Key"]
                if key.endswith("/") or key.rsplit("/", 1)[-1].startswith("."):
                    continue  # directory markers, temp objects
                out.append(ObjectInfo(key, int(o["Size"]), o["ETag"].strip('"')))
            if not r.get("IsTruncated"):
                break
            token = r["NextContinuationToken"]
        return sorted(out, key=lambda i: i.key)

    def holds_anything(self) -> bool:
        """A missing bucket raises StoreError (say so, rather than 'empty')."""
        kw = {"Prefix": self._k("")} if self.prefix else {}
        r = self._call("list", "", self.client.list_objects_v2, MaxKeys=1, **kw)
        return bool(r.get("Contents"))

    def delete(self, key: str) -> None:
        self._call("delete", key, self.client.delete_object, Key=self._k(key))

    def arrow_fs(self) -> tuple[pafs.FileSystem, str]:
        if self._fs is None:
            creds = self._session.get_credentials()
            kw = {}
            if creds is not None:
                fc = creds.get_frozen_credentials()
                kw = {"access_key": fc.access_key, "secret_key": fc.secret_key}
                if fc.token:
                    kw["session_token"] = fc.token
            if self.settings.s3_endpoint:
                ep = urlparse(self.settings.s3_endpoint)
                kw["endpoint_override"] = ep.netloc
                kw["scheme"] = ep.scheme or "http"
            self._fs = pafs.S3FileSystem(
                region=self.settings.s3_region,
                retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=self.settings.s3_retries),
                connect_timeout=5, request_timeout=60, **kw)
        return self._fs, f"{self.bucket}/{self.prefix}" if self.prefix else self.bucket

    def ensure_bucket(self) -> None:
        """Create the bucket if missing (dev servers only; production buckets are provisioned)."""
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError:
            self.client.create_bucket(Bucket=self.bucket)


def open_store(settings: Settings | None = None, uri: str | None = None) -> Store:
    """The store named by `uri` (default: settings.store). Cheap: no network call is made. A URI
    carrying credentials is refused (ValueError, secret masked)."""
    settings = settings or Settings.load()
    uri = uri or settings.store
    refuse_credentials_in_uri(uri, "store URI")
    if uri.startswith("file://"):
        return LocalStore(uri[len("file://"):])
    if uri.startswith("s3://"):
        return S3Store(uri, settings)
    raise StoreError(f"unsupported store URI {uri!r}: use file:///path or s3://bucket/prefix")


def _transport(msg: str) -> StoreError:
    """A StoreError for a request that got no answer from the store (counts toward its breaker)."""
    err = StoreError(msg)
    err.transport = True
    return err


def _clean(e: BaseException) -> str:
    """An exception's message with credentials masked: URI userinfo and the AWS chain's secrets."""
    return redact(str(e))
