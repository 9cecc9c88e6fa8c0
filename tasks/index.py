"""Index tasks: count a batch's rows, train a coarse quantizer, build one batch's partial index from
stored code shards, merge partials into a claimed version, evaluate and complete that version.

Each task takes keys and small parameters and returns small dicts (keys, counts, seconds) through
Prefect, never arrays. Codes are read from the store as written by the encode stage; nothing is
re-encoded. Each task lists the code shards it read (`code_shards_read`), so a run can say which
shards it touched (tests check the same against the store's process-wide read counters).
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import tempfile
import time
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from prefect import task
from prefect.tasks import exponential_backoff

from infra import indexes as ix
from infra import layout
from infra.devices import omp_threads, shard_threads, use_device
from infra.manifests import writer
from infra.planner import ShardRef
from infra.registry import load_coder
from infra.settings import Settings
from infra.shards import ShardInvalid, codes_matrix, features_matrix, open_parquet, validate_codes
from infra.store import Store, StoreError, shared_store
from tasks.stage import is_store_error, logger

INDEX_CODE_VERSION = "index-1"  # part of every staging digest: bump when partials change meaning
MAX_EVAL_PARTS = 4              # ADC evaluation reads the features of at most this many shards


def read_code_shard(store: Store, ref: ShardRef, nbytes: int,
                    exclude_split: str | None = None) -> tuple[np.ndarray, np.ndarray, str, int]:
    """(ids int64, full-length codes (n, nbytes) uint8, checksum of the bytes read, rows left out)
    of one codes shard: every row, less those of raw split `exclude_split` when given. One GET of
    the whole object (a shard fits in memory by construction). Raises ShardInvalid."""
    data, etag = store.read_with_etag(ref.key)
    try:
        table = pq.read_table(io.BytesIO(data), columns=["id", "code"])
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for corrupt files
        raise ShardInvalid(ref.key, f"not a readable codes shard ({type(e).__name__}: {e})") from None
    validate_codes(ref.key, table, nbytes)
    ids, codes = table.column("id").to_numpy().astype(np.int64), codes_matrix(table)
    keep = split_mask(store, ref, ids, exclude_split) if exclude_split else None
    if keep is None:
        return ids, codes, etag, 0
    return ids[keep], codes[keep], etag, int(len(ids) - keep.sum())


def split_mask(store: Store, ref: ShardRef, ids: np.ndarray, split: str) -> np.ndarray | None:
    """Rows of a codes shard whose raw row is not in `split`. Reads only the id and split columns
    of the raw shard with the same part number; None (keep all) when there is no such shard or no
    split column."""
    dataset = layout.dataset_of(ref.key)
    try:
        pf = open_parquet(store, layout.raw_key(dataset, ref.part))
        if "split" not in pf.schema_arrow.names:
            return None
        meta = pf.read(columns=["id", "split"])
    except (ShardInvalid, StoreError):
        return None
    left_out = meta.column("id").to_numpy()[np.asarray(meta.column("split").to_pylist()) == split]
    return ~np.isin(ids, left_out) if len(left_out) else None


@task(name="count_rows", retries=3, retry_delay_seconds=exponential_backoff(1),
      retry_condition_fn=is_store_error)
def count_rows(settings: Settings, refs: list[ShardRef]) -> list[int]:
    """Rows of each shard from its Parquet footer (one small range read per shard; 0 if unreadable:
    the batch task records why)."""
    store = shared_store(settings)
    out = []
    for ref in refs:
        try:
            out.append(int(open_parquet(store, ref.key).metadata.num_rows))
        except ShardInvalid:
            out.append(0)
    return out


@task(name="train_index", retries=3, retry_delay_seconds=exponential_backoff(1),
      retry_condition_fn=is_store_error, tags=["heavy"])
def train_index(settings: Settings, name: str, coder_id: str, bits: int, plan: dict[str, Any],
                refs: list[ShardRef], device: str = "cpu") -> dict[str, Any]:
    """Train the coarse quantizer of an IVF plan on codes sampled from `refs` (random shards,
    `ix.ivf_train_rows(nlist)` rows, IVF_TRAIN_NITER k-means iterations) and stage the empty trained
    index. Skipped when already staged. Returns rows and niter (build.json 'trained').
    Memory: the sample (its codes and decoded floats) plus the k-means state."""
    log = logger()
    store = shared_store(settings)
    p = ix.IndexPlan.from_dict(plan)
    coder, card = load_coder(store, coder_id)
    want, niter = ix.ivf_train_rows(p.nlist), ix.IVF_TRAIN_NITER
    digest = ix.digest_of({"train": INDEX_CODE_VERSION, "type": p.index_type, "nlist": p.nlist,
                           "rows": want, "niter": niter,
                           "coder": card["checksum"], "bits": bits,
                           "shards": [(r.key, r.checksum) for r in refs]})
    key = ix.staging_key_prefix(name, "train-" + digest) + ix.TRAINED_FILE
    info = store.head(key)
    if info is not None:
        return {"key": key, "checksum": info.etag, "status": "skipped", "rows": min(want, p.n), "niter": niter,
                "seconds": 0.0}
    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    order = rng.permutation(len(refs))
    got, have, read = [], 0, []
    for i in order:
        read.append(refs[int(i)].key)
        try:
            _, codes, _, _ = read_code_shard(store, refs[int(i)], coder.bytes_per_item())
        except ShardInvalid as e:
            log.warning("train_index: skipping %s: %s", e.key, e.reason)
            continue
        got.append(codes)
        have += len(codes)
        if have >= want:
            break
    if not got:
        raise ix.IndexBuildError(f"no readable code shards to train {p.index_type} on")
    sample = np.concatenate(got)
    if len(sample) > want:
        sample = sample[np.sort(rng.choice(len(sample), want, replace=False))]
    use_device(device)  # k-means on the GPU when asked and present, else CPU (logged)
    data = ix.train_ivf(p, coder, bits, sample, niter=niter)
    etag = store.write_bytes(key, data)
    seconds = time.perf_counter() - t0
    log.info("trained %s (nlist %d) on %d rows in %.1fs", p.index_type, p.nlist, len(sample), seconds)
    return {"key": key, "checksum": etag, "status": "done", "rows": int(len(sample)), "niter": niter,
            "seconds": seconds, "code_shards_read": read}


@task(name="index_batch", retries=3, retry_delay_seconds=exponential_backoff(1),
      retry_condition_fn=is_store_error, tags=["heavy"])
def index_batch(settings: Settings, name: str, coder_id: str, bits: int, plan: dict[str, Any],
                refs: list[ShardRef], trained: dict[str, Any] | None = None,
                exclude_split: str | None = None) -> dict[str, Any]:
    """Build the partial index of one batch of code shards (less the rows of raw split
    `exclude_split`, when given) and stage it under
    indexes/<name>/_staging/<digest>/ (index.faiss, ids.parquet, stats.json last). The digest covers
    the plan, the coder checksum, the length, the trained quantizer and every shard's key+checksum,
    so a rerun after a kill reuses a staged batch instead of reading its shards again.
    Memory ~ 3 × the batch's codes (the codes, the partial index, its serialised bytes)."""
    log = logger()
    store = shared_store(settings)
    p = ix.IndexPlan.from_dict(plan)
    coder, card = load_coder(store, coder_id)
    digest = ix.digest_of({"format": ix.FORMAT, "code": INDEX_CODE_VERSION, "type": p.index_type,
                           "bytes": p.bytes_per_item, "nlist": p.nlist, "routing": p.routing or "exact",
                           "coder": card["checksum"],
                           "bits": bits, "trained": (trained or {}).get("checksum"), "exclude": exclude_split,
                           "shards": [(r.key, r.checksum) for r in refs]})
    prefix = ix.staging_key_prefix(name, digest)
    try:
        stats = json.loads(store.read_bytes(prefix + ix.STATS_FILE))
        if stats.get("format") == ix.FORMAT:
            log.info("index batch %s: skipped (staged, %d rows)", digest, stats["rows"])
            return {**stats, "status": "skipped", "code_shards_read": []}
    except StoreError:
        pass
    t0 = time.perf_counter()
    trained_bytes = store.read_bytes(trained["key"]) if trained else None
    index = ix.new_index(p, coder, bits, trained_bytes)
    route = ix.router(index, p)  # once per batch, reused for every shard's codes
    ids_all, parts_all, inputs, invalid = [], [], [], []
    for ref in refs:
        try:
            ids, codes, etag, excluded = read_code_shard(store, ref, coder.bytes_per_item(), exclude_split)
        except ShardInvalid as e:
            log.error("index %s: skipping invalid shard %s: %s", name, e.key, e.reason)
            head = store.head(ref.key)
            invalid.append({"key": ref.key, "part": ref.part, "checksum": head.etag if head else ref.checksum,
                            "reason": e.reason})
            continue
        with omp_threads(shard_threads(settings.max_workers)):  # batches run side by side
            ix.add_codes(index, p, coder, bits, codes, route)
        ids_all.append(ids)
        parts_all.append(np.full(len(ids), ref.part, dtype=np.int32))
        inputs.append({"key": ref.key, "part": ref.part, "checksum": etag, "rows": int(len(ids)),
                       "excluded": excluded})
    ids = np.concatenate(ids_all) if ids_all else np.zeros(0, np.int64)
    parts = np.concatenate(parts_all) if parts_all else np.zeros(0, np.int32)
    store.write_bytes(prefix + ix.INDEX_FILE, ix.index_to_bytes(index))
    store.write_bytes(prefix + ix.IDS_FILE, ix.ids_bytes(ids, parts))
    stats = {"format": ix.FORMAT, "staging": prefix, "rows": int(len(ids)), "inputs": inputs,
             "invalid": invalid, "seconds": time.perf_counter() - t0, "peak_rss_bytes": ix.peak_rss_bytes(),
             "writer": writer()}
    store.write_bytes(prefix + ix.STATS_FILE, json.dumps(stats, sort_keys=True).encode())  # commit point
    log.info("index batch %s: %d shards, %d rows in %.2fs", digest, len(inputs), len(ids), stats["seconds"])
    return {**stats, "status": "done", "code_shards_read": [r.key for r in refs]}


