"""Which raw shards of a dataset are new or changed since features were extracted for them.

Pure planning over one LIST and small manifest reads: a raw shard is pending when no extract
manifest records its current checksum, no quarantine record names that checksum, and it was not
announced already within `resend_after_s` (a stage that failed is announced again the next time).
`flows/deployed.py:discover_shards` emits the pending set as one event that starts the chain."""
from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

from infra import layout
from infra.manifests import quarantine_reason, read_manifest
from infra.planner import ShardRef, select_shards
from infra.store import Store, StoreError


def read_announced(store: Store, dataset: str, model_id: str) -> dict[str, list]:
    try:
        return json.loads(store.read_bytes(layout.announced_key(dataset, model_id)))
    except (StoreError, ValueError):
        return {}  # none yet (or unreadable): announce again, stages skip done shards anyway


def pending_shards(store: Store, dataset: str, model_id: str, resend_after_s: float,
                   now: float | None = None) -> list[ShardRef]:
    """Raw shards of `dataset` whose features for `model_id` are missing or stale and that are not
    quarantined for this checksum nor announced in the last `resend_after_s` seconds.
    Cost: one LIST of raw/, one small GET per raw shard (manifest; 16 in flight)."""
    now = time.time() if now is None else now
    refs = select_shards(store.list(layout.raw_prefix(dataset)))
    announced = read_announced(store, dataset, model_id)

    def pending(ref: ShardRef) -> bool:
        m = read_manifest(store, layout.manifest_key("extract", dataset, model_id, ref.part))
        if m is not None and m.input_checksum == ref.checksum:
            return False
        if quarantine_reason(store, "extract", ref.key, ref.checksum) is not None:
            return False
        seen = announced.get(ref.key)
        return not (seen and seen[0] == ref.checksum and now - seen[1] < resend_after_s)

    with ThreadPoolExecutor(16) as pool:
        flags = list(pool.map(pending, refs))
    return [r for r, f in zip(refs, flags) if f]


def record_announced(store: Store, dataset: str, model_id: str, refs: list[ShardRef],
                     now: float | None = None) -> None:
    """Add `refs` (with their checksums) to the announced record."""
    now = time.time() if now is None else now
    announced = read_announced(store, dataset, model_id)
    announced.update({r.key: [r.checksum, now] for r in refs})
    store.write_bytes(layout.announced_key(dataset, model_id), json.dumps(announced, sort_keys=True).encode())
