"""Ingest flow: packaged datasets (fashion-mnist, wordnet, digits) or external raw Parquet shards."""
from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
from prefect import flow, get_run_logger

from flows.progress import gather, publish_summary, summarize
from infra import datasets
from infra.planner import partition_date, row_slices, select_shards
from infra.settings import Settings
from infra.shards import ShardInvalid, check_raw_types, open_parquet, read_table, write_table
from infra.store import open_store
from tasks.ingest import (import_shard, ingest_shard, ingest_vector_shard, load_with_splits, source_fingerprint,
                          vector_fingerprint, vector_source)


@flow(name="ingest", log_prints=True)
def ingest(dataset: str, source: str | None = None, shard_rows: int | None = None, force: bool = False,
           settings: dict[str, Any] | None = None, limit: int | None = None,
           date: str | None = None) -> dict[str, Any]:
    """Write raw/<dataset>/part-*.parquet. `source`: a folder or URI of raw-schema Parquet shards.
    Vector datasets (glove) also write features/<dataset>/<model_id>/part-*.parquet: their vectors
    are the features (no extract stage); `limit` takes only their first `limit` rows.
    `date` (YYYY-MM-DD, default today UTC) is the partition date recorded for the raw shards written
    now (in their ingest/import manifests), which `backfill(dates=...)` selects on."""
    cfg = Settings.load(**(settings or {}))
    shard_rows = shard_rows or cfg.shard_rows
    log = get_run_logger()
    day = partition_date(date)
    if limit is not None and (source is not None or dataset not in datasets.VECTOR_SOURCES):
        raise ValueError(f"limit applies to packaged vector datasets only ({sorted(datasets.VECTOR_SOURCES)})")
    if source is None and dataset in datasets.VECTOR_SOURCES:
        src = vector_source(dataset, limit)
        fp = vector_fingerprint(src, cfg.seed, shard_rows)
        slices = row_slices(src.n, shard_rows)
        log.info("ingest %s: %d vectors (D=%d) -> features/%s/%s/, %d shards of %d", dataset, src.n, src.dim,
                 dataset, src.model_id, len(slices), shard_rows)
        futures = [ingest_vector_shard.submit(cfg, dataset, part, a, b, fp, limit, force, day)
                   for part, (a, b) in enumerate(slices)]
    elif source is None:
        ds, _ = load_with_splits(dataset, cfg.seed)
        fp = source_fingerprint(dataset, cfg.seed, shard_rows)
        slices = row_slices(len(ds), shard_rows)
        log.info("ingest %s: %d rows -> %d shards of %d", dataset, len(ds), len(slices), shard_rows)
        futures = [ingest_shard.submit(cfg, dataset, part, a, b, fp, force, day)
                   for part, (a, b) in enumerate(slices)]
    else:
        uri = source if "://" in source else f"file://{_abspath(source)}"
        src = open_store(cfg, uri=uri)
        refs = select_shards([i for i in src.list("") if i.key.endswith(".parquet")]) or \
            _any_parquet(src)
        if not refs:
            raise ValueError(f"no Parquet shards under {uri}")
        splits_key = _plan_splits(cfg, dataset, src, refs)
        log.info("import %s: %d shards from %s", dataset, len(refs), uri)
        futures = [import_shard.submit(cfg, dataset, uri, ref, part, splits_key, force, day)
                   for part, ref in enumerate(refs)]
    summary = summarize("ingest", gather(futures, "ingest"))
    publish_summary(summary, key=f"ingest-{_slug(dataset)}")
    return summary


def _any_parquet(src):
    """Arbitrary *.parquet names (not part-NNNNN): numbered in sorted key order."""
    from infra.planner import ShardRef

    return [ShardRef(i.key, n, i.etag, i.size) for n, i in enumerate(src.list("")) if i.key.endswith(".parquet")]


def _plan_splits(cfg: Settings, dataset: str, src, refs) -> str | None:
    """When source shards carry no split column, assign splits over all of them at once (reads only
    the id and label columns) and stage the mapping in the store. Returns its key, or None."""
    ids, labels = [], []
    for ref in refs:
        try:
            schema = open_parquet(src, ref.key).schema_arrow
            if "split" in schema.names or "id" not in schema.names:
                continue
            cols = [c for c in ("id", "label") if c in schema.names]
            check_raw_types(ref.key, schema, cols)
            t = read_table(src, ref.key, columns=cols)
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
    key = f"_staging/{dataset}/splits.parquet"
    write_table(open_store(cfg), key, pa.table({"id": all_ids, "split": split.tolist()}))
    return key


def _abspath(p: str) -> str:
    import os

    return os.path.abspath(p)


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in s.lower())
