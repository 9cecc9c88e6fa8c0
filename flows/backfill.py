"""Backfill: re-run chosen stages over a shard range or a partition-date range, skipping done shards
unless `force`."""
from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from flows.extract_features import extract_features
from flows.generate_codes import encode
from flows.refresh_index import refresh_index
from infra import layout
from infra.manifests import partition_dates
from infra.planner import parse_date_range, parse_shard_ranges, parts_spec, select_by_date, select_shards
from infra.registry import RegistryError, coder_card
from infra.runners import SettingsTaskRunner, shared_cluster
from infra.settings import Settings
from infra.store import shared_store

STAGES = ("extract", "codes", "index")


def dataset_indexes(store, dataset: str) -> list[str]:
    """Published index names of a dataset (names start with '<dataset>-', pipeline convention)."""
    names = {layout.name_under(layout.INDEXES_ROOT, i.key) for i in store.list(layout.INDEXES_ROOT)
             if i.key.endswith("/CURRENT")}
    return sorted(n for n in names if n.startswith(f"{dataset}-"))


def dataset_coders(store, dataset: str, model_id: str) -> list[str]:
    """Registered coders trained on (dataset, model_id) features."""
    out = []
    for info in store.list(layout.CODERS_ROOT):
        if info.key.endswith("/card.json"):
            cid = layout.name_under(layout.CODERS_ROOT, info.key)
            try:
                card = coder_card(store, cid)
            except RegistryError:
                continue
            if card.get("dataset") == dataset and card.get("model_id") == model_id:
                out.append(cid)
    return sorted(out)


@flow(name="backfill", log_prints=True, task_runner=SettingsTaskRunner())
def backfill(dataset: str, model_id: str, shards: str | None = None, dates: str | None = None,
             stages: list[str] | None = None, coder_ids: list[str] | None = None, force: bool = False,
             settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Re-run `stages` (extract, codes, index) over parts in `shards` ('120:180' or '0:3,7') and/or
    whose partition date is in `dates` ('2026-11-01:2026-11-30', inclusive; recorded by ingest);
    both given: parts in both. Codes use the registered coders of (dataset, model_id) unless
    `coder_ids`; index refreshes every published index of the dataset (a refresh reads only shards
    added or changed since its version). Cost of `dates`: one small GET per raw shard."""
    if not shards and not dates:
        raise ValueError("backfill needs shards (e.g. '120:180') or dates (e.g. '2026-11-01:2026-11-30')")
    stages = stages or list(STAGES)
    bad = set(stages) - set(STAGES)
    if bad:
        raise ValueError(f"unknown stages {sorted(bad)}; choose from {STAGES}")
    store = shared_store(Settings.load(**(settings or {})))
    log = get_run_logger()
    out: dict[str, Any] = {"dataset": dataset, "shards": shards, "dates": dates, "stages": stages}
    if dates:
        refs = select_shards(store.list(layout.raw_prefix(dataset)), parse_shard_ranges(shards))
        parts = select_by_date(partition_dates(store, dataset, refs), parse_date_range(dates))
        log.info("backfill %s: %d of %d raw shards have a partition date in %s: parts %s", dataset, len(parts),
                 len(refs), dates, parts_spec(parts) or "none")
        if not parts:
            return out
        shards = out["shards"] = parts_spec(parts)
    with shared_cluster(settings) as stage_settings:  # one Dask cluster for every stage
        if "extract" in stages:
            out["extract"] = extract_features(dataset, model_id, shards=shards, force=force,
                                              settings=stage_settings)
        if "codes" in stages:
            coder_ids = coder_ids or dataset_coders(store, dataset, model_id)
            if not coder_ids:
                log.warning("no registered coders for %s/%s: codes stage has nothing to do", dataset, model_id)
            out["codes"] = encode(dataset, model_id, coder_ids, shards=shards, force=force,
                                  settings=stage_settings) if coder_ids else []
        if "index" in stages:
            out["index"] = [refresh_index(name, settings=stage_settings) for name in dataset_indexes(store, dataset)]
    return out
