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

Modules: `infra/store_base.py` (the Store interface, errors), `infra/store_local.py` and
`infra/store_s3.py` (backends), `infra/store_breaker.py` (circuit breaker), `infra/store_counts.py`
(read/write counts); this module opens a store and re-exports the names callers use.
"""
from __future__ import annotations

import threading

from infra.redact import refuse_credentials_in_uri
from infra.settings import Settings
from infra.store_base import (NotFound, ObjectInfo, PreconditionFailed, Store, StoreError, StoreUnavailable,
                              clean_error)
from infra.store_local import LocalStore
from infra.store_s3 import S3Store

__all__ = ["NotFound", "ObjectInfo", "PreconditionFailed", "Store", "StoreError", "StoreUnavailable",
           "clean_error", "LocalStore", "S3Store", "open_store", "shared_store"]


def open_store(settings: Settings | None = None, uri: str | None = None) -> Store:
    """A new Store object for `uri` (default: settings.store); flows and tasks use `shared_store`.
    No network call is made. A URI carrying credentials is refused (ValueError, secret masked)."""
    settings = settings or Settings.load()
    uri = uri or settings.store
    refuse_credentials_in_uri(uri, "store URI")
    if uri.startswith("file://"):
        return LocalStore(uri[len("file://"):])
    if uri.startswith("s3://"):
        return S3Store(uri, settings)
    raise StoreError(f"unsupported store URI {uri!r}: use file:///path or s3://bucket/prefix")


_SHARED: dict[tuple, Store] = {}
_SHARED_LOCK = threading.Lock()


def shared_store(settings: Settings, uri: str | None = None) -> Store:
    """The store named by `uri` (default: settings.store), one object per process and location: flows
    and tasks get their store here. Creating an S3 client costs a fraction of a second and clients
    are thread-safe, so the tasks of a run (and of later runs in a worker) share it. A URI carrying
    credentials is refused on every call (ValueError, secret masked)."""
    uri = uri or settings.store
    refuse_credentials_in_uri(uri, "store URI")
    key = (uri, settings.s3_endpoint, settings.s3_region, settings.s3_retries, settings.store_breaker)
    with _SHARED_LOCK:
        if key not in _SHARED:
            _SHARED[key] = open_store(settings, uri=uri)
        return _SHARED[key]
