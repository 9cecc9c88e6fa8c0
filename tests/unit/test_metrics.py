"""encoders/metrics.py: tie-aware AP@R, P@k, R@k against brute-force enumeration; Hamming scores;
the chunked mAP driver at full evaluation size."""
from __future__ import annotations

import itertools
import math

import faiss
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from encoders.metrics import (ap_from_blocks, average_precision, hamming_scores,
                              mean_average_precision, precision_at_k, recall_at_k, tie_blocks)

# ---------------------------------------------------------------------------------------------
# Slow references: enumerate every order of every tied block, average the plain metric.
# ---------------------------------------------------------------------------------------------


def _plain_ap(rel_in_order: list[bool], R: int | None) -> float:
    n = len(rel_in_order)
    cut = n if R is None else min(R, n)
    n_rel = sum(rel_in_order)
    if n_rel == 0:
        return 0.0
    hits, total = 0, 0.0
    for k in range(cut):
        if rel_in_order[k]:
            hits += 1
            total += hits / (k + 1)
    return total / min(cut, n_rel)


def _plain_hits(rel_in_order: list[bool], k: int) -> float:
    return float(sum(rel_in_order[:k]))


def _all_orders(scores: list[float]) -> list[list[int]]:
    """Every ranking consistent with the scores: blocks by descending score, any order inside."""
    blocks = [[i for i, s in enumerate(scores) if s == v] for v in sorted(set(scores), reverse=True)]
    return [[i for p in perms for i in p]
            for perms in itertools.product(*(itertools.permutations(b) for b in blocks))]


def _expected(scores: list[float], rel: list[bool], metric) -> float:
    orders = _all_orders(scores)
    return float(np.mean([metric([rel[i] for i in o]) for o in orders]))


# Tiny rankings with many ties; at most 7 items so the enumeration has <= 5040 orders.
_rows = st.integers(1, 7).flatmap(lambda n: st.tuples(
    st.lists(st.integers(0, 3), min_size=n, max_size=n),
    st.lists(st.booleans(), min_size=n, max_size=n)))
_batch = st.integers(1, 7).flatmap(lambda n: st.lists(st.tuples(
    st.lists(st.integers(0, 3), min_size=n, max_size=n),
    st.lists(st.booleans(), min_size=n, max_size=n)), min_size=1, max_size=3))
_cutoff = st.one_of(st.none(), st.integers(1, 9))


def _arrays(batch, scale: float = 1.0):
    scores = np.array([r[0] for r in batch], dtype=np.float32) * np.float32(scale)
    rel = np.array([r[1] for r in batch], dtype=bool)
    return scores, rel


@settings(max_examples=150, deadline=None)
@given(batch=_batch, R=_cutoff)
def test_ap_matches_enumeration_with_ties(batch, R):
    scores, rel = _arrays(batch)
    got = average_precision(scores, rel, R)
    want = [_expected(list(s), list(r), lambda o: _plain_ap(o, R)) for s, r in zip(scores, rel)]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    # Both block builders agree (integer scores take the histogram path under "auto").
    for method in ("sort", "histogram"):
        np.testing.assert_allclose(ap_from_blocks(tie_blocks(scores, rel, method), R), want,
                                   rtol=0, atol=1e-12)


@settings(max_examples=80, deadline=None)
@given(batch=_batch, R=_cutoff)
def test_ap_non_integer_ties_take_sort_path(batch, R):
    scores, rel = _arrays(batch, scale=0.37)  # ties remain, scores are not integers
    want = [_expected(list(s), list(r), lambda o: _plain_ap(o, R)) for s, r in zip(scores, rel)]
    np.testing.assert_allclose(average_precision(scores, rel, R), want, rtol=0, atol=1e-12)


@settings(max_examples=150, deadline=None)
@given(row=_rows, k=st.integers(1, 9))
def test_precision_recall_match_enumeration(row, k):
    s, r = row
    scores, rel = np.array([s], dtype=np.float32), np.array([r], dtype=bool)
    kk = min(k, len(s))
    hits = _expected(s, r, lambda o: _plain_hits(o, kk))
    assert precision_at_k(scores, rel, k)[0] == pytest.approx(hits / kk, abs=1e-12)
    want_recall = hits / sum(r) if any(r) else 0.0
    assert recall_at_k(scores, rel, k)[0] == pytest.approx(want_recall, abs=1e-12)


@settings(max_examples=50, deadline=None)
@given(n=st.integers(1, 200), R=_cutoff, seed=st.integers(0, 2**31 - 1))
def test_ap_without_ties_equals_plain_ap(n, R, seed):
    rng = np.random.default_rng(seed)
    scores = rng.permutation(n).astype(np.float64)[None] + 0.5  # distinct, non-integer
    rel = rng.random((1, n)) < 0.3
    order = np.argsort(-scores[0])
    assert average_precision(scores, rel, R)[0] == pytest.approx(
        _plain_ap(list(rel[0][order]), R), abs=1e-12)


def test_hand_computed_straddling_tie():
    # 4 tied items, 1 relevant, cut-off 1: P(relevant first) = 1/4, AP@1 = 1/4.
    assert average_precision(np.zeros((1, 4)), np.array([[True, False, False, False]]), R=1)[0] \
        == pytest.approx(0.25)
    # Perfect and reversed rankings.
    rel = np.array([[True, True, False, False]])
    assert average_precision(np.array([[4.0, 3.0, 2.0, 1.0]]), rel)[0] == pytest.approx(1.0)
    assert average_precision(np.array([[1.0, 2.0, 3.0, 4.0]]), rel)[0] == pytest.approx(
        (1 / 3 + 2 / 4) / 2)


