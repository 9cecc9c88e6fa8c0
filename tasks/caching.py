"""Prefect caching for per-shard tasks, keyed on what makes a shard done; results kept in the store.

Why: manifests (tasks/stage.py) decide whether a shard is done, but a task has to start to read one,
and `extract_shard` loads its backbone first. With `ShardCache` a rerun of a done shard replays the
recorded outcome without starting the task body at all (task state "Cached").

The key is sha256 over (stage, dataset, output id, part, input ETag, manifest ETag, output ETag,
code version). There is no key (no lookup, nothing recorded) with `force`, or when the manifest or
the output is missing, so a hit can only replay an outcome recorded for this very manifest object,
output object, input object and code version: a deleted or rewritten manifest, a changed input,
a deleted output or a new model/coder checksum is a miss and the task runs (and its manifest check
stays authoritative). When a task commits a shard it records the "skipped" outcome under the key
the next run computes, so the first rerun already hits.

Cost per cached shard task, before it starts (in the worker): one small GET (the model or coder card,
for the code version) and three HEADs (input, manifest, output). One ~1 KB PUT per committed shard.
Records live in the object store under `_prefect_results/` (`StoreResults`), so every worker of a
multi-machine Dask cluster sees the same cache; the block document holds the store URI, endpoint
and region only, never a credential (S3 access uses the AWS chain of the process that reads).

Records are untrusted input (RELIABILITY.md, threat model): Prefect would deserialise a record with
the serializer the record names (pickle included) and import the JSON decoder it names. So
`StoreResults.read_path` never hands Prefect a stored record: it parses the record as plain JSON,
checks its outcome against the manifest whose ETag is in the cache key (read again, one GET), and
returns a record it builds itself with a fixed, hook-free JSON serializer. Anything else (another
serializer, a shape or value that disagrees with the manifest, a key this process did not compute)
is a cache miss with a warning; the task then runs and its manifest check decides.
"""
from __future__ import annotations

import collections
import hashlib
import json
import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable

import anyio.to_thread
from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext
from prefect.filesystems import WritableFileSystem
from prefect.logging import get_run_logger
from prefect.results import ResultRecord, ResultRecordMetadata
from prefect.serializers import JSONSerializer

from infra import layout
from infra.manifests import Manifest
from infra.settings import Settings
from infra.store import Store, StoreError, shared_store

LOG = logging.getLogger(__name__)
# the only serializer a replayed record is read with: stdlib json, no object hook (no import, no call)
DATA_ONLY_JSON = JSONSerializer(object_decoder=None, object_encoder=None)


@dataclass(frozen=True)
class ShardTarget:
    """What a shard task reads and writes, as its cache key needs it (built from its inputs)."""

    store: Store
    input_store: Store
    stage: str
    dataset: str
    output_id: str
    part: int
    input_key: str
    output_key: str
    code_version: str


def shard_key(stage: str, dataset: str, output_id: str, part: int, input_etag: str, manifest_etag: str,
              output_etag: str, code_version: str) -> str:
    """The cache key of one committed shard (pure)."""
    parts = [stage, dataset, output_id, part, input_etag, manifest_etag, output_etag, code_version]
    return "shard-" + hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:40]


@dataclass
class ShardCache(CachePolicy):
    """Cache policy for a shard task; `describe(inputs)` maps the task's parameters to its target.
    Returns no key (so the task runs) on force, a missing manifest or output, or a store error."""

    describe: Callable[[dict[str, Any]], ShardTarget] | None = None

    def compute_key(self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: dict[str, Any],
                    **kwargs: Any) -> str | None:
        if inputs.get("force") or self.describe is None:
            return None
        try:
            t = self.describe(inputs)
            heads = (t.input_store.head(t.input_key),
                     t.store.head(layout.manifest_key(t.stage, t.dataset, t.output_id, t.part)),
                     t.store.head(t.output_key))
        except (StoreError, LookupError) as e:  # LookupError: no card registered (the task says so)
            get_run_logger().warning("cache key of %s part %s not computed (the task runs): %s",
                             inputs.get("dataset"), getattr(inputs.get("ref"), "part", "?"), e)
            return None
        if any(h is None for h in heads):
            return None
        key = shard_key(t.stage, t.dataset, t.output_id, t.part, *(h.etag for h in heads), t.code_version)
        _expect(key, ExpectedRecord(t.store, layout.manifest_key(t.stage, t.dataset, t.output_id, t.part),
                                    heads[1].etag))
        return key


@dataclass(frozen=True)
class ExpectedRecord:
    """What a cache key computed in this process vouches for: the manifest (key and ETag) that a
    replayed outcome must agree with."""

    store: Store
    manifest_key: str
    manifest_etag: str


_EXPECTED: collections.OrderedDict[str, ExpectedRecord] = collections.OrderedDict()
_EXPECTED_LOCK = threading.Lock()
_EXPECTED_MAX = 4096  # keys computed recently in this process; a key is read right after it is computed


def _expect(key: str, expected: ExpectedRecord) -> None:
    with _EXPECTED_LOCK:
        _EXPECTED[key] = expected
        _EXPECTED.move_to_end(key)
        while len(_EXPECTED) > _EXPECTED_MAX:
            _EXPECTED.popitem(last=False)


