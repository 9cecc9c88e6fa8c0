"""encoders/baselines.py (sign_coders, pq_coders, float_coder, faiss_codes): mechanics of the
training-free coders on synthetic data (shapes, bytes,
determinism, state round trip, exact ADC, faiss binary layout) and one quality ordering (ITQ >= LSH)."""
from __future__ import annotations

import dataclasses
import inspect
import io
from typing import Any

import faiss
import numpy as np
import pytest
import torch

from encoders.baselines import adc_scores, pack_signs
from encoders.coders import CODERS, Coder, coder_from_state, make_coder
from encoders.metrics import mean_average_precision
from tests.synthetic import SyntheticDataset

METHODS = ["lsh", "pca-rr", "itq", "pq", "opq", "float"]
BINARY = ["lsh", "pca-rr", "itq"]
ADC = ["pq", "opq"]
# Small iteration counts keep the suite fast; the mechanics do not depend on them.
FAST = {"itq": {"iters": 10}, "pq": {"niter": 8}, "opq": {"niter": 8, "opq_iters": 4}}


pytestmark = pytest.mark.usefixtures("one_faiss_thread")


@pytest.fixture(scope="module")
def data() -> SyntheticDataset:
    return SyntheticDataset()


def _make(method: str, **config: Any) -> Coder:
    # Straight from the registry filled by importing encoders.baselines: make_coder() would also
    # import the other coder modules, which these tests do not cover.
    return CODERS[method](**config)


def _fit(method: str, data: SyntheticDataset, bits: int = 16, **extra: Any) -> Coder:
    coder = _make(method, bits=bits, **{**FAST.get(method, {}), **extra})
    coder.fit(*data.split("train"))
    return coder


@pytest.fixture(scope="module")
def fitted(data) -> dict[str, Coder]:
    return {m: _fit(m, data) for m in METHODS}


def _round_trip(state: dict[str, Any]) -> dict[str, Any]:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _leaves(obj: Any):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _leaves(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _leaves(v)
    else:
        yield obj


# ---------------------------------------------------------------------------------------------
# Protocol and registry
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_registered_and_fit_never_sees_queries(method):
    cls = CODERS[method]
    assert cls.method == method
    params = list(inspect.signature(cls.fit).parameters)
    assert params == ["self", "train", "labels", "val"]
    assert not any("query" in p or "queries" in p for p in params)


@pytest.mark.parametrize("method", METHODS)
def test_config_is_a_documented_dataclass(method):
    coder = _make(method, bits=16)
    assert dataclasses.is_dataclass(coder.config)
    doc = type(coder.config).__doc__ or ""
    assert "Bytes per item" in doc or "bytes per item" in doc
    assert "Fit cost" in doc or "fit cost" in doc.lower()
    assert coder.config_dict()["bits"] == 16


# ---------------------------------------------------------------------------------------------
# Mechanics
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_shapes_dtypes_and_bytes(method, fitted, data):
    coder = fitted[method]
    xb, _ = data.split("database")
    xq, _ = data.split("query")
    codes = coder.encode(xb)
    expected_bytes = 4 * data.d if method == "float" else 2
    assert coder.bytes_per_item() == expected_bytes
    assert coder.lengths == ((32 * data.d,) if method == "float" else (16,))
    assert codes.shape == (data.nb, expected_bytes) and codes.dtype == np.uint8
    s = coder.scores(xq, codes)
    assert s.shape == (data.nq, data.nb) and s.dtype == np.float32
    assert coder.symmetric == (method in BINARY)
    if coder.symmetric:  # minus Hamming distance: integers in [-bits, 0]
        assert np.array_equal(s, np.round(s)) and s.min() >= -16 and s.max() <= 0
    top_s, top_i = coder.search(xq, codes, k=5)
    np.testing.assert_array_equal(top_s[:, 0], s.max(axis=1))
    assert top_i.shape == (data.nq, 5)


@pytest.mark.parametrize("method", METHODS)
def test_refit_is_deterministic(method, fitted, data):
    xb, _ = data.split("database")
    again = _fit(method, data)
    np.testing.assert_array_equal(again.encode(xb), fitted[method].encode(xb))


@pytest.mark.parametrize("method", BINARY)
def test_seed_changes_binary_codes(method, data):
    xb, _ = data.split("database")
    a, b = _fit(method, data, seed=1), _fit(method, data, seed=2)
    assert not np.array_equal(a.encode(xb), b.encode(xb))


@pytest.mark.parametrize("method", METHODS)
def test_state_round_trip_through_torch_is_bit_identical(method, fitted, data):
    coder = fitted[method]
    state = coder.state()
    assert state["method"] == method
    # Only what torch.load(weights_only=True) accepts: tensors, numbers, strings, None.
    assert all(isinstance(v, (torch.Tensor, int, float, str, bool, type(None)))
               for v in _leaves(state))
    rebuilt = CODERS[method].from_state(_round_trip(state))
    assert type(rebuilt) is type(coder) and rebuilt.config == coder.config
    xb, _ = data.split("database")
    xq, _ = data.split("query")
    codes = coder.encode(xb)
    np.testing.assert_array_equal(rebuilt.encode(xb), codes)
    np.testing.assert_array_equal(rebuilt.scores(xq, codes), coder.scores(xq, codes))
    # A second round trip reproduces the serialised bytes exactly.
    again = rebuilt.state()
    for a, b in zip(_leaves(state), _leaves(again)):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)
        else:
            assert a == b