@task(name="merge_index", retries=2, retry_delay_seconds=exponential_backoff(1),
      retry_condition_fn=is_store_error, tags=["heavy"])
def merge_index(settings: Settings, name: str, coder_id: str, bits: int, plan: dict[str, Any],
                partials: list[dict[str, Any]], memory_budget_bytes: int, claim_after: int, build_id: str,
                base_version: int | None = None, drop_parts: list[int] | None = None,
                trained: dict[str, Any] | None = None) -> dict[str, Any]:
    """Merge staged partials (in order) onto an empty index, or onto a copy of `base_version` minus
    the rows of `drop_parts`; claim the next free version > `claim_after` and write its index.faiss
    and ids.parquet (build.json comes from `evaluate_version`). Peak memory ~ 2 × the final index
    (the index and its serialised bytes) + one partial. An on-disk plan (`plan.ondisk`, no base)
    downloads the partials to a local temporary directory and merges their lists into one
    index.ivfdata file there (`ix.merge_ivf_on_disk`); memory is then the ids (12 bytes per item)
    and mapped pages, disk ~2 × the lists. Returns the version and counts."""
    log = logger()
    store = shared_store(settings)
    p = ix.IndexPlan.from_dict(plan)
    coder, _ = load_coder(store, coder_id)
    t0 = time.perf_counter()
    trained_bytes = store.read_bytes(trained["key"]) if trained else None
    removed = 0
    tmp = tempfile.TemporaryDirectory(prefix="codeshard-merge-") if p.ondisk else None
    if p.ondisk:
        if base_version is not None:
            raise ix.IndexBuildError(f"index {name}: an on-disk IVF version is not refreshed in place; rebuild")
        ci = _merge_on_disk(store, p, bits, partials, trained_bytes, tmp.name)
    elif base_version is not None:
        ci, _ = ix.load_version(store, name, base_version)
        removed = ix.remove_parts(ci, drop_parts or []) if drop_parts else 0
    else:
        ci = ix.CodeIndex(p, bits, ix.new_index(p, coder, bits, trained_bytes, final=True),
                          np.zeros(0, np.int64), np.zeros(0, np.int32))
    for part in partials if not p.ondisk else []:
        if not part["rows"]:
            continue
        src = ix.code_index_from_bytes(p, bits, store.read_bytes(part["staging"] + ix.INDEX_FILE),
                                       store.read_bytes(part["staging"] + ix.IDS_FILE))
        ix.merge_into(ci, src)
        del src
    n = ci.ntotal
    if n == 0:
        raise ix.IndexBuildError(f"index {name}: no rows to index (every shard invalid or empty)")
    need = ix.index_memory_bytes(p.index_type, n, p.bytes_per_item, p.nlist, p.hnsw_m or ix.HNSW_M)
    if need > memory_budget_bytes:
        raise ix.IndexBudgetError(
            f"index {name} grew to N={n:,} and needs {need:,} bytes ({ix.human_bytes(need)}), budget "
            f"{memory_budget_bytes:,} ({ix.human_bytes(memory_budget_bytes)}); rebuild with "
            f"`codeshard index build --memory-budget …` or use a shorter code")
    duplicates = int(n - len(np.unique(ci.ids)))
    if duplicates:
        log.warning("index %s: %d ids appear more than once across shards", name, duplicates)
    merge_s = time.perf_counter() - t0
    version = ix.claim_version(store, name, claim_after, build_id)
    try:
        sizes = ix.write_version_files(store, name, version, ci, trained_bytes)
    except BaseException:
        ix.discard_version(store, name, version)
        raise
    finally:
        if tmp is not None:
            tmp.cleanup()
    log.info("index %s: merged %d partials %s -> v%d, N=%d (%d removed) in %.2fs", name, len(partials),
             "on disk" if p.ondisk else "in memory", version, n, removed, merge_s)
    return {"version": version, "n": n, "removed": removed, "duplicates": duplicates, "merge_s": merge_s,
            "peak_rss_bytes": ix.peak_rss_bytes(), **sizes}