class UntrustedRecord(ValueError):
    """A stored result record that is not replayed (Prefect reads the error as "no record")."""


def trusted_record(key: str, data: bytes) -> bytes:
    """The bytes Prefect may deserialise for the stored record `data` under cache key `key`: a record
    rebuilt here, with DATA_ONLY_JSON, holding an outcome equal to the one the manifest vouched for
    by `key` implies. Raises UntrustedRecord otherwise. Cost: one manifest GET; O(record size)."""
    with _EXPECTED_LOCK:
        expected = _EXPECTED.get(key)
    if expected is None:
        raise UntrustedRecord(f"{key}: not a cache key computed by this process")
    try:
        record = json.loads(data)
        serializer = record["metadata"]["serializer"]
        outcome = json.loads(record["result"])
    except (ValueError, TypeError, KeyError) as e:
        raise UntrustedRecord(f"{key}: not a JSON result record ({type(e).__name__})") from None
    named = serializer.get("type") if isinstance(serializer, dict) else serializer
    if named != "json":
        raise UntrustedRecord(f"{key}: names serializer {str(named)[:40]!r}, not json")
    body, etag = expected.store.read_with_etag(expected.manifest_key)
    if etag != expected.manifest_etag:
        raise UntrustedRecord(f"{key}: manifest {expected.manifest_key} changed since the key was computed")
    from tasks.stage import skipped_outcome  # stage imports this module: the outcome's one definition

    vouched = json.loads(json.dumps(skipped_outcome(expected.store, Manifest.from_json(body)).as_dict()))
    if outcome != vouched:
        raise UntrustedRecord(f"{key}: outcome disagrees with manifest {expected.manifest_key}")
    meta = ResultRecordMetadata(storage_key=key, serializer=DATA_ONLY_JSON)
    return ResultRecord(metadata=meta, result=vouched).serialize()


def record_committed(*, stage: str, dataset: str, output_id: str, part: int, input_etag: str,
                     manifest_etag: str, output_etag: str, code_version: str, outcome: dict[str, Any]) -> None:
    """Called right after a shard's manifest is written: record `outcome` (the "skipped" form) under
    the key the next run will compute. A no-op unless the running task uses ShardCache; a failed
    write is logged and costs only that hit (the shard is committed). Cost: one PUT."""
    ctx = TaskRunContext.get()
    if ctx is None or not isinstance(ctx.task.cache_policy, ShardCache) or not ctx.persist_result:
        return
    key = shard_key(stage, dataset, output_id, part, input_etag, manifest_etag, output_etag, code_version)
    try:
        ctx.result_store.write(obj=outcome, key=key)
    except Exception as e:  # noqa: BLE001 - the cache is an optimisation, never a reason to fail a shard
        get_run_logger().warning("%s %s part %d: cache record not written (the next run checks the manifest): %s",
                         stage, dataset, part, e)


class StoreResults(WritableFileSystem):
    """Prefect result storage in our object store (`<store>/_prefect_results/<key>`), through
    infra/store.py: the same credentials chain, retries and atomic writes as the data, on
    `file://` and `s3://` alike. Holds no credential."""

    _block_type_name = "codeshard store results"

    store: str
    s3_endpoint: str | None = None
    s3_region: str = "us-east-1"

    def _store(self) -> Store:
        return shared_store(Settings.load(store=self.store, s3_endpoint=self.s3_endpoint, s3_region=self.s3_region))

    def read_path(self, path: str, _sync: bool = True) -> bytes:
        """One GET (+ one manifest GET for a shard record: `trusted_record`); raises StoreError when
        absent and UntrustedRecord when not replayable (Prefect reads either as "no record")."""
        data = self._store().read_bytes(layout.result_key(path))
        try:
            return trusted_record(path, data)
        except UntrustedRecord as e:
            LOG.warning("cache record %s not replayed (the task runs and checks its manifest): %s",
                        self._store().uri_of(layout.result_key(path)), e)
            raise

    def write_path(self, path: str, content: bytes, _sync: bool = True) -> str:
        """One atomic PUT."""
        self._store().write_bytes(layout.result_key(path), content)
        return path

    async def aread_path(self, path: str) -> bytes:
        return await anyio.to_thread.run_sync(self.read_path, path)

    async def awrite_path(self, path: str, content: bytes) -> str:
        return await anyio.to_thread.run_sync(self.write_path, path, content)


def result_storage(settings: Settings) -> StoreResults:
    """The store's result-storage block, saved server-side (Prefect requires a saved block for task
    result storage). Named after the store location; saving again is idempotent. Cost: a few
    Prefect API calls, once per flow run."""
    block = StoreResults(store=settings.store, s3_endpoint=settings.s3_endpoint, s3_region=settings.s3_region)
    loc = json.dumps([settings.store, settings.s3_endpoint, settings.s3_region])
    block.save(f"codeshard-results-{hashlib.sha256(loc.encode()).hexdigest()[:12]}", overwrite=True)
    return block
