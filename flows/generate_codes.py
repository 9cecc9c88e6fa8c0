"""Code generation: train coders once on (dataset, model) features, then encode every shard."""
from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from flows.limits import ensure_heavy_limit, server_tagged
from flows.progress import gather, publish_summary, summarize
from infra import layout
from infra.planner import parse_shard_ranges, select_shards
from infra.runners import SettingsTaskRunner
from infra.settings import Settings
from infra.store import shared_store
from flows.fanout import submit_shard_tasks
from tasks.codes import coder_id_for, encode_shard, encode_shards, train_coder

# The longest code each method is trained for; DRQ yields every shorter length as a prefix.
DEFAULT_METHODS = {"drq": 64}


@flow(name="train-coders", flow_run_name="train coders on {dataset} {model_id}", log_prints=True, task_runner=SettingsTaskRunner())
def train_coders(dataset: str, model_id: str, methods: dict[str, int] | None = None,
                 params: dict[str, dict[str, Any]] | None = None, force: bool = False,
                 settings: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Fit and register one coder per {method: bits}; returns their cards (small dicts)."""
    layout.check_names(dataset=dataset, model=model_id)
    cfg = Settings.load(**(settings or {}))
    ensure_heavy_limit(cfg.heavy_limit)
    methods = methods or DEFAULT_METHODS
    (train,) = server_tagged(train_coder)
    futures = [train.submit(cfg, dataset, model_id, m, b, (params or {}).get(m), force)
               for m, b in methods.items()]
    cards = [f.result() for f in futures]
    for c in cards:
        print(f"coder {c['coder_id']}: lengths {c['lengths']}, val {c['val']}")
    return cards


@flow(name="encode", flow_run_name="encode {dataset} with {coder_ids}", log_prints=True, task_runner=SettingsTaskRunner())
def encode(dataset: str, model_id: str, coder_ids: list[str], shards: str | None = None,
           force: bool = False, settings: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Encode features/<dataset>/<model_id>/ shards (in `shards`: '120:180' or '0:3,7') with each
    registered coder; done shards are skipped (cached: tasks/caching.py) unless `force`."""
    layout.check_names(dataset=dataset, model=model_id, coder=coder_ids)
    cfg = Settings.load(**(settings or {}))
    ensure_heavy_limit(cfg.heavy_limit)
    store = shared_store(cfg)
    refs = select_shards(store.list(layout.features_prefix(dataset, model_id)), parse_shard_ranges(shards))
    if not refs:
        raise ValueError(f"no features for {dataset}/{model_id}: run `codeshard extract` first")
    summaries = []
    for coder_id in coder_ids:
        futures, parts = submit_shard_tasks(cfg, encode_shard, encode_shards, refs, dataset, model_id, coder_id,
                                     force=force)
        s = summarize("encode", gather(futures, f"encode {coder_id}", parts))
        s["coder_id"] = coder_id
        publish_summary(s, key=layout.artifact_key("encode", dataset, coder_id))
        summaries.append(s)
    return summaries


@flow(name="generate-codes", flow_run_name="codes for {dataset} {model_id}", log_prints=True, task_runner=SettingsTaskRunner())
def generate_codes(dataset: str, model_id: str, methods: dict[str, int] | None = None,
                   shards: str | None = None, force: bool = False,
                   settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """train-coders then encode: register each coder once, store each code once at full length."""
    cards = train_coders(dataset, model_id, methods, force=force, settings=settings)
    ids = [c["coder_id"] for c in cards]
    get_run_logger().info("encoding with %s", ids)
    return {"coders": ids, "encode": encode(dataset, model_id, ids, shards, force, settings=settings)}


__all__ = ["coder_id_for", "encode", "generate_codes", "train_coders"]