def test_registry_functions_build_baselines(fitted, data):
    coder = make_coder("itq", bits=16, iters=10)
    assert type(coder) is type(fitted["itq"])
    xb, _ = data.split("database")
    rebuilt = coder_from_state(_round_trip(fitted["pq"].state()))
    np.testing.assert_array_equal(rebuilt.encode(xb), fitted["pq"].encode(xb))


def test_from_state_refuses_other_method(fitted):
    with pytest.raises(ValueError, match="state is for method"):
        type(fitted["itq"]).from_state(fitted["lsh"].state())


# ---------------------------------------------------------------------------------------------
# Binary layout and Hamming search
# ---------------------------------------------------------------------------------------------

def test_pack_signs_matches_faiss_lsh_layout():
    y = np.random.default_rng(3).standard_normal((50, 24)).astype(np.float32)
    lsh = faiss.IndexLSH(24, 24, False, False)  # no rotation, zero thresholds: codes = signs of y
    lsh.add(y)
    np.testing.assert_array_equal(pack_signs(y), faiss.vector_to_array(lsh.codes).reshape(50, 3))
    # bit j lives in byte j // 8 at position j % 8 (LSB first)
    one = np.zeros((1, 24), np.float32)
    one[0, 10] = 1.0
    np.testing.assert_array_equal(pack_signs(one), [[0, 1 << 2, 0]])


@pytest.mark.parametrize("method", BINARY)
def test_hamming_scores_agree_with_index_binary_flat(method, fitted, data):
    coder = fitted[method]
    xb, _ = data.split("database")
    xq, _ = data.split("query")
    codes = coder.encode(xb)
    index = faiss.IndexBinaryFlat(coder.full_bits)
    index.add(codes)
    dist, ids = index.search(coder.encode(xq), 50)
    np.testing.assert_array_equal(np.take_along_axis(-coder.scores(xq, codes), ids, axis=1), dist)


def test_itq_beats_lsh_on_clustered_data(data):
    xb, lb = data.split("database")
    xq, lq = data.split("query")
    for bits in (8, 16, 32):
        maps = {}
        for method in ("lsh", "itq"):
            coder = _fit(method, data, bits=bits)
            maps[method] = mean_average_precision(coder.scores(xq, coder.encode(xb)), lq, lb)["map"]
        assert maps["itq"] >= maps["lsh"], (bits, maps)


# ---------------------------------------------------------------------------------------------
# Asymmetric distance
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ADC)
def test_adc_scores_equal_reconstruction_distances(method, fitted, data):
    coder = fitted[method]
    xb, _ = data.split("database")
    xq, _ = data.split("query")
    codes = coder.encode(xb)
    s = coder.scores(xq, codes)
    recon = coder.pq.decode(codes)  # in the quantizer's (rotated) space
    q = coder.to_pq_space(xq)
    brute = ((q[:, None, :].astype(np.float64) - recon[None]) ** 2).sum(-1)
    np.testing.assert_allclose(-s, brute, rtol=1e-6, atol=1e-5)
    # Same distances as faiss's own ADC search over the stored codes.
    index = faiss.IndexPQ(coder.pq.d, coder.pq.M, 8)
    index.pq = coder.pq
    index.is_trained = True
    index.add(recon)  # re-encoding reconstructions gives back the same codes
    np.testing.assert_array_equal(faiss.vector_to_array(index.codes).reshape(codes.shape), codes)
    dist, ids = index.search(q, 20)
    # (faiss builds its tables in float32 by |q|²+|c|²-2q·c, hence the looser tolerance)
    np.testing.assert_allclose(np.take_along_axis(-s, ids, axis=1), dist, rtol=1e-4, atol=1e-3)


