"""Retrieval metrics with exact tie handling, and the shared Hamming scorer.

Every metric here is *tie-aware*: items with equal score form a tied block, and the metric is its
expected value over a uniformly random order inside every tied block (McSherry & Najork, "Computing
information retrieval performance measures efficiently in the presence of tied scores", ECIR 2008).
Hamming distances are small integers, so ties are the common case for binary codes; ranking them by
argsort order would reward or punish a coder for the sort algorithm's whims.

Closed forms (exact, no approximation; derivation in `average_precision`): a ranking is summarised by
its tied blocks in descending score order, block b having `t_b` items of which `r_b` are relevant,
`s_b` items ranked strictly before it and `a_b` relevant items ranked strictly before it. Everything
below is a cumulative sum over blocks, so one sort per query (or one histogram, for integer scores)
gives AP@R, P@k and R@k together.

Conventions
- `scores` (nq, n): higher is more similar (pass `-hamming`, `-squared_l2`).
- `relevant` (nq, n) bool. In `mean_average_precision`, relevance is "same label".
- AP@R normaliser is `min(R, n_relevant)`; R=None means R = n (plain AP). A query with no relevant
  item has AP = P@k = R@k = 0 (and is counted in the mean; `mean_average_precision` logs how many).
- P@k divides by k (k clipped to n); R@k divides by the query's number of relevant items.

Cost: O(nq · n log n) for arbitrary float scores (one sort per row), O(nq · n) for integer-valued
scores spanning fewer than n values (histogram of each row; the Hamming case). Temporary memory is
about 32 bytes per (query, item) pair (the scores and relevance themselves included);
`mean_average_precision` bounds it by chunking queries.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import faiss
import numpy as np

LOG = logging.getLogger(__name__)

ScoreChunkFn = Callable[[slice], np.ndarray]
BlockMethod = Literal["auto", "sort", "histogram"]

# Bytes per (query, item) pair held while scoring one chunk (scores, relevance, histogram bins).
_BYTES_PER_PAIR = 32
_DEFAULT_CHUNK_BUDGET = 32 * 2**20  # small chunks stay cache-friendly: measured faster


# --------------------------------------------------------------------------------------------------
# Hamming scores (shared by every binary coder: lsh, pca-rr, itq, llc, ...)
# --------------------------------------------------------------------------------------------------

def hamming_scores(query_codes: np.ndarray, db_codes: np.ndarray) -> np.ndarray:
    """Minus the Hamming distance between packed binary codes, as similarity scores.

    Args:
        query_codes: (nq, B) uint8, packed bits (any bit order, as long as both sides agree; the
            project uses faiss's LSB-first layout).
        db_codes: (n, B) uint8, same B.

    Returns:
        (nq, n) float32, `-popcount(q XOR x)`: integer-valued, so ties are exact.

    Cost: O(nq · n · B / 8) word operations via `faiss.hammings` (OpenMP, 64-bit popcount), chosen
    over numpy `bitwise_count` and IndexBinaryFlat search with k=n (a heap over every item); figures
    in BENCHMARKS.md sections 2-4. Output memory is 4 · nq · n bytes; chunk queries for big sets.
    """
    q = np.ascontiguousarray(query_codes, dtype=np.uint8)
    x = np.ascontiguousarray(db_codes, dtype=np.uint8)
    if q.ndim != 2 or x.ndim != 2 or q.shape[1] != x.shape[1]:
        raise ValueError(f"hamming_scores: need (nq, B) and (n, B) uint8 codes with the same B, "
                         f"got {q.shape} and {x.shape}")
    nq, n, nbytes = q.shape[0], x.shape[0], q.shape[1]
    out = np.empty((nq, n), dtype=np.float32)
    if nq == 0 or n == 0:
        return out
    # faiss writes int32 distances; reuse one int32 buffer per query chunk to cap extra memory.
    step = max(1, min(nq, (64 * 2**20) // (4 * n)))
    buf = np.empty((step, n), dtype=np.int32)
    for i in range(0, nq, step):
        m = min(step, nq - i)
        faiss.hammings(faiss.swig_ptr(q[i:i + m]), faiss.swig_ptr(x), m, n, nbytes,
                       faiss.swig_ptr(buf))
        np.negative(buf[:m], out=out[i:i + m], casting="unsafe")
    return out


# --------------------------------------------------------------------------------------------------
# Tied blocks
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TieBlocks:
    """The tied blocks that hold at least one relevant item, for a batch of ranked queries.

    Blocks with no relevant item add nothing to AP@R, P@k or R@k, so only these are kept. All
    fields except `n`, `nq` and `total_rel` are 1-D int64 arrays with one entry per kept block, in
    descending score order within each query (`row`):
    - `before` (s): items of the query ranked strictly above the block;
    - `size` (t): items in the block; `rel` (r): relevant items in the block;
    - `rel_before` (a): relevant items ranked strictly above the block.
    `total_rel` (nq,) is each query's number of relevant items; `n` is the number of ranked items.
    """

    n: int
    nq: int
    row: np.ndarray
    before: np.ndarray
    size: np.ndarray
    rel: np.ndarray
    rel_before: np.ndarray
    total_rel: np.ndarray


def hamming_topk(query_codes: np.ndarray, db_codes: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k by Hamming distance: (scores = -distance float32, positions int64), (nq, k) each,
    nearest first. faiss's heap kernel (`knn_hamming`): no (nq, n) matrix, O(nq · n · B / 8)
    (speed: bench/search.py, BENCHMARKS.md section 4). Ties are broken by faiss, not tie-aware:
    use `hamming_scores` + the metrics for evaluation."""
    q = np.ascontiguousarray(query_codes, dtype=np.uint8)
    db = np.ascontiguousarray(db_codes, dtype=np.uint8)
    k = min(k, len(db))
    dist, idx = faiss.knn_hamming(q, db, k)
    return (-dist).astype(np.float32), idx.astype(np.int64)


def tie_blocks(scores: np.ndarray, relevant: np.ndarray,
               method: BlockMethod = "auto") -> TieBlocks:
    """Tied blocks of each query's ranking (descending score), restricted to blocks with a relevant item.

    Args:
        scores: (nq, n) float, finite; higher ranks first, equal scores are tied.
        relevant: (nq, n) bool.
        method: "sort" (any scores: per row, sort all scores and locate the relevant ones by binary
            search), "histogram" (integer-valued scores: count items per integer value), or "auto"
            (histogram when scores are integers spanning fewer than n values, else sort).

    Returns:
        `TieBlocks`.

    Cost: sort path O(nq · (n log n + n_rel log n)), ~1 ms per row of 70k on one core; histogram
    path O(nq · (n + span)) with ~16 B of temporaries per pair.
    """
    s = np.asarray(scores)
    rel = np.asarray(relevant, dtype=bool)
    if s.ndim != 2 or rel.shape != s.shape:
        raise ValueError(f"tie_blocks: scores and relevant must both be (nq, n), got {s.shape} and "
                         f"{rel.shape}")
    nq, n = s.shape
    if s.size == 0:
        e = np.zeros(0, dtype=np.int64)
        return TieBlocks(n, nq, e, e, e, e, e, np.zeros(nq, dtype=np.int64))
    lo, hi = float(s.min()), float(s.max())
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ValueError("tie_blocks: scores contain NaN or inf; replace them (e.g. with -1e30) "
                         "before computing metrics")
    if method == "auto":
        small_span = hi - lo < n and hi - lo < 2**24
        method = "histogram" if small_span and bool(np.all(s == np.floor(s))) else "sort"
    if method == "histogram":
        if hi - lo >= 2**24 or np.any(s != np.floor(s)):
            raise ValueError("tie_blocks(method='histogram') needs integer-valued scores spanning "
                             "fewer than 2**24 values; use method='sort'")
        return _blocks_by_histogram(s, rel, hi, lo)
    if method == "sort":
        return _blocks_by_sort(s, rel)
    raise ValueError(f"tie_blocks: method must be 'auto', 'sort' or 'histogram', got {method!r}")


def _blocks_by_histogram(s: np.ndarray, rel: np.ndarray, hi: float, lo: float) -> TieBlocks:
    nq, n = s.shape
    span = int(hi - lo) + 1
    # One bincount gives sizes and relevant counts: bin = ((row * span + rank_of_value) * 2 + rel),
    # rank_of_value 0 for the highest score so bin order is rank order. Fused in-place passes.
    bins = np.empty((nq, n), dtype=np.intp)
    np.subtract(hi, s, out=bins, casting="unsafe")
    bins += (np.arange(nq, dtype=np.intp) * span)[:, None]
    bins <<= 1
    bins |= rel
    counts = np.bincount(bins.ravel(), minlength=2 * nq * span).reshape(nq, span, 2)
    del bins
    n_rel = counts[:, :, 1]
    sizes = counts[:, :, 0] + n_rel
    before = np.cumsum(sizes, axis=1) - sizes
    rel_before = np.cumsum(n_rel, axis=1) - n_rel
    keep = n_rel > 0
    row = np.nonzero(keep)[0]
    return TieBlocks(n, nq, row.astype(np.int64), before[keep], sizes[keep], n_rel[keep],
                     rel_before[keep], n_rel.sum(axis=1))


def _blocks_by_sort(s: np.ndarray, rel: np.ndarray) -> TieBlocks:
    nq, n = s.shape
    parts: list[tuple[np.ndarray, ...]] = []
    total_rel = rel.sum(axis=1).astype(np.int64)
    for i in range(nq):
        if total_rel[i] == 0:
            continue
        ranked = np.sort(s[i])                      # ascending; only block bounds are needed
        vals, r = np.unique(s[i][rel[i]], return_counts=True)  # ascending distinct relevant scores
        left = np.searchsorted(ranked, vals, side="left")
        right = np.searchsorted(ranked, vals, side="right")
        r = r[::-1]
        rb = np.cumsum(r) - r
        parts.append((np.full(len(r), i, dtype=np.int64), (n - right)[::-1], (right - left)[::-1],
                      r, rb))
    if not parts:
        e = np.zeros(0, dtype=np.int64)
        return TieBlocks(n, nq, e, e, e, e, e, total_rel)
    row, before, size, r, rb = (np.concatenate(c).astype(np.int64) for c in zip(*parts))
    return TieBlocks(n, nq, row, before, size, r, rb, total_rel)


@functools.lru_cache(maxsize=4)
def _harmonic(n: int) -> np.ndarray:
    """H[0..n] in float64, H[k] = sum_{i<=k} 1/i (read-only; cached because every chunk needs it)."""
    h = np.zeros(n + 1, dtype=np.float64)
    np.cumsum(1.0 / np.arange(1, n + 1, dtype=np.float64), out=h[1:])
    h.flags.writeable = False
    return h


# --------------------------------------------------------------------------------------------------
# Metrics from blocks
# --------------------------------------------------------------------------------------------------

def ap_from_blocks(blocks: TieBlocks, R: int | None = None) -> np.ndarray:
    """Tie-aware AP@R (nq,) float64 from `tie_blocks` output; see `average_precision`. O(#blocks)."""
    n = blocks.n
    cut = n if R is None else min(int(R), n)
    if cut < 1:
        raise ValueError(f"R must be >= 1 or None, got {R}")
    s, t = blocks.before, blocks.size
    r = blocks.rel.astype(np.float64)
    m = np.clip(cut - s, 0, t)                                   # block slots inside the cut-off
    h = _harmonic(n)
    dh = h[s + m] - h[s]                                         # sum_{i=1..m} 1/(s+i)
    pair = np.divide(r - 1, t - 1, out=np.zeros_like(r), where=t > 1)
    # sum_{i=1..m} (i-1)/(s+i) = m - (s+1) * dh
    inner = (blocks.rel_before + 1) * dh + pair * (m - (s + 1) * dh)
    per_query = np.bincount(blocks.row, weights=r / t * inner, minlength=blocks.nq)
    norm = np.minimum(blocks.total_rel, cut)
    return np.divide(per_query, norm, out=np.zeros(blocks.nq), where=norm > 0)


def hits_from_blocks(blocks: TieBlocks, k: int) -> np.ndarray:
    """Expected number of relevant items in the top k (nq,) float64: a block straddling position k
    contributes r · (k - s) / t (hypergeometric mean). k > n is treated as n. O(#blocks)."""
    kk = _check_k(k, blocks.n)
    m = np.clip(kk - blocks.before, 0, blocks.size)
    return np.bincount(blocks.row, weights=blocks.rel * m / blocks.size, minlength=blocks.nq)


def _check_k(k: int, n: int) -> int:
    if int(k) < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return min(int(k), n)


def average_precision(scores: np.ndarray, relevant: np.ndarray, R: int | None = None) -> np.ndarray:
    """Tie-aware AP@R of each query: the exact expected AP over random orders inside tied blocks.

    Args:
        scores: (nq, n) float, higher = more similar; equal scores are ties.
        relevant: (nq, n) bool.
        R: cut-off (number of top positions scored); None means all n. R > n is treated as n.

    Returns:
        (nq,) float64 in [0, 1]. AP@R = (1 / min(R, n_rel)) · sum_{k<=R} rel(k) · P(k), with
        P(k) = (relevant in top k) / k; 0 for a query with no relevant item.

    Exactness, also across a tied block straddling the cut-off: for position k = s + i (i-th slot of
    a block of t items, r relevant, a relevant before it), over a random order within the block,
    E[rel(k) · #rel(1..k)] = (r/t) · (a + 1 + (i-1)(r-1)/(t-1)) (hypergeometric: given slot i is
    relevant, the other i-1 slots hold (i-1)(r-1)/(t-1) relevant on average). 1/k is fixed, so by
    linearity the expected truncated AP is the sum of these terms over k <= R, which collapses to
    harmonic-number differences per block. No approximation.

    Cost: see `tie_blocks` (one sort or histogram per row) + O(#blocks).
    """
    return ap_from_blocks(tie_blocks(scores, relevant), R)


def precision_at_k(scores: np.ndarray, relevant: np.ndarray, k: int) -> np.ndarray:
    """Tie-aware P@k: expected fraction of relevant items in the top k. (nq,) float64.

    A tied block straddling position k contributes r · (k - s) / t expected hits. k > n uses n.
    Cost: as `average_precision`.
    """
    kk = _check_k(k, np.shape(scores)[1])
    return hits_from_blocks(tie_blocks(scores, relevant), kk) / kk


def recall_at_k(scores: np.ndarray, relevant: np.ndarray, k: int) -> np.ndarray:
    """Tie-aware R@k: expected fraction of a query's relevant items found in the top k. (nq,) float64;
    0 for a query with no relevant item. k > n uses n. Cost: as `average_precision`."""
    blocks = tie_blocks(scores, relevant)
    total = blocks.total_rel
    return np.divide(hits_from_blocks(blocks, k), total, out=np.zeros(len(total)), where=total > 0)


# --------------------------------------------------------------------------------------------------
# Chunked driver
# --------------------------------------------------------------------------------------------------

def mean_average_precision(scores: np.ndarray | ScoreChunkFn, query_labels: np.ndarray,
                           db_labels: np.ndarray, R: int | None = None,
                           precision_ks: Sequence[int] = (100,), recall_ks: Sequence[int] = (),
                           chunk: int | None = None) -> dict[str, float]:
    """Mean tie-aware AP@R, P@k and R@k over queries, relevance = same label, in bounded memory.

    Args:
        scores: either the full (nq, n) score matrix, or a callable `score_chunk(q_slice)` returning
            the (len(q_slice), n) float32 scores of those queries (e.g.
            `lambda s: coder.scores(queries[s], codes)`), so the full matrix is never materialised.
        query_labels: (nq,) int labels of the queries.
        db_labels: (n,) int labels of the database items.
        R: AP cut-off; None = all n.
        precision_ks / recall_ks: report P@k / R@k for each k.
        chunk: queries per chunk; default sizes temporaries to ~32 MiB (~15 queries for n = 70k).

    Returns:
        {"map": mean AP@R, "p_at_<k>": mean P@k for each k, "r_at_<k>": mean R@k for each k}.
        Queries without any relevant item count as 0 (a warning says how many).

    Cost: O(nq · n) for integer scores (Hamming), O(nq · n log n) otherwise, plus the scorer's own
    cost (the integer path is the faster one).
    """
    ql = np.asarray(query_labels).ravel()
    dl = np.asarray(db_labels).ravel()
    nq, n = len(ql), len(dl)
    if nq == 0 or n == 0:
        raise ValueError(f"mean_average_precision: need at least one query and one database item, "
                         f"got {nq} queries and {n} items")
    if callable(scores):
        score_chunk: ScoreChunkFn = scores
    else:
        full = np.asarray(scores)
        if full.shape != (nq, n):
            raise ValueError(f"mean_average_precision: scores shape {full.shape} != (len(query_labels), "
                             f"len(db_labels)) = {(nq, n)}")
        score_chunk = lambda sl: full[sl]  # noqa: E731
    step = chunk or max(1, _DEFAULT_CHUNK_BUDGET // (_BYTES_PER_PAIR * n))
    ks_p = [_check_k(k, n) for k in precision_ks]
    ks_r = [_check_k(k, n) for k in recall_ks]
    ap_sum = 0.0
    p_sum = np.zeros(len(ks_p))
    r_sum = np.zeros(len(ks_r))
    no_rel = 0
    for i in range(0, nq, step):
        sl = slice(i, min(i + step, nq))
        s = np.asarray(score_chunk(sl))
        if s.shape != (sl.stop - sl.start, n):
            raise ValueError(f"score_chunk({sl}) returned shape {s.shape}, expected "
                             f"{(sl.stop - sl.start, n)}")
        rel = ql[sl, None] == dl[None, :]
        blocks = tie_blocks(s, rel)
        del s, rel
        total = blocks.total_rel
        no_rel += int((total == 0).sum())
        ap_sum += float(ap_from_blocks(blocks, R).sum())
        for j, k in enumerate(ks_p):
            p_sum[j] += float(hits_from_blocks(blocks, k).sum()) / k
        for j, k in enumerate(ks_r):
            hits = hits_from_blocks(blocks, k)
            r_sum[j] += float(np.divide(hits, total, out=np.zeros(len(total)), where=total > 0).sum())
    if no_rel:
        LOG.warning("mean_average_precision: %d of %d queries have no relevant item (scored 0)",
                    no_rel, nq)
    out = {"map": ap_sum / nq}
    out.update({f"p_at_{k}": float(v) / nq for k, v in zip(precision_ks, p_sum)})
    out.update({f"r_at_{k}": float(v) / nq for k, v in zip(recall_ks, r_sum)})
    return out


def tie_aware_recall(returned_scores: np.ndarray, kth_scores: np.ndarray, k: int,
                     rel_tol: float = 1e-4) -> float:
    """Recall@k of an approximate top-k against the exact ranking, counting ties as hits.

    `returned_scores` (nq, >= k): the exact score of each returned item (higher is better);
    `kth_scores` (nq,): the exact k-th best score per query. Returns the mean fraction of the k
    returned items whose score reaches the k-th best (minus rel_tol·max(1, |kth|) for float
    rounding): 1.0 means 'the exact top-k up to ties'. O(nq·k)."""
    kth = np.asarray(kth_scores)[:, None]
    tol = rel_tol * np.maximum(1.0, np.abs(kth))
    return float((np.asarray(returned_scores)[:, :k] >= kth - tol).sum(axis=1).mean() / k)
