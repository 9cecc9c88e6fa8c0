"""IVF indexes over stored ADC / binary codes (never re-encoded), nprobe tuning and overrides,
memory-mapped loads, factory strings and the device fallback."""
from __future__ import annotations

import dataclasses
import logging

import faiss
import numpy as np
import pytest

from encoders.coders import make_coder
from infra import devices
from infra import indexes as ix

N, D = 6000, 32


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(20, D)).astype(np.float32) * 2
    labels = rng.integers(0, 20, N)
    return (centres[labels] + rng.normal(size=(N, D))).astype(np.float32), labels


@pytest.fixture(scope="module")
def coders(data):
    x, labels = data
    out = {}
    for name, (method, kw) in {"pq": ("pq", dict(bits=32, niter=10)),
                               "opq": ("opq", dict(bits=32, opq_iters=3, niter=10)),
                               "drq": ("drq", dict(levels=4, score="l2", dim=16, hidden=0, epochs_embed=2,
                                                   epochs_level0=1, epochs_all=1)),
                               "drq-ip": ("drq", dict(levels=4, score="ip", dim=16, hidden=0, epochs_embed=2,
                                                      epochs_level0=1, epochs_all=1)),
                               "itq": ("itq", dict(bits=32, iters=10))}.items():
        c = make_coder(method, **kw)
        c.fit(x[:3000], labels[:3000])
        out[name] = (c, c.encode(x))
    return out


def build(coder, codes, bits, index_type, parts=3, routing=None):
    """What the flow does: train on a sample, one partial per part, merged in order."""
    plan = ix.choose_index(len(codes), coder.bytes_per_item(bits), ix.index_kind(coder), 2**34,
                           adc_engine=ix.adc_engine_for(coder, bits), index_type=index_type,
                           codec=ix.codec_of(coder, bits))
    if routing:  # what ivf_routing picks from 8192 lists, here on a small index
        plan = dataclasses.replace(plan, routing=routing)
    trained = ix.train_ivf(plan, coder, bits, codes[::2]) if plan.needs_training else None
    ci = ix.CodeIndex(plan, bits, ix.new_index(plan, coder, bits, trained, final=True),
                      np.zeros(0, np.int64), np.zeros(0, np.int32))
    for p, rows in enumerate(np.array_split(np.arange(len(codes)), parts)):
        part = ix.CodeIndex(plan, bits, ix.new_index(plan, coder, bits, trained), rows.astype(np.int64),
                            np.full(len(rows), p, np.int32))
        ix.add_codes(part.index, plan, coder, bits, codes[rows])
        ix.merge_into(ci, part)
    ix.configure_search(ci)
    return ci


@pytest.mark.parametrize("method", ["pq", "opq"])
def test_ivf_pq_with_nprobe_nlist_returns_exactly_the_flat_pq_top10(data, coders, method):
    coder, codes = coders[method]
    bits = coder.full_bits
    flat = build(coder, codes, bits, ix.PQ_LUT)
    ivf = build(coder, codes, bits, "IVF64,PQ")
    assert isinstance(faiss.downcast_index(ivf.index), faiss.IndexIVFPQ) and not ivf.index.by_residual
    assert ivf.plan.factory.startswith("IVF64,PQ") and ivf.ntotal == N
    q = ix.prepare_queries(flat.plan, coder, bits, data[0][:50] + 0.1)
    fs, fp = ix.search_prepared(flat, coder, q, 10)
    vs, vp = ix.search_prepared(ivf, coder, q, 10, nprobe=ivf.plan.nlist)
    np.testing.assert_array_equal(vs, fs)  # same ADC distances, bit for bit
    distinct = (fs[:, :-1] != fs[:, 1:]).all(axis=1)
    np.testing.assert_array_equal(vp[distinct], fp[distinct])  # and the same items where no ties
    assert (vp == fp).mean() > 0.95


@pytest.mark.parametrize("method", ["drq", "drq-ip"])
def test_ivf_rq_over_stored_drq_codes_equals_the_flat_rq_index_at_nprobe_nlist(data, coders, method):
    coder, codes = coders[method]
    bits = coder.full_bits
    flat = build(coder, codes, bits, ix.RQ_LUT)
    ivf = build(coder, codes, bits, ix.IVF_RQ)
    q = ix.prepare_queries(flat.plan, coder, bits, data[0][:50])
    fs, _ = ix.search_prepared(flat, coder, q, 10)
    vs, _ = ix.search_prepared(ivf, coder, q, 10, nprobe=ivf.plan.nlist)
    np.testing.assert_allclose(vs, fs, rtol=1e-4, atol=1e-4)


