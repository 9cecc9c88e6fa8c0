"""The `file://` store backend: a folder on local disk, atomic writes by temp file + rename,
conditional writes by an fcntl lock + ETag compare + rename."""
from __future__ import annotations

import fcntl
import hashlib
import os
import tempfile
from pathlib import Path

import pyarrow.fs as pafs

from infra.store_base import NotFound, ObjectInfo, PreconditionFailed, Store, StoreError, clean_error

_UMASK = os.umask(0o022)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK


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
            raise StoreError(f"get {self.uri_of(key)} failed: {clean_error(e)}") from None

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
                raise StoreError(f"put {self.uri_of(key)} failed: {clean_error(e)}") from None
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
            raise StoreError(f"delete {self.uri_of(key)} failed: {clean_error(e)}") from None

    def arrow_fs(self) -> tuple[pafs.FileSystem, str]:
        return pafs.LocalFileSystem(), str(self.root)
