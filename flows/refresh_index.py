"""Incremental index refresh: add the code shards that appeared since CURRENT's version, publish v+1.

Reads CURRENT's build.json (its input shards with checksums), lists the codes prefix and reads only
shards that are new or changed; unchanged shards are never opened. New rows are appended to a copy of
the current index; rows of changed or deleted shards are removed first (faiss remove_ids on flat
code indexes). IVF and HNSW indexes cannot drop rows here: a change or deletion there triggers a
documented full rebuild (`build_index`, force=True); so does any change to an IVF index merged on disk
(its published lists are read-only: new rows would need a second on-disk merge).

Concurrency: CURRENT moves only by a conditional write on the ETag read at the start. A refresh that
loses the race re-reads CURRENT and plans again on top of it: usually the winner already added the
same shards and this run exits with status 'up-to-date'; otherwise it retries (at most
`max_attempts` times) and then stops with a clear error, publishing nothing.
"""
from __future__ import annotations

import time
from typing import Any

from prefect import flow, get_run_logger

from flows.build_index import build_index
from flows.index_publish import publish_version, summary
from flows.limits import ensure_heavy_limit
from infra import indexes as ix
from infra import layout
from infra.planner import select_shards
from infra.registry import load_coder
from infra.runners import SettingsTaskRunner
from infra.settings import Settings
from infra.store import shared_store


@flow(name="refresh-index", flow_run_name="refresh {name}", log_prints=True, task_runner=SettingsTaskRunner())
def refresh_index(name: str, settings: dict[str, Any] | None = None, max_attempts: int = 3,
                  shards_per_task: int | None = None, allow_removal: str | None = None) -> dict[str, Any]:
    """Publish a new version of index `name` with the shards added (or changed/removed) since its
    CURRENT version. Returns a summary with status 'published', 'up-to-date' or (full rebuild path)
    what `build_index` returned; 'attempts' counts lost races + 1. Code shards that disappeared
    since CURRENT stop the refresh (nothing published) unless `allow_removal` states why; the
    reason goes into build.json ('removal_reason')."""
    layout.check_name("index", name)
    cfg = Settings.load(**(settings or {}))
    ensure_heavy_limit(cfg.heavy_limit)
    store = shared_store(cfg)
    log = get_run_logger()
    staged: list[str] = []
    for attempt in range(1, max_attempts + 1):
        t0 = time.perf_counter()
        current = ix.read_current(store, name)
        if current is None:
            raise ValueError(f"no index named {name!r} in {store.uri}: build it first with "
                             f"`codeshard index build --name {name} --dataset … --coder …`")
        prev = ix.read_build(store, name, current.version)
        coder, card = load_coder(store, prev.coder_id)
        if card["checksum"] != prev.coder_checksum:
            raise ValueError(f"coder {prev.coder_id} changed since v{current.version} (checksum "
                             f"{prev.coder_checksum} -> {card['checksum']}): its codes are not comparable; "
                             f"rebuild with `codeshard index build --force`")
        refs = select_shards(store.list(layout.codes_prefix(prev.dataset, prev.coder_id)))
        delta = ix.plan_refresh(prev.inputs + prev.invalid, refs)
        if delta.empty:
            log.info("index %s v%d is up to date (%d shards)", name, current.version, delta.unchanged)
            return {**summary(store, name, prev, "up-to-date"), "attempts": attempt, "code_shards_read": {}}
        ix.check_shrink(delta, allow_removal)  # before anything is built: a shrink needs a stated reason
        plan = ix.IndexPlan.from_dict(prev.plan)
        log.info("index %s v%d: %d added, %d changed, %d removed, %d unchanged shards (attempt %d)", name,
                 current.version, len(delta.added), len(delta.changed), len(delta.removed), delta.unchanged, attempt)
        if plan.ondisk or (delta.drop_parts and plan.index_type not in ix.REMOVABLE):
            log.warning("index %s is %s%s, which cannot %s: full rebuild", name, plan.index_type,
                        " merged on disk" if plan.ondisk else "",
                        "take rows in place" if plan.ondisk else "drop rows of changed/removed shards")
            return build_index(prev.dataset, prev.coder_id, prev.bits, name,
                               memory_budget=prev.memory_budget, force=True,
                               index_type=prev.index_type_requested,
                               merge_on_disk=prev.merge_on_disk_requested, settings=settings)
        todo = delta.to_read
        mean_rows = prev.n / max(1, len(prev.inputs))
        per = shards_per_task or ix.shards_per_task(mean_rows, plan.bytes_per_item, prev.memory_budget,
                                                    cfg.max_workers, len(todo))
        batches = [todo[i:i + per] for i in range(0, len(todo), per)]
        trained = None
        if plan.needs_training:
            key = ix.version_key(name, current.version, ix.TRAINED_FILE)
            head = store.head(key)
            if head is None:
                raise ix.IndexBuildError(f"{store.uri_of(key)} is missing: rebuild {name} with --force")
            trained = {**(prev.trained or {}), "key": key, "checksum": head.etag}  # rows, niter kept
        # what was asked: the previous build's, exclude_split included (older builds left queries out)
        asked = ix.BuildRecord(
            format=prev.format, name=prev.name, mode="refresh", dataset=prev.dataset, coder_id=prev.coder_id,
            coder_checksum=prev.coder_checksum, method=prev.method, model_id=prev.model_id, bits=prev.bits,
            memory_budget=prev.memory_budget, index_type_requested=prev.index_type_requested,
            exclude_split=prev.exclude_split, based_on=current.version, device=prev.device,
            recall_target=prev.recall_target, attempt=attempt,
            delta={"added": [r.key for r in delta.added], "changed": [r.key for r in delta.changed],
                   "removed": [i["key"] for i in delta.removed], "unchanged": delta.unchanged},
            removal_reason=allow_removal if delta.removed else None)
        res = publish_version(cfg, store, plan, batches, current, asked, plan_s=time.perf_counter() - t0, base=prev,
                        drop_parts=delta.drop_parts, trained=trained, eval_parts=[r.part for r in todo],
                        cleanup_on_loss=False)
        staged += res.pop("staged", [])
        if res["status"] == "published":
            for p in dict.fromkeys(staged):
                store.delete_prefix(p)
            return {**res, "attempts": attempt}
        log.warning("index %s: lost the race for CURRENT (now v%s) on attempt %d/%d; planning again on top of it",
                    name, res.get("current_version"), attempt, max_attempts)
    for p in dict.fromkeys(staged):
        store.delete_prefix(p)
    raise ix.IndexBuildError(f"refresh of {name} lost the race for CURRENT {max_attempts} times; nothing was "
                             f"published by this run; run it again")
