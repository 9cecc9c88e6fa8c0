"""Ingest flow: packaged datasets (fashion-mnist, wordnet, digits) or external raw Parquet shards."""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import pyarrow as pa
from prefect import Task, flow, get_run_logger

from flows.limits import server_tagged
from flows.progress import gather, publish_summary, summarize
from infra import datasets, imports, layout
from infra.planner import ShardRef, partition_date, parts_spec, row_slices, select_shards
from infra.runners import SettingsTaskRunner
from infra.settings import Settings
from infra.shards import ShardInvalid, check_raw_types, normalise_raw, open_parquet, read_table, write_table
from infra.store import Store, shared_store
from tasks.ingest import (LOADERS, import_shard, ingest_shard, ingest_vector_shard, load_with_splits,
                          source_fingerprint, vector_fingerprint, vector_source)


@flow(name="ingest", log_prints=True, task_runner=SettingsTaskRunner())
def ingest(dataset: str, source: str | None = None, shard_rows: int | None = None, force: bool = False,
           settings: dict[str, Any] | None = None, limit: int | None = None,
           date: str | None = None) -> dict[str, Any]:
    """Write raw/<dataset>/part-*.parquet. `source`: a folder or URI of raw-schema Parquet shards,
    appended to the dataset (infra.imports: each source shard keeps one part; new ones go after the
    highest part). Without `source`, a dataset that is not packaged is re-imported from every
    source recorded for it (new source shards are picked up, unchanged ones skipped); raw shards
    with no recorded source are reported as there (skipped).
    Vector datasets (glove) also write features/<dataset>/<model_id>/part-*.parquet: their vectors
    are the features (no extract stage); `limit` takes only their first `limit` rows.
    `date` (YYYY-MM-DD, default today UTC) is the partition date recorded for the raw shards written
    now (in their ingest/import manifests), which `backfill(dates=...)` selects on."""
    layout.check_name("dataset", dataset)
    cfg = Settings.load(**(settings or {}))
    shard_rows = shard_rows or cfg.shard_rows
    log = get_run_logger()
    day = partition_date(date)
    if limit is not None and (source is not None or dataset not in datasets.VECTOR_SOURCES):
        raise ValueError(f"limit applies to packaged vector datasets only ({sorted(datasets.VECTOR_SOURCES)})")
    vector_task, shard_task, import_task = server_tagged(ingest_vector_shard, ingest_shard, import_shard)
    if source is None and dataset in datasets.VECTOR_SOURCES:
        src = vector_source(dataset, limit)
        fp = vector_fingerprint(src, cfg.seed, shard_rows)
        slices = row_slices(src.n, shard_rows)
        log.info("ingest %s: %d vectors (D=%d) -> features/%s/%s/, %d shards of %d", dataset, src.n, src.dim,
                 dataset, src.model_id, len(slices), shard_rows)
        futures = [vector_task.submit(cfg, dataset, part, a, b, fp, limit, force, day)
                   for part, (a, b) in enumerate(slices)]
    elif source is None and dataset in LOADERS:
        ds, _ = load_with_splits(dataset, cfg.seed)
        fp = source_fingerprint(dataset, cfg.seed, shard_rows)
        slices = row_slices(len(ds), shard_rows)
        log.info("ingest %s: %d rows -> %d shards of %d", dataset, len(ds), len(slices), shard_rows)
        futures = [shard_task.submit(cfg, dataset, part, a, b, fp, force, day)
                   for part, (a, b) in enumerate(slices)]
    else:
        store = shared_store(cfg)
        uris = [_source_uri(source)] if source is not None else imports.recorded_sources(store, dataset)
        if not uris:  # not packaged, never imported here: raw shards put there some other way, or nothing
            summary = summarize("ingest", _already_there(store, dataset))
            publish_summary(summary, key=layout.artifact_key("ingest", dataset))
            return summary
        futures = [f for uri in uris for f in _submit_import(import_task, cfg, store, dataset, uri, force, day)]
    summary = summarize("ingest", gather(futures, "ingest"))
    publish_summary(summary, key=layout.artifact_key("ingest", dataset))
    return summary


def _submit_import(import_task: Task, cfg: Settings, store: Store, dataset: str, uri: str, force: bool, day: str) -> list:
    """Plan one source's import (splits, a raw part per shard) and submit its shard tasks. Cost: one
    LIST of the source, the split planning reads (see _plan_splits), assign_parts' store calls."""
    src = shared_store(cfg, uri=uri)
    infos = [i for i in src.list("") if i.key.endswith(".parquet")]
    if not infos:
        raise ValueError(f"no Parquet shards under {uri}")
    imports.record_source(store, dataset, uri)
    splits_key = _plan_splits(cfg, dataset, uri, src, infos)
    parts = imports.assign_parts(store, dataset, uri, [i.key for i in infos])
    get_run_logger().info("import %s: %d shards from %s -> parts %s", dataset, len(infos), uri,
                          parts_spec(parts.values()))
    return [import_task.submit(cfg, dataset, uri, ShardRef(i.key, parts[i.key], i.etag, i.size), splits_key,
                                force, day) for i in infos]


def _already_there(store: Store, dataset: str) -> list[dict[str, Any]]:
    """Raw shards of a dataset with no recorded import source, reported as skipped; none at all is
    an error saying what to do. Cost: one LIST and one Parquet footer read per shard."""
    refs = select_shards(store.list(layout.raw_prefix(dataset)))
    if not refs:
        raise ValueError(f"unknown dataset {dataset!r}: packaged ones are {sorted(LOADERS)}, and nothing was "
                         f"imported as {dataset!r}; use --from PATH_OR_URI for Parquet shards in the raw schema")
    return [{"stage": "ingest", "part": r.part, "status": "skipped", "output": store.uri_of(r.key),
             "rows": open_parquet(store, r.key).metadata.num_rows} for r in refs]


def _plan_splits(cfg: Settings, dataset: str, uri: str, src: Store, infos) -> str | None:
    """When source shards carry no split column, assign splits over all of them at once (reads only
    the id and label columns) and stage the mapping in the store, one per source (two imports at
    once never share it). Shards imported earlier keep the splits they landed with. Returns its
    key, or None."""
    ids, labels = [], []
    for info in infos:
        try:
            schema = open_parquet(src, info.key).schema_arrow
            if "split" in schema.names or "id" not in schema.names:
                continue
            cols = [c for c in ("id", "label") if c in schema.names]
            check_raw_types(info.key, schema, cols)
            t = normalise_raw(info.key, read_table(src, info.key, columns=cols))
            if any(t.column(c).null_count for c in cols):
                continue
        except ShardInvalid:  # a bad shard is quarantined by its import task
            continue
        # a store failure propagates: planning splits without a shard would silently give every
        # other shard different splits (and that shard 'database' for all its rows)
        ids.append(t.column("id").to_numpy())
        labels.append(t.column("label").to_numpy() if "label" in t.column_names else np.zeros(t.num_rows, np.int32))
    if not ids:
        return None
    all_ids, all_labels = np.concatenate(ids), np.concatenate(labels)
    split = datasets.assign_splits(all_labels, np.zeros(len(all_ids), bool), seed=cfg.seed)
    key = layout.import_splits_key(dataset, uri)
    write_table(shared_store(cfg), key, pa.table({"id": all_ids, "split": split.tolist()}))
    return key


def _source_uri(source: str) -> str:
    return source if "://" in source else f"file://{os.path.abspath(source)}"
