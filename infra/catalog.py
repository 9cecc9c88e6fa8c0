"""What a store holds, for `codeshard ls` and `doctor`: datasets, models, coders, indexes (with
their CURRENT versions) and quarantined shards, each with its size in the store.

Reads only: one LIST per top-level prefix, plus one small GET per index (CURRENT) and per
quarantine record. Never writes, so listing a mistyped store creates nothing.
"""
from __future__ import annotations

import collections
import json
from dataclasses import dataclass

from infra import layout
from infra.manifests import list_quarantine
from infra.store import Store, StoreError

KINDS = ("datasets", "models", "coders", "indexes", "quarantine")


@dataclass(frozen=True)
class Entry:
    """One line of a listing: what it is, its name, a short description, bytes in the store."""

    kind: str
    name: str
    detail: str
    size_bytes: int


def list_kind(store: Store, kind: str) -> list[Entry]:
    """Entries of one kind (KINDS), sorted by name."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose from {', '.join(KINDS)}")
    return {"datasets": _datasets, "models": _models, "coders": _coders, "indexes": _indexes,
            "quarantine": _quarantine}[kind](store)


def _grouped(store: Store, prefix: str, depth: int) -> dict[tuple[str, ...], list]:
    """Objects under `prefix` grouped by the first `depth` path segments after it."""
    groups: dict[tuple[str, ...], list] = collections.defaultdict(list)
    for info in store.list(prefix):
        parts = layout.segments_under(prefix, info.key)
        if len(parts) > depth:
            groups[tuple(parts[:depth])].append(info)
    return groups


def _datasets(store: Store) -> list[Entry]:
    raw = _grouped(store, layout.RAW_ROOT, 1)
    feats = _grouped(store, layout.FEATURES_ROOT, 2)
    codes = _grouped(store, layout.CODES_ROOT, 2)
    names = sorted({k[0] for k in raw} | {k[0] for k in feats} | {k[0] for k in codes})
    out = []
    for ds in names:
        models = sorted(k[1] for k in feats if k[0] == ds)
        coders = sorted(k[1] for k in codes if k[0] == ds)
        size = sum(i.size for i in raw.get((ds,), []))
        size += sum(i.size for g in (feats, codes) for k, infos in g.items() if k[0] == ds for i in infos)
        detail = (f"{len(raw.get((ds,), []))} raw shards; features: {', '.join(models) or '-'}; "
                  f"codes: {', '.join(coders) or '-'}")
        out.append(Entry("dataset", ds, detail, size))
    return out


def _cards(store: Store, prefix: str, kind: str) -> list[Entry]:
    out = []
    for (name,), infos in sorted(_grouped(store, prefix, 1).items()):
        files = ", ".join(sorted(layout.segments_under(prefix, i.key)[-1] for i in infos))
        out.append(Entry(kind, name, files, sum(i.size for i in infos)))
    return out


def _models(store: Store) -> list[Entry]:
    return _cards(store, layout.MODELS_ROOT, "model")


def _coders(store: Store) -> list[Entry]:
    return _cards(store, layout.CODERS_ROOT, "coder")


def _indexes(store: Store) -> list[Entry]:
    out = []
    for (name,), infos in sorted(_grouped(store, layout.INDEXES_ROOT, 1).items()):
        dirs = {layout.segments_under(layout.INDEXES_ROOT, i.key)[1] for i in infos}
        versions = sorted(d for d in dirs if d.startswith("v"))
        try:
            pointer = json.loads(store.read_bytes(layout.index_current_key(name)))
            current = f"CURRENT v{int(pointer['version'])}"
        except (StoreError, ValueError, KeyError):
            current = "no CURRENT (never published)"
        out.append(Entry("index", name, f"{current}; {len(versions)} versions stored",
                         sum(i.size for i in infos)))
    return out


def _quarantine(store: Store) -> list[Entry]:
    out = []
    for record in list_quarantine(store):
        copy = store.head(layout.quarantine_key(record["stage"], record["key"]))
        out.append(Entry("quarantined", f"{record['stage']}/{record['key']}", record.get("reason", ""),
                         copy.size if copy else 0))
    return out