def test_nprobe_is_tuned_to_the_smallest_value_reaching_the_target_and_overridable(data, coders):
    coder, codes = coders["pq"]
    ivf = build(coder, codes, coder.full_bits, ix.IVF_PQ)
    pos = np.arange(0, N, 60)
    ev = ix.evaluate(ivf, coder, pos, data[0][pos], tune_target=0.9)
    tuned = ev["tuning"]
    assert tuned["param"] == "nprobe" and tuned["recall"] >= 0.9 and ev["recall_at_10"] >= 0.9
    tried = [int(v) for v in tuned["tried"]]
    assert tried[-1] == tuned["value"] and all(tuned["tried"][str(v)] < 0.9 for v in tried[:-1])
    assert ivf.index.nprobe == tuned["value"] == ev["nprobe"]
    q = ix.prepare_queries(ivf.plan, coder, coder.full_bits, data[0][:5])
    one, _ = ix.search_prepared(ivf, coder, q, 10, nprobe=1)
    assert ivf.index.nprobe == tuned["value"]  # a per-call override leaves the index as tuned
    assert one.shape == (5, 10)


def test_binary_ivf_over_stored_codes_tunes_nprobe(coders):
    coder, codes = coders["itq"]
    ci = build(coder, codes, coder.full_bits, "BIVF32")
    assert ci.plan.index_type == ix.BINARY_IVF and ci.plan.nlist == 32
    ev = ix.evaluate(ci, coder, np.arange(0, N, 50), None, tune_target=0.95)
    assert ev["recall_at_10"] >= 0.95 and ev["tuning"]["value"] <= 32


def test_exact_index_check_costs_a_fixed_gallery_not_n(data, coders):
    coder, codes = coders["pq"]
    flat = build(coder, codes, coder.full_bits, ix.PQ_LUT)
    pos = np.arange(0, N, 100)
    ev = ix.evaluate(flat, coder, pos, data[0][pos], gallery=1000)
    assert ev["gallery"] == 1000 and ev["recall_at_10"] >= 0.99


@pytest.mark.parametrize("spec,kind,codec,want", [
    ("IVF1024,PQ8x8", "adc", "PQ8x8", (ix.IVF_PQ, 1024, None)),
    ("IVF1024,PQ8", "adc", "PQ8x8", (ix.IVF_PQ, 1024, None)),
    ("PQ8x8", "adc", "PQ8x8", (ix.PQ_LUT, None, None)),
    ("IVF256,RQ8x8", "adc", "RQ8x8", (ix.IVF_RQ, 256, None)),
    ("BIVF512", "binary", "", (ix.BINARY_IVF, 512, None)),
    ("BFlat", "binary", "", (ix.BINARY_FLAT, None, None)),
    ("IVF100,Flat", "float", "", (ix.IVF_FLAT, 100, None)),
    ("HNSW16,Flat", "float", "", (ix.HNSW, None, 16)),
    ("ivf-pq", "adc", "PQ8x8", (ix.IVF_PQ, None, None)),
])
def test_factory_strings_name_index_types(spec, kind, codec, want):
    assert ix.parse_index_type(spec, kind, codec) == want


def test_factory_strings_that_would_re_encode_or_do_not_fit_are_refused():
    with pytest.raises(ValueError, match="never re-encoded"):
        ix.parse_index_type("IVF1024,PQ16x8", "adc", "PQ8x8")
    with pytest.raises(ValueError, match="stored codes are RQ"):
        ix.parse_index_type("IVF1024,PQ8x8", "adc", "RQ8x8")
    with pytest.raises(ValueError, match="does not serve binary"):
        ix.parse_index_type("IVF64,Flat", "binary")
    with pytest.raises(ValueError, match="factory string such as"):
        ix.parse_index_type("IVF64_HNSW32,PQ8", "adc")
    with pytest.raises(ValueError, match="39 training items"):
        ix.choose_index(1000, 8, "adc", 2**30, adc_engine=ix.PQ_LUT, index_type="IVF1024,PQ8x8", codec="PQ8x8")
    p = ix.choose_index(100_000, 8, "adc", 2**30, adc_engine=ix.PQ_LUT, index_type="IVF1024,PQ8x8", codec="PQ8x8")
    assert (p.index_type, p.nlist, p.factory) == (ix.IVF_PQ, 1024, "IVF1024,PQ8x8")