def test_query_without_relevant_scores_zero():
    scores = np.arange(6, dtype=np.float32).reshape(2, 3)
    rel = np.array([[False, False, False], [True, False, False]])
    assert average_precision(scores, rel)[0] == 0.0
    assert recall_at_k(scores, rel, 2)[0] == 0.0
    assert precision_at_k(scores, rel, 2)[0] == 0.0


def test_bad_inputs_raise():
    rel = np.ones((1, 3), dtype=bool)
    with pytest.raises(ValueError, match="NaN"):
        average_precision(np.array([[1.0, np.nan, 0.0]]), rel)
    with pytest.raises(ValueError, match="R must be"):
        average_precision(np.zeros((1, 3)), rel, R=0)
    with pytest.raises(ValueError, match="k must be"):
        precision_at_k(np.zeros((1, 3)), rel, 0)
    with pytest.raises(ValueError, match="integer"):
        tie_blocks(np.array([[0.5, 1.0, 2.0]]), rel, method="histogram")
    with pytest.raises(ValueError, match="shape"):
        mean_average_precision(np.zeros((2, 3)), np.zeros(2), np.zeros(4))


# ---------------------------------------------------------------------------------------------
# Sanity at scale
# ---------------------------------------------------------------------------------------------

def _balanced_labels(n: int, classes: int, rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(np.arange(n) % classes)


def test_random_scores_give_chance_map():
    rng = np.random.default_rng(0)
    db = _balanced_labels(10_000, 10, rng)
    q = _balanced_labels(100, 10, rng)
    rand = mean_average_precision(lambda sl: rng.random((sl.stop - sl.start, 10_000),
                                                        dtype=np.float32), q, db)
    assert abs(rand["map"] - 0.1) < 0.02
    assert abs(rand["p_at_100"] - 0.1) < 0.02
    # A constant scorer ties everything: its tie-aware AP is the expectation over random orders.
    const = mean_average_precision(np.zeros((100, 10_000), dtype=np.float32), q, db,
                                   recall_ks=(1000,))
    assert abs(const["map"] - 0.1) < 0.02
    assert const["p_at_100"] == pytest.approx(0.1)
    assert const["r_at_1000"] == pytest.approx(0.1)


def test_chunked_driver_equals_per_query_mean():
    rng = np.random.default_rng(1)
    db, q = rng.integers(0, 5, 500), rng.integers(0, 5, 23)
    scores = -rng.integers(0, 9, (23, 500)).astype(np.float32)  # heavy ties, like Hamming
    rel = q[:, None] == db[None]
    for R in (None, 50):
        want = average_precision(scores, rel, R).mean()
        full = mean_average_precision(scores, q, db, R=R, precision_ks=(10, 100),
                                      recall_ks=(100,))
        chunked = mean_average_precision(lambda sl: scores[sl], q, db, R=R,
                                         precision_ks=(10, 100), recall_ks=(100,), chunk=4)
        assert full["map"] == pytest.approx(want, abs=1e-12)
        assert chunked == pytest.approx(full, abs=1e-12)
        assert full["p_at_10"] == pytest.approx(precision_at_k(scores, rel, 10).mean(), abs=1e-12)
        assert full["r_at_100"] == pytest.approx(recall_at_k(scores, rel, 100).mean(), abs=1e-12)


def test_full_size_hamming_evaluation_runs_chunked():
    """1000 queries x 70000 items x 64 bits, the evaluation size; no timing assertion."""
    rng = np.random.default_rng(2)
    qc = rng.integers(0, 256, (1000, 8), dtype=np.uint8)
    dbc = rng.integers(0, 256, (70_000, 8), dtype=np.uint8)
    out = mean_average_precision(lambda sl: hamming_scores(qc[sl], dbc),
                                 rng.integers(0, 10, 1000), rng.integers(0, 10, 70_000),
                                 recall_ks=(100,))
    assert set(out) == {"map", "p_at_100", "r_at_100"}
    assert all(0.0 <= v <= 1.0 for v in out.values())
    assert abs(out["map"] - 0.1) < 0.01  # random codes carry no label information


# ---------------------------------------------------------------------------------------------
# Hamming scores
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("nbytes", [1, 2, 3, 4, 8, 16])
def test_hamming_scores_match_popcount_and_faiss_binary_index(nbytes):
    rng = np.random.default_rng(nbytes)
    q = rng.integers(0, 256, (7, nbytes), dtype=np.uint8)
    x = rng.integers(0, 256, (300, nbytes), dtype=np.uint8)
    s = hamming_scores(q, x)
    assert s.dtype == np.float32 and s.shape == (7, 300)
    ref = np.unpackbits(q[:, None, :] ^ x[None], axis=2).sum(axis=2, dtype=np.int64)
    np.testing.assert_array_equal(s, -ref)
    index = faiss.IndexBinaryFlat(8 * nbytes)
    index.add(x)
    dist, ids = index.search(q, 300)
    np.testing.assert_array_equal(np.take_along_axis(-s, ids, axis=1), dist)


def test_hamming_scores_rejects_mismatched_codes():
    with pytest.raises(ValueError, match="same B"):
        hamming_scores(np.zeros((2, 2), np.uint8), np.zeros((3, 4), np.uint8))
    assert hamming_scores(np.zeros((0, 2), np.uint8), np.zeros((3, 2), np.uint8)).shape == (0, 3)
    assert math.isclose(hamming_scores(np.full((1, 1), 255, np.uint8),
                                       np.zeros((1, 1), np.uint8))[0, 0], -8)
