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
from infra.manifests import (Manifest, done_manifest, quarantine_reason, quarantine_shard, read_manifest,
                             write_manifest)
from infra.planner import ShardRef
from infra.shards import (ShardInvalid, cross_shard_duplicates, overlapping_id_ranges, read_table,
                          write_table)
from infra.store import ObjectInfo, Store, StoreError, StoreUnavailable
from tasks.caching import record_committed


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
                    input_store: Store | None = None, quarantine_name: str | None = None) -> ShardOutcome:
    """Run `work()` for one shard unless a manifest proves it done; quarantine on ShardInvalid.

    `ref.checksum` is re-read from the store (head) so a shard replaced since planning is redone.
    Store errors propagate (the task's retries handle them); nothing partial becomes visible.
    `input_store` holds the input shard when it is not `store` (imports from another location);
    `quarantine_name` (default `ref.key`) names its quarantine record.
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
            return skipped_outcome(store, m)
        reason = quarantine_reason(store, stage, quarantine_name or ref.key, checksum, code_version)
        if reason is not None:
            log.warning("%s %s: still quarantined: %s", stage, ref.key, reason)
            return ShardOutcome(stage, ref.part, "quarantined", reason=reason)
    t0 = time.perf_counter()
    try:
        table, stats = work()
    except ShardInvalid as e:
        qkey = quarantine_shard(store, stage, ref.key, e.reason, checksum, source=input_store,
                                code_version=code_version, name=quarantine_name)
        log.error("%s %s: QUARANTINED (%s) -> %s", stage, ref.key, e.reason, store.uri_of(qkey))
        return ShardOutcome(stage, ref.part, "quarantined", reason=e.reason)
    prior = committed_before(store, mkey) if force else None
    try:
        out_checksum = write_table(store, output_key, table)
        seconds = time.perf_counter() - t0
        manifest = Manifest(
            stage=stage, dataset=dataset, part=ref.part, input_key=ref.key, input_checksum=checksum,
            rows=table.num_rows, output_key=output_key, output_checksum=out_checksum,
            code_version=code_version, seconds=seconds, stats=stats)
        manifest_etag = write_manifest(store, mkey, manifest)
    except Exception as e:
        undo_failed_write(store, mkey, output_key, prior, f"{stage} {ref.key}", e)
        raise
    log.info("%s %s part %d: done, %d rows in %.1fs", stage, dataset, ref.part, table.num_rows, seconds)
    # what a rerun would find: recorded now, so the first rerun is already a cache hit
    record_committed(stage=stage, dataset=dataset, output_id=output_id, part=ref.part, input_etag=checksum,
                     manifest_etag=manifest_etag, output_etag=out_checksum, code_version=code_version,
                     outcome=skipped_outcome(store, manifest).as_dict())
    # the run summary names who did the work by the manifest's writer (host:pid), not a copy in stats
    return ShardOutcome(stage, ref.part, "done", table.num_rows, store.uri_of(output_key), seconds,
                        stats={**stats, "writer": manifest.writer})


@dataclass(frozen=True)
class CommittedShard:
    """A shard's committed state before a forced rewrite: its manifest and output, bytes and ETags."""

    manifest: bytes
    manifest_etag: str
    output_key: str
    output: bytes
    output_etag: str


def committed_before(store: Store, mkey: str) -> CommittedShard | None:
    """The committed state at `mkey` (a readable manifest whose output still has its checksum), or
    None. Cost: the manifest and the output are read into memory (one shard), under --force only."""
    try:
        mbytes, metag = store.read_with_etag(mkey)
        m = Manifest.from_json(mbytes)
        out, oetag = store.read_with_etag(m.output_key)
    except (StoreError, ValueError, TypeError):
        return None  # nothing committed (or unreadable): there is nothing to keep
    return CommittedShard(mbytes, metag, m.output_key, out, oetag) if oetag == m.output_checksum else None


def undo_failed_write(store: Store, mkey: str, output_key: str, prior: CommittedShard | None, what: str,
                      cause: BaseException) -> None:
    """After a failed output or manifest write, put the shard back as it was: the previous committed
    output and manifest when there was one (`prior`, rewritten only where this attempt changed
    them), else nothing visible (this attempt's manifest and output removed: a PUT the client saw
    fail may have landed). Best effort: a failure here is logged next to `cause`, which the caller
    re-raises. Cost: two HEADs, and at most two PUTs or DELETEs."""
    log = logger()
    if prior is None:
        steps = [(mkey, None), (output_key, None)]  # manifest first: it is the commit point
    else:
        steps = [(prior.output_key, (prior.output, prior.output_etag)), (mkey, (prior.manifest, prior.manifest_etag))]
    for key, keep in steps:
        try:
            if keep is None:
                store.delete(key)
            elif (store.head(key) or ObjectInfo(key, -1, "")).etag != keep[1]:
                store.write_bytes(key, keep[0])
                log.warning("%s: restored the committed %s after a failed rewrite", what, store.uri_of(key))
        except Exception as e:  # noqa: BLE001 - never hide the write error the caller re-raises
            log.error("%s: could not %s %s after a failed write (%s: %s); the write failed with %s: %s",
                      what, "remove" if keep is None else "restore", store.uri_of(key), type(e).__name__,
                      e, type(cause).__name__, cause)


