"""Searching code indexes and measuring them: top-k in each index's own space, the coder's own
scores of returned items, recall@k against exact search on a fixed-size sample, latency, and the
build-time tuning of nprobe / efSearch to a recall target.

Cost of `evaluate` / `tune_search` is fixed, not O(N·queries) over a growing N in numpy: exact
types are checked on a sampled gallery (`GALLERY`), IVF / HNSW against faiss's exhaustive search
with `QUERIES` queries, latency on `LATENCY_QUERIES` queries.
"""
from __future__ import annotations

import threading
import time
from typing import Any

import faiss
import numpy as np

from encoders.coders import Coder
from encoders.metrics import hamming_scores, tie_aware_recall
from infra.code_index import (CodeIndex, add_codes, as_full_length, new_index, prepare_queries)
from infra.index_plan import (BINARY_FLAT, BINARY_IVF, CODER_LUT, EXACT_TYPES, FLAT, HNSW, IVF_FLAT, IVF_PQ,
                              IVF_RQ, IVF_TYPES, PQ_LUT, RECALL_TARGET, RQ_LUT, nprobe_candidates)

CODER_LUT_CHUNK_BYTES = 64 * 2**20  # score-matrix chunk of the coder-lut scan
QUERIES = 200          # queries of the publish-time check and of the nprobe tuning
GALLERY = 20_000       # items an exact type is checked against the coder's own ranking on
LATENCY_QUERIES = 100  # one at a time, one thread
_NPROBE_LOCK = threading.Lock()


