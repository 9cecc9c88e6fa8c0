"""Per-shard manifests (written last, so a manifest means the output is complete) and quarantine.

A stage skips a shard when its manifest names the same input checksum and code version and the
output object still has the recorded checksum. A shard that fails validation is copied to
`_quarantine/<stage>/<key>` with `<key>.reason.json` beside it; the original is left in place.
Ingest and import manifests also carry the raw shard's partition date (stats 'date'), which date
backfills select on.
"""
from __future__ import annotations

import dataclasses
import json
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Sequence

from infra import layout
from infra.store import NotFound, Store, StoreError


def writer() -> str:
    """'<host>:<pid>' of this process: the manifest of a shard names who wrote it."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class Manifest:
    stage: str
    dataset: str
    part: int
    input_key: str
    input_checksum: str
    rows: int
    output_key: str
    output_checksum: str
    code_version: str
    seconds: float = 0.0
    created_at: float = field(default_factory=time.time)
    stats: dict[str, Any] = field(default_factory=dict)
    writer: str = field(default_factory=writer)  # host:pid of the process that wrote the shard

    def to_json(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "Manifest":
        fields = json.loads(data)
        fields.setdefault("writer", "")  # written before manifests named their writer
        return cls(**fields)


def read_manifest(store: Store, key: str) -> Manifest | None:
    try:
        return Manifest.from_json(store.read_bytes(key))
    except NotFound:
        return None
    except (ValueError, TypeError):
        return None  # an unreadable manifest means "not done": the shard is redone


def write_manifest(store: Store, key: str, manifest: Manifest) -> str:
    """Write (replace) a manifest; returns its ETag."""
    return store.write_bytes(key, manifest.to_json())


def done_manifest(store: Store, key: str, input_checksum: str, code_version: str) -> Manifest | None:
    """The manifest at `key` if it proves the shard is done for this input and code version."""
    m = read_manifest(store, key)
    if m is None or m.input_checksum != input_checksum or m.code_version != code_version:
        return None
    out = store.head(m.output_key)
    if out is None or out.etag != m.output_checksum:
        return None
    return m


def partition_dates(store: Store, dataset: str, refs: Sequence[Any]) -> dict[int, str | None]:
    """Partition date ('YYYY-MM-DD') of each raw shard in `refs` (ShardRefs), as recorded by the
    ingest or import that wrote it (manifest stats 'date'); None when there is no such manifest or
    date, or when the shard was replaced since (the manifest's output checksum is not its ETag).
    Cost: two LISTs, then one small GET per shard that has a manifest (16 in flight)."""
    listed = {i.key for stage in ("ingest", "import")
              for i in store.list(layout.manifests_prefix(stage, dataset, "-"))}
    wanted = [(ref, key) for ref in refs for stage in ("ingest", "import")
              if (key := layout.manifest_key(stage, dataset, "-", ref.part)) in listed]
    with ThreadPoolExecutor(16) as pool:
        manifests = list(pool.map(lambda rk: read_manifest(store, rk[1]), wanted))
    out: dict[int, str | None] = {ref.part: None for ref in refs}
    for (ref, _), m in zip(wanted, manifests):
        if m is not None and m.output_checksum == ref.checksum and m.stats.get("date"):
            out[ref.part] = m.stats["date"]
    return out


def quarantine_shard(store: Store, stage: str, key: str, reason: str, input_checksum: str,
                     source: Store | None = None, code_version: str | None = None,
                     name: str | None = None) -> str:
    """Copy a bad shard to `_quarantine/<stage>/<name>` (`name` defaults to `key`) with its reason;
    returns the quarantine key. The reason file is written last and names the input checksum (and
    the code version that refused it), so a rerun can skip it. `source` is the store holding `key`
    when it is not `store`; imports pass a `name` holding dataset and source, so two imports'
    shards of the same relative key never share a record."""
    qkey = layout.quarantine_key(stage, name or key)
    src = source or store
    try:
        store.write_bytes(qkey, src.read_bytes(key))
    except StoreError:
        pass  # unreadable source: the reason file still records it
    record = {"stage": stage, "key": name or key, "input": src.uri_of(key), "reason": reason,
              "input_checksum": input_checksum, "code_version": code_version, "quarantined_at": time.time()}
    store.write_bytes(layout.quarantine_reason_key(stage, name or key), json.dumps(record, sort_keys=True).encode())
    return qkey


def quarantine_reason(store: Store, stage: str, key: str, input_checksum: str,
                      code_version: str | None = None) -> str | None:
    """The recorded reason if this exact input was quarantined before by this code version (a
    reason can lie in the model or coder: NaN weights, another dimension), else None."""
    try:
        record = json.loads(store.read_bytes(layout.quarantine_reason_key(stage, key)))
    except NotFound:
        return None  # any other StoreError propagates: a failed store is no reason to redo (or skip)
    except ValueError:
        return None
    if record.get("input_checksum") != input_checksum:
        return None
    recorded = record.get("code_version")
    if code_version is not None and recorded is not None and recorded != code_version:
        return None
    return record["reason"]


def list_quarantine(store: Store, stage: str | None = None) -> list[dict[str, Any]]:
    """Every quarantine record (optionally for one stage), oldest first."""
    out = []
    for info in store.list(layout.quarantine_prefix(stage)):
        if info.key.endswith(".reason.json"):
            out.append(json.loads(store.read_bytes(info.key)))
    return sorted(out, key=lambda r: r["quarantined_at"])