def test_pq_pads_dimension_not_divisible_by_subquantizers():
    ds = SyntheticDataset(d=30, nt=3000, nb=500, nq=20, seed=5)
    coder = _make("pq", bits=32, niter=5)  # M = 4 does not divide 30 -> pad to 32
    coder.fit(*ds.split("train"))
    xb, _ = ds.split("database")
    xq, _ = ds.split("query")
    codes = coder.encode(xb)
    assert codes.shape == (500, 4)
    recon = coder.pq.decode(codes)
    assert np.all(recon[:, 30:] == 0)  # padded dims stay exactly zero, so ADC is exact on D = 30
    brute = ((xq[:, None, :].astype(np.float64) - recon[None, :, :30]) ** 2).sum(-1)
    np.testing.assert_allclose(-coder.scores(xq, codes), brute, rtol=1e-6, atol=1e-5)


def test_adc_scores_helper_is_a_table_lookup():
    rng = np.random.default_rng(4)
    tables = rng.random((3, 2, 256), dtype=np.float32)
    codes = rng.integers(0, 256, (70, 2), dtype=np.uint8)
    want = -(tables[:, 0, codes[:, 0]] + tables[:, 1, codes[:, 1]])
    np.testing.assert_array_equal(adc_scores(tables, codes), want)


# ---------------------------------------------------------------------------------------------
# Float ceiling
# ---------------------------------------------------------------------------------------------

def test_float_codes_are_the_features(fitted, data):
    coder = fitted["float"]
    xb, _ = data.split("database")
    xq, _ = data.split("query")
    codes = coder.encode(xb)
    np.testing.assert_array_equal(coder.decode(codes), xb)
    brute = ((xq[:, None, :].astype(np.float64) - xb[None]) ** 2).sum(-1)
    np.testing.assert_allclose(-coder.scores(xq, codes), brute, rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Errors that tell the caller what to do
# ---------------------------------------------------------------------------------------------

def test_errors_are_explicit(data):
    xt, lt = data.split("train")
    for method in ("pca-rr", "itq"):
        with pytest.raises(ValueError, match="use lsh"):
            _make(method, bits=128).fit(xt, lt)  # 128 > D = 64
    assert _make("lsh", bits=128).fit(xt, lt).fit_s >= 0  # LSH has no such limit
    with pytest.raises(ValueError, match="multiple of 8"):
        _make("itq", bits=12)
    with pytest.raises(RuntimeError, match="fit"):
        _make("pq", bits=16).encode(xt)
    with pytest.raises(ValueError, match="at least 256"):
        _make("pq", bits=16).fit(xt[:100], lt[:100])
    lsh = _fit("lsh", data)
    with pytest.raises(ValueError, match="fitted on D=64"):
        lsh.encode(xt[:, :10])
    with pytest.raises(ValueError, match="uint8 codes"):
        lsh.scores(xt[:3], np.zeros((5, 3), np.uint8))
    with pytest.raises(ValueError, match="not in this coder's lengths"):
        lsh.scores(xt[:3], lsh.encode(xt[:5]), bits=8)


def test_binary_search_matches_full_scores_up_to_ties():
    """search() (faiss heap top-k) returns the same distances as ranking hamming_scores()."""
    from encoders.coders import make_coder

    rng = np.random.default_rng(3)
    x = rng.normal(size=(3000, 32)).astype(np.float32)
    c = make_coder("itq", bits=16, seed=0)
    c.fit(x[:1000], np.zeros(1000, int))
    codes = c.encode(x)
    s, idx = c.search(x[:20], codes, 10)
    full = c.scores(x[:20], codes)
    np.testing.assert_array_equal(s, -np.sort(-full, axis=1)[:, :10])
    np.testing.assert_array_equal(np.take_along_axis(full, idx, 1), s)