def search_prepared(ci: CodeIndex, coder: Coder, q: np.ndarray, k: int, exhaustive: bool = False,
                    nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k for queries already in the index's space (`prepare_queries`): (scores (nq, k) float32,
    higher is better, positions (nq, k) int64, -1 where fewer than k items). `exhaustive` visits
    every IVF list (exact for IVF types; HNSW searches its flat storage); `nprobe` overrides the
    tuned nprobe (IVF) or efSearch (HNSW) for this call only (faiss SearchParameters, thread-safe)."""
    t = ci.plan.index_type
    k = max(1, int(k))
    if t == CODER_LUT:
        return _coder_lut_search(ci, coder, q, k)
    if exhaustive and t in IVF_TYPES:
        old = ci.index.nprobe
        ci.index.nprobe = ci.plan.nlist
        try:
            d, i = ci.index.search(q, k)
        finally:
            ci.index.nprobe = old
    elif exhaustive and t == HNSW:
        d, i = faiss.downcast_index(ci.index.storage).search(q, k)
    elif nprobe and t in IVF_TYPES:
        params = (faiss.SearchParametersIVF(nprobe=int(nprobe)) if not ci.plan.binary_storage else None)
        if params is None:  # IndexBinaryIVF takes no SearchParameters: set and restore under a lock
            with _NPROBE_LOCK:
                old = ci.index.nprobe
                ci.index.nprobe = int(nprobe)
                try:
                    d, i = ci.index.search(q, k)
                finally:
                    ci.index.nprobe = old
        else:
            d, i = ci.index.search(q, k, params=params)
    elif nprobe and t == HNSW and isinstance(ci.index, faiss.IndexHNSW):
        d, i = ci.index.search(q, k, params=faiss.SearchParametersHNSW(efSearch=int(nprobe)))
    else:
        d, i = ci.index.search(q, k)
    ip = isinstance(ci.index, faiss.Index) and ci.index.metric_type == faiss.METRIC_INNER_PRODUCT
    scores = d.astype(np.float32) if ip else -d.astype(np.float32)
    i = i.astype(np.int64)
    scores[i < 0] = -np.inf
    return scores, i


def _coder_lut_search(ci: CodeIndex, coder: Coder, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k with `coder.scores` over the stored codes in chunks (memory nq · chunk · 4 bytes),
    keeping a running top-k; ties broken by lower position."""
    codes = ci.codes()
    n, nq = len(codes), len(q)
    chunk = max(1024, CODER_LUT_CHUNK_BYTES // (4 * max(1, nq)))
    best_s = np.full((nq, 0), -np.inf, dtype=np.float32)
    best_i = np.zeros((nq, 0), dtype=np.int64)
    for start in range(0, n, chunk):
        s = coder.scores(q, as_full_length(coder, codes[start:start + chunk], ci.bits), ci.bits)
        s = s.astype(np.float32, copy=False)
        kk = min(k, s.shape[1])
        part = np.argpartition(-s, kk - 1, axis=1)[:, :kk] if kk < s.shape[1] else \
            np.tile(np.arange(s.shape[1]), (nq, 1))
        cs = np.concatenate([best_s, np.take_along_axis(s, part, axis=1)], axis=1)
        ci_ = np.concatenate([best_i, part.astype(np.int64) + start], axis=1)
        order = np.lexsort((ci_, -cs), axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(cs, order, axis=1), np.take_along_axis(ci_, order, axis=1)
    if best_s.shape[1] < k:
        pad = k - best_s.shape[1]
        best_s = np.pad(best_s, ((0, 0), (0, pad)), constant_values=-np.inf)
        best_i = np.pad(best_i, ((0, 0), (0, pad)), constant_values=-1)
    return best_s, best_i


def reference_scores(ci: CodeIndex, coder: Coder, q: np.ndarray, positions: np.ndarray,
                     q_features: np.ndarray | None = None) -> np.ndarray:
    """The coder's own score of each query against the codes at `positions` (nq, k) (-inf at -1):
    Hamming for binary codes, coder.scores for ADC (needs the float `q_features`), -L2 for float.
    Cost: one score per (query, returned item); ADC scores every query against the union of the
    returned items in one call (nq x |union| floats)."""
    t = ci.plan.index_type
    out = np.full(positions.shape, -np.inf, dtype=np.float32)
    ok = positions >= 0
    if not ok.any():
        return out
    uniq, inv = np.unique(positions[ok], return_inverse=True)
    rows = np.nonzero(ok)[0]
    if t in (IVF_PQ, IVF_RQ):
        raise ValueError(f"{t}: the scores it returns are already the exact ADC scores of its items")
    if t in (PQ_LUT, RQ_LUT, CODER_LUT):
        s = coder.scores(q_features, as_full_length(coder, ci.codes()[uniq], ci.bits), ci.bits)
        out[ok] = s[rows, inv]
    elif t in (BINARY_FLAT, BINARY_IVF):
        codes = stored_codes_at(ci, uniq)[inv]
        out[ok] = -np.unpackbits(np.bitwise_xor(codes, q[rows]), axis=1).sum(axis=1)
    else:
        vecs = stored_vectors_at(ci, uniq)[inv].astype(np.float64)
        out[ok] = -((vecs - q[rows]) ** 2).sum(axis=1)
    return out


def stored_codes_at(ci: CodeIndex, pos: np.ndarray) -> np.ndarray:
    """(len(pos), B) uint8 codes stored at `pos` of a binary index (IVF: via a temporary direct map,
    8 bytes per item while it exists)."""
    if ci.plan.index_type in (BINARY_FLAT, CODER_LUT):
        return ci.codes()[pos]
    return _reconstruct_ivf(ci.index, pos)


def stored_vectors_at(ci: CodeIndex, pos: np.ndarray) -> np.ndarray:
    """(len(pos), D) float32 vectors stored at `pos` of a float index (flat, IVF-Flat, HNSW)."""
    if ci.plan.index_type == IVF_FLAT:
        return _reconstruct_ivf(ci.index, pos)
    return np.stack([ci.index.reconstruct(int(p)) for p in pos])


_DIRECT_MAP_LOCK = threading.Lock()


def _reconstruct_ivf(idx: Any, pos: np.ndarray) -> np.ndarray:
    with _DIRECT_MAP_LOCK:  # the direct map is index state: one builder at a time
        idx.make_direct_map()
        try:
            return np.stack([idx.reconstruct(int(p)) for p in pos])
        finally:
            idx.set_direct_map_type(faiss.DirectMap.NoMap)


# ---------------------------------------------------------------------------------------------
# Evaluation and tuning, at a fixed cost
# ---------------------------------------------------------------------------------------------
def query_vectors(ci: CodeIndex, coder: Coder, positions: np.ndarray,
                  features: np.ndarray | None) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(queries in the index's space, raw float features or None) for database items at `positions`:
    binary and float indexes use their stored codes / vectors (what encoding the features gives);
    ADC indexes their `features`, or, for IVF-PQ / IVF-RQ without features, the items' decoded codes.
    (None, None) when an exact ADC index has no features to query with."""
    t = ci.plan.index_type
    if t in (BINARY_FLAT, BINARY_IVF):
        return stored_codes_at(ci, positions), None
    if t in (FLAT, IVF_FLAT, HNSW):
        return stored_vectors_at(ci, positions).astype(np.float32), None
    if features is not None:
        raw = np.ascontiguousarray(features, dtype=np.float32)
        return prepare_queries(ci.plan, coder, ci.bits, raw), raw
    if t in (IVF_PQ, IVF_RQ):
        return np.ascontiguousarray(_reconstruct_ivf(ci.index, positions), dtype=np.float32), None
    return None, None


def evaluate(ci: CodeIndex, coder: Coder, positions: np.ndarray, features: np.ndarray | None, k: int = 10,
             latency_queries: int = LATENCY_QUERIES, gallery: int = GALLERY,
             tune_target: float | None = None, seed: int = 0) -> dict[str, Any]:
    """Recall@k and latency of `ci` with database items at `positions` as queries, at a fixed cost.

    Exact types: the index's engine must rank like the coder itself; checked on a gallery of
    `gallery` stored codes (the query items + a seeded sample): the engine's top-k over the gallery
    vs the coder's own exact scores (Hamming / coder.scores / L2). O(queries·gallery), whatever N.
    IVF / HNSW: top-k at the plan's nprobe / efSearch vs faiss's exhaustive search over all N
    (their scores are the exact ones in the index's metric). With `tune_target`, first the smallest
    nprobe (efSearch) reaching recall@k >= target is found and set (`tune_search`).
    Latency: one query at a time, one faiss thread, first `latency_queries` queries, p50/p99 in ms.
    """
    nq = len(positions)
    if nq == 0:
        return {"queries": 0}
    kk = min(k, ci.ntotal)
    q, raw = query_vectors(ci, coder, positions, features)
    if q is None:
        return {"queries": 0, "skipped": "no stored features for the sampled items"}
    out: dict[str, Any] = {"queries": int(nq), "k": int(kk)}
    t = ci.plan.index_type
    if t in EXACT_TYPES:
        g, sub = _gallery(ci, coder, positions, gallery, seed)
        gq = q  # the query items are in the gallery
        kg = min(kk, sub.ntotal)
        kth = _exact_kth(sub, coder, gq, raw, kg)
        _, pos = search_prepared(sub, coder, gq, kg)
        recall = tie_aware_recall(reference_scores(sub, coder, gq, pos, raw), kth, kg)
        out["gallery"] = int(len(g))
    else:
        ex_s, _ = search_prepared(ci, coder, q, kk, exhaustive=True)
        kth = ex_s[:, kk - 1]
        if tune_target is not None:
            out["tuning"] = tune_search(ci, coder, q, kth, kk, tune_target)
        s, _ = search_prepared(ci, coder, q, kk)
        recall = tie_aware_recall(s, kth, kk)
        out["nprobe" if t in IVF_TYPES else "ef_search"] = int(
            ci.index.nprobe if t in IVF_TYPES else ci.index.hnsw.efSearch)
    out[f"recall_at_{k}"] = round(recall, 5)
    out.update(latency(ci, coder, raw if raw is not None else q, raw is not None, kk, latency_queries))
    out["query_source"] = "features" if raw is not None else "stored codes"
    return out


def _gallery(ci: CodeIndex, coder: Coder, positions: np.ndarray, size: int, seed: int) -> tuple[np.ndarray, CodeIndex]:
    """A flat index of the same type over the query items + a seeded sample of stored codes, in
    which the query items come first (so query r is gallery item r when the positions are distinct)."""
    rng = np.random.default_rng(seed)
    extra = max(0, min(size, ci.ntotal) - len(positions))
    pick = rng.choice(ci.ntotal, min(ci.ntotal, extra + len(positions)), replace=False)
    rest = pick[~np.isin(pick, positions)][:extra]
    g = np.concatenate([positions, np.sort(rest)]).astype(np.int64)
    if len(g) == ci.ntotal and np.array_equal(np.sort(g), np.arange(ci.ntotal)):
        return g, ci
    codes = ci.codes()[g]
    idx = new_index(ci.plan, coder, ci.bits)
    add_codes(idx, ci.plan, coder, ci.bits, codes if ci.plan.index_type == FLAT else
              as_full_length(coder, codes, ci.bits))
    return g, CodeIndex(ci.plan, ci.bits, idx, ci.ids[g], ci.parts[g])


def tune_search(ci: CodeIndex, coder: Coder, q: np.ndarray, kth: np.ndarray, k: int,
                target: float = RECALL_TARGET) -> dict[str, Any]:
    """Set the smallest nprobe (IVF) or efSearch (HNSW) whose recall@k against the exact k-th scores
    `kth` reaches `target` (the largest tried if none does). Returns {param, value, recall, tried}."""
    t = ci.plan.index_type
    if t in IVF_TYPES:
        name, values = "nprobe", nprobe_candidates(ci.plan.nlist)
    else:
        name, values = "ef_search", [16, 32, 64, 128, 256, 512, 1024]
    tried: dict[str, float] = {}
    best = values[-1]
    for v in values:
        s, _ = search_prepared(ci, coder, q, k, nprobe=v)
        tried[str(v)] = round(tie_aware_recall(s, kth, k), 5)
        if tried[str(v)] >= target:
            best = v
            break
    if t in IVF_TYPES:
        ci.index.nprobe = best
    else:
        ci.index.hnsw.efSearch = best
    return {"param": name, "value": int(best), "target": target, "recall": tried[str(best)], "tried": tried,
            "queries": int(len(q))}


def latency(ci: CodeIndex, coder: Coder, src: np.ndarray, raw: bool, k: int, n: int) -> dict[str, Any]:
    """p50/p99 ms per query, one query at a time on one faiss thread (OpenMP barriers on a shared
    machine add 10-40x noise), including the query's preparation when `raw` (float features)."""
    lat = []
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        for r in range(min(n, len(src))):
            t0 = time.perf_counter()
            qq = prepare_queries(ci.plan, coder, ci.bits, src[r:r + 1]) if raw else src[r:r + 1]
            search_prepared(ci, coder, qq, k)
            lat.append((time.perf_counter() - t0) * 1e3)
    finally:
        faiss.omp_set_num_threads(threads)
    return {"p50_ms": round(float(np.percentile(lat, 50)), 4), "p99_ms": round(float(np.percentile(lat, 99)), 4),
            "latency_threads": 1, "latency_queries": len(lat)}


def _exact_kth(ci: CodeIndex, coder: Coder, q: np.ndarray, raw: np.ndarray | None, k: int) -> np.ndarray:
    """k-th best exact score per query by the coder's own scoring over every stored code of `ci`."""
    codes = ci.codes()
    t = ci.plan.index_type
    full = as_full_length(coder, codes, ci.bits) if t not in (BINARY_FLAT, FLAT) else codes
    out = np.empty(len(q), dtype=np.float32)
    step = max(1, CODER_LUT_CHUNK_BYTES // (4 * max(1, len(codes))))
    for i in range(0, len(q), step):
        if t == BINARY_FLAT:
            s = hamming_scores(q[i:i + step], codes)
        elif t == FLAT:
            s = coder.scores(q[i:i + step], codes, ci.bits)
        else:
            s = coder.scores(raw[i:i + step], full, ci.bits)
        out[i:i + step] = -np.partition(-s, k - 1, axis=1)[:, k - 1]
    return out
