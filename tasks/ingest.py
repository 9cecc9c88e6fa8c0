"""Ingest tasks: write one raw shard from a packaged dataset, or import one external shard."""
from __future__ import annotations

import functools
import hashlib
import json
import os
from typing import Any

import numpy as np
import pyarrow as pa
from prefect import task
from prefect.tasks import exponential_backoff

from infra import datasets, layout
from infra.manifests import Manifest, done_manifest, write_manifest
from infra.planner import ShardRef
from infra.settings import Settings
from infra.shards import features_table, normalise_raw, read_table, validate_features, validate_raw, write_table
from infra.store import StoreError, shared_store
from tasks.stage import is_store_error, logger, run_shard_stage

LOADERS = {
    "fashion-mnist": datasets.load_fashion_mnist,
    "wordnet": datasets.load_wordnet,
    "digits": datasets.load_digits,
}
INGEST_VERSION = "ingest-1"
# (query, train, val) rows per class; METHODS.md's defaults, scaled down for the tiny digits set.
SPLIT_SIZES = {"digits": (20, 100, 30)}
DEFAULT_SPLIT_SIZES = (100, 1000, 200)


@functools.lru_cache(maxsize=2)
def load_with_splits(dataset: str, seed: int) -> tuple[datasets.RawDataset, np.ndarray]:
    """The packaged dataset and its deterministic split column (cached per process)."""
    if dataset not in LOADERS:
        raise ValueError(f"unknown dataset {dataset!r}: packaged ones are {sorted(LOADERS)}; "
                         f"use --from PATH_OR_URI for Parquet shards in the raw schema")
    ds = LOADERS[dataset]()
    q, tr, va = SPLIT_SIZES.get(dataset, DEFAULT_SPLIT_SIZES)
    return ds, datasets.assign_splits(ds.labels, ds.is_test, seed=seed, query_per_class=q,
                                      train_per_class=tr, val_per_class=va)


def source_fingerprint(dataset: str, seed: int, shard_rows: int) -> str:
    """Checksum of what a packaged ingest produces: dataset identity, sizes, split seed, shard size."""
    ds, split = load_with_splits(dataset, seed)
    h = hashlib.sha256()
    h.update(json.dumps([INGEST_VERSION, dataset, len(ds), seed, shard_rows]).encode())
    h.update(ds.ids.tobytes())
    h.update(ds.labels.astype(np.int32).tobytes())
    return h.hexdigest()[:32]


# -- vector datasets (GloVe): rows land as features shards + raw shards of id/text/label/split ------
UNLABELLED = -1  # the label of every row of an unlabelled vector dataset


def vector_source(dataset: str, limit: int | None = None) -> datasets.VectorSource:
    """The packaged vector source of `dataset` (datasets.VECTOR_SOURCES), first `limit` rows."""
    return datasets.VECTOR_SOURCES[dataset](limit=limit)


@functools.lru_cache(maxsize=4)
def _vector_split_codes(dataset: str, n: int, seed: int) -> np.ndarray:
    """(n,) int8 index into shards.SPLITS of every row (cached per process: 1 B per row)."""
    split = datasets.assign_unlabelled_splits(n, seed)
    codes = np.zeros(n, np.int8)
    for i, name in enumerate(datasets.SPLITS):
        codes[split == name] = i
    return codes


def vector_fingerprint(src: datasets.VectorSource, seed: int, shard_rows: int) -> str:
    """Checksum of what a vector ingest produces: source identity (file size, rows, dim), split
    seed and sizes, shard size."""
    h = hashlib.sha256()
    h.update(json.dumps([INGEST_VERSION, src.name, src.model_id, src.n, src.dim, seed, shard_rows,
                         datasets.VECTOR_SPLIT_SIZES, os.path.getsize(src.emb_path)]).encode())
    return h.hexdigest()[:32]


@task(name="ingest_vector_shard", retries=3, retry_delay_seconds=exponential_backoff(1),
      retry_condition_fn=is_store_error, tags=["io"])
def ingest_vector_shard(settings: Settings, dataset: str, part: int, start: int, stop: int,
                        fingerprint: str, limit: int | None = None, force: bool = False,
                        date: str | None = None) -> dict[str, Any]:
    """Rows [start, stop) of a packaged vector dataset -> features/<dataset>/<model_id>/part-N
    (id, feature) and raw/<dataset>/part-N (id, text = the word, label = -1, split), each with its
    ingest manifest (features first, raw last; both record partition `date`). Skipped when both
    manifests match. There is no extract stage for such a dataset: the vectors are the features.
    Cost: one slice copy (~2 MB per 10,000 x 50 rows) and two Parquet writes; memory ~ one shard."""
    store = shared_store(settings)
    src = vector_source(dataset, limit)
    fkey, rkey = layout.features_key(dataset, src.model_id, part), layout.raw_key(dataset, part)
    fman = layout.manifest_key("ingest", dataset, src.model_id, part)
    rman = layout.manifest_key("ingest", dataset, "-", part)
    input_checksum = f"{fingerprint}:{start}:{stop}"
    if not force and done_manifest(store, fman, input_checksum, INGEST_VERSION) \
            and done_manifest(store, rman, input_checksum, INGEST_VERSION):
        logger().info("ingest %s part %d: skipped (done)", dataset, part)
        return {"part": part, "status": "skipped", "rows": stop - start, "output": store.uri_of(fkey)}
    ids = np.arange(start, stop, dtype=np.int64)
    feats = features_table(ids, datasets.read_vectors(src, start, stop))
    validate_features(fkey, feats, src.dim)
    split = np.asarray(datasets.SPLITS)[_vector_split_codes(dataset, src.n, settings.seed)[start:stop]]
    raw = pa.table({"id": pa.array(ids, pa.int64()),
                    "text": pa.array(datasets.read_words(src, start, stop), pa.string()),
                    "label": pa.array(np.full(stop - start, UNLABELLED, np.int32), pa.int32()),
                    "split": pa.array(split.tolist(), pa.string())})
    validate_raw(rkey, raw)
    for key, mkey, table in ((fkey, fman, feats), (rkey, rman, raw)):
        etag = write_table(store, key, table)
        write_manifest(store, mkey, Manifest("ingest", dataset, part, f"package:{src.name}:{src.model_id}",
                                             input_checksum, table.num_rows, key, etag, INGEST_VERSION,
                                             stats={"date": date} if date else {}))
    logger().info("ingest %s part %d: %d vectors -> %s", dataset, part, len(ids), store.uri_of(fkey))
    return {"part": part, "status": "done", "rows": int(len(ids)), "output": store.uri_of(fkey)}