def _merge_on_disk(store: Store, p: ix.IndexPlan, bits: int, partials: list[dict[str, Any]],
                   trained_bytes: bytes | None, tmp: str) -> ix.CodeIndex:
    """The partials' lists merged into <tmp>/index.ivfdata (their files streamed to `tmp`, deleted
    after the merge), with the concatenated ids and parts, in partial order."""
    if trained_bytes is None:
        raise ix.IndexBuildError(f"{p.index_type} needs its trained coarse quantizer")
    paths, ids, parts = [], [], []
    for i, part in enumerate(x for x in partials if x["rows"]):
        paths.append(os.path.join(tmp, f"partial-{i}.faiss"))
        store.download_file(part["staging"] + ix.INDEX_FILE, paths[-1])
        a, b = ix.ids_from_bytes(store.read_bytes(part["staging"] + ix.IDS_FILE))
        ids.append(a)
        parts.append(b)
    index = ix.merge_ivf_on_disk(trained_bytes, paths, os.path.join(tmp, ix.IVFDATA_FILE))
    for path in paths:
        os.remove(path)
    ci = ix.CodeIndex(p, bits, index, np.concatenate(ids) if ids else np.zeros(0, np.int64),
                      np.concatenate(parts) if parts else np.zeros(0, np.int32))
    if ci.ntotal != len(ci.ids):
        raise ix.IndexBuildError(f"on-disk merge holds {ci.ntotal} items but the partials' ids {len(ci.ids)}")
    return ci