def skipped_outcome(store: Store, m: Manifest) -> ShardOutcome:
    """The outcome of a shard that `m` proves done; its recorded stats (id range, dim) still describe
    the output, except 'pid', which older manifests recorded for the run that wrote it."""
    carried = {k: v for k, v in m.stats.items() if k != "pid"}
    return ShardOutcome(m.stage, m.part, "skipped", m.rows, store.uri_of(m.output_key), stats=carried)


def run_shard_batch(shard_fn: Callable[..., dict[str, Any]], stage: str, refs: list[ShardRef],
                    *args: Any, force: bool) -> list[dict[str, Any]]:
    """Run a shard task's function over a batch of shards inside one task run: `shard_fn(*args, ref,
    force)` per shard. Each shard commits through its own manifest, so a rerun redoes only
    unfinished shards; a shard that raises is reported as 'failed' with its reason and the batch
    goes on (the store already retried it)."""
    log = logger()
    out = []
    for ref in refs:
        try:
            out.append(shard_fn(*args, ref, force))
        except Exception as e:  # noqa: BLE001 - one failed shard must not take the batch down
            log.error("%s %s: failed: %s: %s", stage, ref.key, type(e).__name__, e)
            out.append({"stage": stage, "part": ref.part, "status": "failed", "reason": f"{type(e).__name__}: {e}"})
    return out


def quarantine_duplicate_ids(store: Store, *, stage: str, dataset: str, output_id: str,
                             outcomes: list[dict[str, Any]], output_key: Callable[[int], str]) -> list[dict[str, Any]]:
    """Ids are unique across a dataset's shards: a finished shard holding an id that an earlier
    (lower) part holds is quarantined, its output and manifest removed; `outcomes` come back with
    it marked 'quarantined' and a one-line reason naming both shards.

    Cost: nothing is read unless two shards' id ranges (`stats` id_min/id_max, recorded by the
    stage) overlap; then the `id` column of those outputs only (8 B per row). Outputs finished
    before ranges were recorded have their `id` column read once per run. Covers the shards of
    this run: a full run covers the dataset, a `--shards` range only that range."""
    log = logger()
    finished = [o for o in outcomes if o["status"] in ("done", "skipped")]
    ranges: dict[int, tuple[int, int]] = {}
    ids_cache: dict[int, Any] = {}
    for o in finished:
        st = o.get("stats") or {}
        if "id_min" in st and "id_max" in st:
            ranges[o["part"]] = (int(st["id_min"]), int(st["id_max"]))
        else:
            ids = ids_cache[o["part"]] = _output_ids(store, output_key(o["part"]))
            ranges[o["part"]] = (int(ids.min()), int(ids.max())) if len(ids) else (0, -1)
    suspects = overlapping_id_ranges(ranges)
    if not suspects:
        return outcomes
    dups = cross_shard_duplicates({p: ids_cache[p] if p in ids_cache else _output_ids(store, output_key(p))
                                   for p in suspects})
    changed: dict[int, dict[str, Any]] = {}
    for part, (earlier, n, first) in sorted(dups.items()):
        mkey = layout.manifest_key(stage, dataset, output_id, part)
        m = read_manifest(store, mkey)
        em = read_manifest(store, layout.manifest_key(stage, dataset, output_id, earlier))
        earlier_key = em.input_key if em else f"part {earlier}"
        more = f" and {n - 1} more" if n > 1 else ""
        reason = (f"id {first}{more} also in part {earlier} ({earlier_key}): ids must be unique across "
                  f"a dataset's shards, the later part is set aside")
        if m is not None:  # record first, then unpublish: manifest (the commit point), then output
            qkey = quarantine_shard(store, stage, m.input_key, reason, m.input_checksum,
                                    code_version=m.code_version)
            log.error("%s %s: QUARANTINED (%s) -> %s", stage, m.input_key, reason, store.uri_of(qkey))
        store.delete(mkey)
        store.delete(output_key(part))
        changed[part] = {"status": "quarantined", "rows": 0, "output": "", "reason": reason}
    return [{**o, **changed[o["part"]]} if o["status"] in ("done", "skipped") and o["part"] in changed else o
            for o in outcomes]


def _output_ids(store: Store, key: str):
    return read_table(store, key, columns=["id"]).column("id").to_numpy()


def is_store_error(task, task_run, state) -> bool:
    """Prefect retry_condition_fn: retry transport failures only (StoreError, OSError: connection,
    timeout), never bad input (ShardInvalid), a store whose breaker is open (StoreUnavailable: the
    run fails fast instead of retrying every shard), or a bad value (ArrowInvalid, ValueError,
    OverflowError …), which would fail the same way on every try."""
    try:
        state.result()
    except (ShardInvalid, StoreUnavailable):
        return False
    except (StoreError, OSError):
        return True
    except Exception:
        return False
    return False