def raw_table(ds: datasets.RawDataset, split: np.ndarray, start: int, stop: int) -> pa.Table:
    cols: dict[str, Any] = {"id": pa.array(ds.ids[start:stop], pa.int64())}
    if ds.pixels is not None:
        cols["image"] = pa.array(datasets.png_bytes(ds.pixels[start:stop]), pa.binary())
    if ds.texts is not None:
        cols["text"] = pa.array(ds.texts[start:stop], pa.string())
    cols["label"] = pa.array(ds.labels[start:stop].astype(np.int32), pa.int32())
    cols["split"] = pa.array(split[start:stop].tolist(), pa.string())
    return pa.table(cols)


@task(name="ingest_shard", retries=3, retry_delay_seconds=exponential_backoff(1),
      retry_condition_fn=is_store_error, tags=["io"])
def ingest_shard(settings: Settings, dataset: str, part: int, start: int, stop: int,
                 fingerprint: str, force: bool = False, date: str | None = None) -> dict[str, Any]:
    """Write rows [start, stop) of a packaged dataset as raw/<dataset>/part-NNNNN.parquet; its
    manifest records partition `date` (YYYY-MM-DD). Skips when the manifest matches the fingerprint
    (the shard keeps the date it landed with). Cost: PNG-encode ~30 µs per 28x28 image."""
    store = shared_store(settings)
    key = layout.raw_key(dataset, part)
    mkey = layout.manifest_key("ingest", dataset, "-", part)
    input_checksum = f"{fingerprint}:{start}:{stop}"
    if not force and done_manifest(store, mkey, input_checksum, INGEST_VERSION):
        logger().info("ingest %s part %d: skipped (done)", dataset, part)
        return {"part": part, "status": "skipped", "rows": stop - start, "output": store.uri_of(key)}
    ds, split = load_with_splits(dataset, settings.seed)
    table = raw_table(ds, split, start, stop)
    validate_raw(key, table)
    etag = write_table(store, key, table)
    write_manifest(store, mkey, Manifest("ingest", dataset, part, f"package:{dataset}", input_checksum,
                                         table.num_rows, key, etag, INGEST_VERSION,
                                         stats={"date": date} if date else {}))
    logger().info("ingest %s part %d: %d rows -> %s", dataset, part, table.num_rows, store.uri_of(key))
    return {"part": part, "status": "done", "rows": table.num_rows, "output": store.uri_of(key)}


@task(name="import_shard", retries=3, retry_delay_seconds=exponential_backoff(1),
      retry_condition_fn=is_store_error, tags=["io"])
def import_shard(settings: Settings, dataset: str, source_uri: str, ref: ShardRef,
                 splits_key: str | None, force: bool = False, date: str | None = None) -> dict[str, Any]:
    """Validate one external raw shard (`ref.key` under `source_uri`) and publish it as
    raw/<dataset>/part-<ref.part>.parquet (the part infra.imports assigned it), adding the split
    column from `splits_key` when the source has none; its manifest records partition `date`.
    Bad shards (wrong types, values the raw schema cannot hold, null ids/labels/splits) are
    quarantined under the dataset and source. Cost: one read and one write of the shard."""
    store = shared_store(settings)
    source = shared_store(settings, uri=source_uri)

    def work():
        table = read_table(source, ref.key)
        validate_raw(ref.key, table)
        table = normalise_raw(ref.key, table)
        if "split" not in table.column_names and splits_key:
            table = table.append_column("split", _splits_for(store, splits_key, ref.key, table.column("id")))
        return table, {"source": source.uri_of(ref.key), **({"date": date} if date else {})}

    # Manifests live in the destination store, one per part (parts are unique across sources).
    outcome = run_shard_stage(store, stage="import", dataset=dataset, output_id="-", ref=ref,
                              output_key=layout.raw_key(dataset, ref.part), code_version=INGEST_VERSION,
                              force=force, work=work, input_store=source,
                              quarantine_name=layout.import_quarantine_name(dataset, source_uri, ref.key))
    return outcome.as_dict()


def _splits_for(store, splits_key: str, key: str, ids: pa.ChunkedArray) -> pa.Array:
    """The planned split of each id. An id missing from the plan means the shard changed since
    planning: a store-level race (retried, then failed: the rerun plans again), not bad data."""
    mapping = read_table(store, splits_key)
    lookup = dict(zip(mapping.column("id").to_pylist(), mapping.column("split").to_pylist()))
    missing = [i for i in ids.to_pylist() if i not in lookup]
    if missing:
        raise StoreError(f"{key}: id {missing[0]} (and {len(missing) - 1} more) not in the split plan "
                         f"{store.uri_of(splits_key)}: the shard changed since planning; rerun the import")
    return pa.array([lookup[i] for i in ids.to_pylist()], pa.string())