@task(name="evaluate_version", retries=2, retry_delay_seconds=exponential_backoff(1),
      retry_condition_fn=is_store_error)
def evaluate_version(settings: Settings, name: str, version: int, build_json: dict[str, Any],
                     eval_parts: list[int] | None = None, queries: int = ix.QUERIES, k: int = 10) -> dict[str, Any]:
    """Measure recall@k (tie-aware, against the coder's exact ranking) and p50/p99 latency with
    `queries` sampled database items (from `eval_parts` when given), then write build.json: the
    version is complete. `build_json` and the result are `BuildRecord.to_json()` forms (task
    parameters and results stay JSON). An exact index below EXACT_RECALL_GATE raises
    IndexBuildError (the flow discards the version). ADC queries need stored features: at most 4
    features shards are read."""
    log = logger()
    store = shared_store(settings)
    t0 = time.perf_counter()
    build = ix.BuildRecord.from_json(build_json)
    ci, _ = ix.load_version(store, name, version, build)
    coder, card = load_coder(store, build.coder_id)
    rng = np.random.default_rng(version)
    eligible = np.flatnonzero(np.isin(ci.parts, eval_parts)) if eval_parts else np.arange(ci.ntotal)
    if not len(eligible):
        eligible = np.arange(ci.ntotal)
    feats = None
    if ci.plan.kind == "adc":
        chosen = rng.permutation(np.unique(ci.parts[eligible]))[:MAX_EVAL_PARTS]
        eligible = eligible[np.isin(ci.parts[eligible], chosen)]
    positions = np.sort(rng.choice(eligible, min(queries, len(eligible)), replace=False))
    if ci.plan.kind == "adc":
        feats = _features_for(store, build, ci, positions)
    target = build.recall_target or ix.RECALL_TARGET
    ev = ix.evaluate(ci, coder, positions, feats, k=k, tune_target=None if ci.plan.exact else target, seed=version)
    ev["seconds"] = time.perf_counter() - t0
    recall = ev.get(f"recall_at_{k}")
    if ci.plan.exact and recall is not None and recall < ix.EXACT_RECALL_GATE:
        raise ix.IndexBuildError(f"index {name} v{version} ({ci.plan.index_type}) disagrees with the coder's "
                                 f"own ranking: recall@{k} = {recall:.4f} < {ix.EXACT_RECALL_GATE}; not published")
    full = dataclasses.replace(build, version=version, eval=ev)
    if "tuning" in ev:  # searchers take nprobe / efSearch from the plan in build.json
        key = "nprobe" if ci.plan.needs_training else "ef_search"
        full.plan = {**build.plan, key: ev["tuning"]["value"]}
    ix.write_build(store, name, version, full)
    log.info("index %s v%d: recall@%d %s, p50 %s ms, p99 %s ms", name, version, k, recall,
             ev.get("p50_ms"), ev.get("p99_ms"))
    return full.to_json()


def _features_for(store: Store, build: ix.BuildRecord, ci: ix.CodeIndex, positions: np.ndarray) -> np.ndarray | None:
    """Stored features (nq, D) of the items at `positions`, read from their features shards; None
    when the features are not in the store (the evaluation is then skipped)."""
    dataset, model_id = build.dataset, build.model_id
    if not model_id:
        return None
    want_ids, want_parts = ci.ids[positions], ci.parts[positions]
    out: dict[int, np.ndarray] = {}
    for part in np.unique(want_parts):
        key = layout.features_key(dataset, model_id, int(part))
        try:
            t = open_parquet(store, key).read(columns=["id", "feature"])
        except (StoreError, ShardInvalid) as e:
            logger().warning("evaluation: no features at %s (%s): skipped", key, e)
            return None
        fid = t.column("id").to_numpy()
        fx = features_matrix(t)
        row = {int(i): r for r, i in enumerate(fid)}
        for i in want_ids[want_parts == part]:
            if int(i) not in row:
                return None
            out[int(i)] = fx[row[int(i)]]
    return np.stack([out[int(i)] for i in want_ids])
