"""Feature extraction flow: every raw shard of a dataset (or a part range) through one model."""
from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from flows.limits import ensure_heavy_limit, server_tagged
from flows.progress import gather, publish_summary, summarize
from infra import layout
from infra.devices import shard_threads, torch_threads
from infra.planner import parse_shard_ranges, select_shards
from infra.registry import model_card
from infra.runners import SettingsTaskRunner
from infra.settings import Settings
from infra.store import shared_store
from flows.fanout import submit_shard_tasks
from tasks.extract import check_ids_across_shards, extract_shard, extract_shards


@flow(name="extract-features", flow_run_name="extract {dataset} with {model_id}", log_prints=True, task_runner=SettingsTaskRunner())
def extract_features(dataset: str, model_id: str, shards: str | None = None, force: bool = False,
                     settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Extract features for raw/<dataset>/ shards in `shards` ('120:180' or '0:3,7'; default all) with
    `model_id`. Done shards are skipped unless `force` (without starting their task when nothing changed since:
    tasks/caching.py); bad shards, and shards repeating ids of an earlier part, are quarantined and
    the run goes on."""
    layout.check_names(dataset=dataset, model=model_id)
    cfg = Settings.load(**(settings or {}))
    ensure_heavy_limit(cfg.heavy_limit)
    store = shared_store(cfg)
    log = get_run_logger()
    card = model_card(store, model_id)  # registers a pretrained id on first use, before fan-out
    refs = select_shards(store.list(layout.raw_prefix(dataset)), parse_shard_ranges(shards))
    if not refs:
        raise ValueError(f"no raw shards for dataset {dataset!r} in {store.uri}"
                         f"{' range ' + shards if shards else ''}: run `codeshard ingest {dataset}` first")
    log.info("extract %s with %s (%s): %d shards", dataset, model_id, card["arch"], len(refs))
    (check_ids,) = server_tagged(check_ids_across_shards)
    # torch threads once for the task threads this run starts (they inherit it), restored afterwards
    with torch_threads(shard_threads(cfg.max_workers)):
        futures, parts = submit_shard_tasks(cfg, extract_shard, extract_shards, refs, dataset, model_id, force=force)
        done = gather(futures, "extract", parts)
    # ids are unique across shards: a shard repeating an earlier part's ids is quarantined
    outcomes = check_ids(cfg, dataset, model_id, done)
    summary = summarize("extract", outcomes)
    summary["model_id"] = model_id
    publish_summary(summary, key=layout.artifact_key("extract", dataset, model_id))
    return summary
