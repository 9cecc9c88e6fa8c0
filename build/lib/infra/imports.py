"""Where imported shards land: each dataset's import sources, and a stable raw part per source shard.

An import appends: a source shard is mapped once to a raw part number (its record under
`layout.import_shard_key`) and keeps it, so re-importing an unchanged shard is skipped by its
manifest, a changed one is redone into the same part, and a new one gets a part after every part
the dataset has. Part numbers are claimed with a create-if-absent write (`Store.put_if`,
`if_none_match`), so two imports running at once never write the same part.
"""
from __future__ import annotations

import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

from infra import layout
from infra.store import PreconditionFailed, Store

LOG = logging.getLogger(__name__)


def record_source(store: Store, dataset: str, uri: str) -> None:
    """Remember `uri` as an import source of `dataset` (idempotent: the same bytes every time)."""
    store.write_bytes(layout.import_source_key(dataset, uri), json.dumps({"uri": uri}).encode())


def recorded_sources(store: Store, dataset: str) -> list[str]:
    """Every import source URI recorded for `dataset`, sorted. Cost: one LIST, one GET per source."""
    infos = store.list(layout.import_sources_prefix(dataset))
    return sorted(json.loads(store.read_bytes(i.key))["uri"] for i in infos if i.key.endswith(".json"))


def assign_parts(store: Store, dataset: str, uri: str, keys: Sequence[str]) -> dict[str, int]:
    """{source key: raw part number} for the shards `keys` of source `uri`. Keys mapped before keep
    their part; new keys (in sorted order) each claim the next free part above every raw shard and
    claim of the dataset. A rival import that mapped the same key first wins (its part is used and
    ours released). Cost: two LISTs, one GET per mapped key (16 in flight), two conditional PUTs per
    new key (more only when rivals claim parts at the same time)."""
    prefix = layout.import_shards_prefix(dataset, uri)
    listed = {i.key[len(prefix):-len(".json")] for i in store.list(prefix) if i.key.endswith(".json")}
    known = [k for k in keys if k in listed]
    with ThreadPoolExecutor(16) as pool:
        parts = dict(zip(known, pool.map(lambda k: _mapped_part(store, dataset, uri, k), known)))
    new = sorted(k for k in keys if k not in parts)
    if not new:
        return parts
    taken = [layout.import_claim_part(i.key) for i in store.list(layout.import_claims_prefix(dataset))]
    taken += [_part_or_none(i.key) for i in store.list(layout.raw_prefix(dataset))]
    nxt = max((p for p in taken if p is not None), default=-1) + 1
    for key in new:
        part, nxt = _claim_next(store, dataset, uri, key, nxt)
        record = json.dumps({"part": part, "uri": uri, "key": key}).encode()
        try:
            store.put_if(layout.import_shard_key(dataset, uri, key), record, if_none_match=True)
        except PreconditionFailed:  # a concurrent import of this source mapped the key first
            store.delete(layout.import_claim_key(dataset, part))
            part = _mapped_part(store, dataset, uri, key)
        parts[key] = part
    return parts


def _claim_next(store: Store, dataset: str, uri: str, key: str, start: int) -> tuple[int, int]:
    """Claim the first free part >= `start` for (uri, key): (part claimed, next part to try)."""
    part = start
    while True:
        claim = json.dumps({"uri": uri, "key": key, "claimed_at": time.time(), "claim": uuid.uuid4().hex}).encode()
        try:
            store.put_if(layout.import_claim_key(dataset, part), claim, if_none_match=True)
            return part, part + 1
        except PreconditionFailed:
            LOG.debug("import %s: part %d already claimed, trying %d", dataset, part, part + 1)
            part += 1


def _mapped_part(store: Store, dataset: str, uri: str, key: str) -> int:
    return int(json.loads(store.read_bytes(layout.import_shard_key(dataset, uri, key)))["part"])


def _part_or_none(key: str) -> int | None:
    try:
        return layout.part_of(key)
    except ValueError:
        return None