def test_a_memory_mapped_load_searches_like_the_in_memory_index(tmp_path, data, coders):
    coder, codes = coders["pq"]
    ci = build(coder, codes, coder.full_bits, ix.IVF_PQ)
    path = str(tmp_path / "index.faiss")
    faiss.write_index(ci.index, path)
    mm = ix.code_index_from_file(ci.plan, ci.bits, path, ix.ids_bytes(ci.ids, ci.parts), mmap=True)
    q = ix.prepare_queries(ci.plan, coder, ci.bits, data[0][:20])
    np.testing.assert_array_equal(ix.search_prepared(mm, coder, q, 10)[1], ix.search_prepared(ci, coder, q, 10)[1])


def test_cuda_falls_back_to_cpu_with_a_message_when_there_is_no_gpu(caplog, monkeypatch):
    monkeypatch.setattr(devices, "torch_cuda", lambda: False)
    monkeypatch.setattr(devices, "faiss_gpus", lambda: 0)
    monkeypatch.setattr(devices, "_warned", set())  # logged once per process: start from none
    with caplog.at_level(logging.WARNING, logger="infra.devices"):
        assert devices.resolve_device("cuda") == "cpu"
    assert "falling back to CPU" in caplog.text and "make install GPU=1" in caplog.text
    assert devices.resolve_device("cpu") == "cpu"
    with pytest.raises(ValueError, match="cpu' or 'cuda"):
        devices.resolve_device("tpu")
    x = np.random.default_rng(0).normal(size=(2000, 8)).astype(np.float32)
    assert devices.kmeans_centroids(x, 16, device=devices.use_device("cuda")).shape == (16, 8)
    d, i = devices.exact_search(x, x[:3], 1)
    assert (i[:, 0] == np.arange(3)).all()


@pytest.mark.parametrize("method", ["pq", "drq-ip"])
def test_hnsw_routing_puts_codes_in_their_nearest_list_and_keeps_nprobe_nlist_exact(data, coders, method):
    """From nlist 8192 (`ivf_routing`; ivf-pq / ivf-rq only) added codes find their list through an
    HNSW graph over the centroids. Forced on a 64-list index, this checks the mechanics: the plan
    records it, every code is in some list (nothing lost), >= 99% in the list the exact scan picks
    (on 64 centroids the graph search is close to exhaustive, so this is not a test of routing
    quality: BENCHMARKS.md section 11 measures recall at 3M-10M), the same centroids give the same
    lists, and nprobe = nlist still returns the flat index's top-10 scores."""
    assert ix.ivf_routing(ix.IVF_PQ, 8192) == ix.ivf_routing(ix.IVF_RQ, 16384) == "hnsw"
    assert ix.ivf_routing(ix.IVF_PQ, 4096) == ix.ivf_routing(ix.BINARY_IVF, 16384) == "exact"
    coder, codes = coders[method]
    bits = coder.full_bits
    flat_type, ivf_type = (ix.PQ_LUT, "IVF64,PQ") if method == "pq" else (ix.RQ_LUT, "IVF64,RQ")
    ivf = build(coder, codes, bits, ivf_type, parts=2, routing="hnsw")
    assert ivf.plan.routing == "hnsw" and ivf.ntotal == N
    inv = faiss.extract_index_ivf(ivf.index)
    listed = np.full(N, -1)
    for lst in range(inv.nlist):
        listed[faiss.rev_swig_ptr(inv.invlists.get_ids(lst), inv.invlists.list_size(lst)).copy()] = lst
    x = ix.decode_codes(ivf.plan, coder, bits, codes)
    _, exact = inv.quantizer.search(x, 1)
    assert (listed >= 0).all() and (listed == exact[:, 0]).mean() >= 0.99
    _, again = ix.router(inv, ivf.plan).search(x, 1)
    np.testing.assert_array_equal(again[:, 0], listed)
    flat = build(coder, codes, bits, flat_type)
    q = ix.prepare_queries(flat.plan, coder, bits, data[0][:50] + 0.1)
    fs, _ = ix.search_prepared(flat, coder, q, 10)
    vs, _ = ix.search_prepared(ivf, coder, q, 10, nprobe=ivf.plan.nlist)
    np.testing.assert_allclose(vs, fs, rtol=1e-5, atol=1e-5)
