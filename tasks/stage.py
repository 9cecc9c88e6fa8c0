"""The per-shard skeleton every shard task shares: skip-if-done, validate-or-quarantine, write the
output atomically, then the manifest (the commit point). Tasks supply only the work function.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import pyarrow as pa
from prefect import get_run_logger
from prefect.exceptions import MissingContextError

from infra import layout
from infra.manifests import Manifest, done_manifest, quarantine_reason, quarantine_shard, write_manifest
from infra.planner import ShardRef
from infra.shards import ShardInvalid, write_table
from infra.store import Store, StoreError


@dataclass(frozen=True)
class ShardOutcome:
    """What a shard task returns through Prefect: a URI and small stats, never arrays."""

    stage: str
    part: int
    status: str  # done | skipped | quarantined
    rows: int = 0
    output: str = ""
    seconds: float = 0.0
    reason: str = ""
    stats: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def logger():
    try:
        return get_run_logger()
    except MissingContextError:
        import logging

        return logging.getLogger("codeshard")


def run_shard_stage(store: Store, *, stage: str, dataset: str, output_id: str, ref: ShardRef,
                    output_key: str, code_version: str, force: bool,
                    work: Callable[[], tuple[pa.Table, dict[str, Any]]],
                    input_store: Store | None = None) -> ShardOutcome:
    """Run `work()` for one shard unless a manifest proves it done; quarantine on ShardInvalid.

    `ref.checksum` is re-read from the store (head) so a shard replaced since planning is redone.
    Store errors propagate (the task's retries handle them); nothing partial becomes visible.
    `input_store` holds the input shard when it is not `store` (imports from another location).
    """
    log = logger()
    input_store = input_store or store
    head = input_store.head(ref.key)
    if head is None:
        raise StoreError(f"input shard {input_store.uri_of(ref.key)} disappeared since planning")
    checksum = head.etag
    mkey = layout.manifest_key(stage, dataset, output_id, ref.part)
    if not force:
        m = done_manifest(store, mkey, checksum, code_version)
        if m is not None:
            log.info("%s %s part %d: skipped (done, %d rows)", stage, dataset, ref.part, m.rows)
            return ShardOutcome(stage, ref.part, "skipped", m.rows, store.uri_of(m.output_key))
        reason = quarantine_reason(store, stage, ref.key, checksum)
        if reason is not None:
            log.warning("%s %s: still quarantined: %s", stage, ref.key, reason)
            return ShardOutcome(stage, ref.part, "quarantined", reason=reason)
    t0 = time.perf_counter()
    try:
        table, stats = work()
    except ShardInvalid as e:
        qkey = quarantine_shard(store, stage, ref.key, e.reason, checksum, source=input_store)
        log.error("%s %s: QUARANTINED (%s) -> %s", stage, ref.key, e.reason, store.uri_of(qkey))
        return ShardOutcome(stage, ref.part, "quarantined", reason=e.reason)
    out_checksum = write_table(store, output_key, table)
    seconds = time.perf_counter() - t0
    write_manifest(store, mkey, Manifest(
        stage=stage, dataset=dataset, part=ref.part, input_key=ref.key, input_checksum=checksum,
        rows=table.num_rows, output_key=output_key, output_checksum=out_checksum,
        code_version=code_version, seconds=seconds, stats=stats))
    log.info("%s %s part %d: done, %d rows in %.1fs", stage, dataset, ref.part, table.num_rows, seconds)
    return ShardOutcome(stage, ref.part, "done", table.num_rows, store.uri_of(output_key), seconds,
                        stats=stats)


def is_store_error(task, task_run, state) -> bool:
    """Prefect retry_condition_fn: retry transient store failures, never bad input."""
    try:
        state.result()
    except ShardInvalid:
        return False
    except Exception:
        return True
    return False
