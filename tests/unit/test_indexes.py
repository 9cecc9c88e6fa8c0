"""infra/indexes.py: the index-choice rule, serialisation, sharded merge and removal, search equal to
the coder's own ranking (synthetic data), evaluation, refresh planning, and the version / CURRENT
protocol on the local store (the S3 race is in tests/integration/test_index_flow.py)."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from encoders.coders import make_coder
from infra import indexes as ix
from infra.planner import ShardRef
from infra.store import LocalStore, PreconditionFailed

N, D, PARTS = 4000, 32, 4


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(10, D)).astype(np.float32) * 2
    labels = rng.integers(0, 10, N)
    x = (centres[labels] + rng.normal(size=(N, D))).astype(np.float32)
    return x, labels


DRQ_FAST = dict(dim=16, hidden=0, epochs_embed=2, epochs_level0=1, epochs_all=1)
CODERS = {  # name: (method, config)
    "itq": ("itq", dict(bits=32, iters=10)), "lsh": ("lsh", dict(bits=64)), "pq": ("pq", dict(bits=32, niter=10)),
    "opq": ("opq", dict(bits=32, opq_iters=4, niter=10)), "float": ("float", {}),
    "drq": ("drq", dict(levels=4, score="l2", **DRQ_FAST)),
    "drq-ip": ("drq", dict(levels=4, score="ip", **DRQ_FAST)),
    "drq-cos": ("drq", dict(levels=4, score="cos", **DRQ_FAST)),
    "drq-k16": ("drq", dict(levels=6, codebook_size=16, score="l2", **DRQ_FAST)),  # 4-bit levels
}


@pytest.fixture(scope="module")
def coders(data):
    x, labels = data
    out = {}
    for name, (method, kw) in CODERS.items():
        c = make_coder(method, **kw)
        c.fit(x[:2000], labels[:2000])
        out[name] = (c, c.encode(x))
    return out


def build_in_memory(coder, codes, bits, index_type=None, parts=PARTS) -> ix.CodeIndex:
    """What the flow does, without a store: one partial per part, merged in order."""
    kind = ix.index_kind(coder)
    plan = ix.choose_index(len(codes), coder.bytes_per_item(bits), kind, 2**34,
                           adc_engine=ix.adc_engine_for(coder, bits), index_type=index_type)
    trained = ix.train_ivf(plan, coder, bits, codes) if plan.needs_training else None
    ci = ix.CodeIndex(plan, bits, ix.new_index(plan, coder, bits, trained, final=True),
                      np.zeros(0, np.int64), np.zeros(0, np.int32))
    for p, rows in enumerate(np.array_split(np.arange(len(codes)), parts)):
        part = ix.CodeIndex(plan, bits, ix.new_index(plan, coder, bits, trained),
                            (rows + 10_000).astype(np.int64), np.full(len(rows), p, np.int32))
        ix.add_codes(part.index, plan, coder, bits, codes[rows])
        ix.merge_into(ci, part)
    ix.configure_search(ci)
    return ci


def assert_coder_ranking(coder, codes, bits, queries, ci, k=10):
    """Index top-k == coder.search top-k up to ties: the same multiset of the coder's own scores."""
    ref_scores, _ = coder.search(queries, codes, k, bits)
    full = coder.scores(queries, codes, bits)
    _, pos = ix.search_prepared(ci, coder, ix.prepare_queries(ci.plan, coder, bits, queries), k)
    got = np.sort(np.take_along_axis(full, pos, axis=1), axis=1)
    np.testing.assert_allclose(got, np.sort(ref_scores, axis=1), rtol=1e-4, atol=1e-4)


# -- the rule ---------------------------------------------------------------------------------
def test_binary_codes_get_a_flat_index_then_ivf_above_the_flat_limit():
    p = ix.choose_index(69_000, 8, "binary", 2**30)
    assert (p.index_type, p.exact, p.memory_bytes) == (ix.BINARY_FLAT, True, 69_000 * (8 + 12))
    big = ix.choose_index(20_000_000, 8, "binary", 2**32)
    assert big.index_type == ix.BINARY_IVF and not big.exact
    assert big.nlist == 16384 and big.nprobe == 1024
    assert big.memory_bytes == 20_000_000 * (8 + 8 + 12) + big.nlist * 8


def test_adc_codes_get_the_coders_exact_engine_then_ivf_over_the_same_codes_above_5m():
    for engine in (ix.PQ_LUT, ix.RQ_LUT, ix.CODER_LUT):
        p = ix.choose_index(5_000_000, 8, "adc", 2**33, adc_engine=engine)
        assert p.index_type == engine and p.exact and p.nlist == 0
    assert ix.choose_index(50_000_000, 8, "adc", 2**33, adc_engine=ix.CODER_LUT).index_type == ix.CODER_LUT
    for engine, ivf in ((ix.PQ_LUT, ix.IVF_PQ), (ix.RQ_LUT, ix.IVF_RQ)):
        p = ix.choose_index(50_000_000, 8, "adc", 2**33, adc_engine=engine, codec="PQ8x8")
        assert p.index_type == ivf and not p.exact and p.nlist == 32768
    with pytest.raises(ValueError, match="does not serve adc codes"):
        ix.choose_index(10, 8, "adc", 2**30, index_type=ix.IVF_FLAT)


def test_float_features_get_flat_then_ivf_flat_and_hnsw_only_when_asked():
    assert ix.choose_index(100_000, 256, "float", 2**30).index_type == ix.FLAT
    p = ix.choose_index(2_000_000, 256, "float", 2**31)
    assert p.index_type == ix.IVF_FLAT and p.nprobe >= 16
    h = ix.choose_index(100_000, 256, "float", 2**30, index_type=ix.HNSW)
    assert h.index_type == ix.HNSW and h.memory_bytes > ix.choose_index(100_000, 256, "float", 2**30).memory_bytes


def test_nothing_fits_raises_a_message_that_says_what_to_do():
    with pytest.raises(ix.IndexBudgetError) as e:
        ix.choose_index(69_000, 8, "binary", 1_000_000)
    msg = str(e.value)
    assert "N=69,000" in msg and "needs >= 1,380,000 bytes" in msg and "budget 1,000,000" in msg
    assert "raise --memory-budget or use a shorter code" in msg


def test_approximate_type_that_does_not_fit_falls_back_to_flat():
    n = 2_000_000
    flat = n * (256 + 12)
    p = ix.choose_index(n, 256, "float", flat + 1000)  # IVF needs 8 more bytes per item
    assert p.index_type == ix.FLAT and "exceeds the budget" in p.reason


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 10**9), b=st.integers(1, 4096), kind=st.sampled_from(ix.KINDS),
       budget=st.integers(1, 2**44))
def test_a_returned_plan_always_fits_its_budget(n, b, kind, budget):
    try:
        p = ix.choose_index(n, b, kind, budget)
    except ix.IndexBudgetError:
        assert n * (b + ix.ID_BYTES) > budget  # only when even the flat index does not fit
        return
    assert p.memory_bytes <= budget and p.n == n and p.index_type in ix.TYPES_BY_KIND[kind]
    if p.nlist:
        assert p.nlist * 39 <= n and 1 <= p.nprobe <= p.nlist


def test_ivf_nlist_and_parse_bytes():
    assert ix.ivf_nlist(1_000_000) == 4096 and ix.ivf_nlist(6000) == 128 and ix.ivf_nlist(100) == 2
    assert ix.parse_bytes("2GB") == 2 * 2**30 == ix.parse_bytes("2 GiB")
    assert ix.parse_bytes("512mb") == 512 * 2**20 and ix.parse_bytes(1234) == 1234 == ix.parse_bytes("1234")
    with pytest.raises(ValueError, match="cannot read a size"):
        ix.parse_bytes("lots")


def test_ivf_train_sample_is_per_list_capped_and_never_under_faiss_minimum():
    per = ix.IVF_TRAIN_PER_LIST
    assert ix.ivf_train_rows(1024) == 1024 * per  # below the cap: rows per list
    assert ix.ivf_train_rows(4096) == min(ix.IVF_TRAIN_MAX_ROWS, 4096 * per)
    big = 16384  # N = 10M: the cap would leave 16 per list; faiss needs 39
    assert ix.ivf_train_rows(big) == 39 * big > ix.IVF_TRAIN_MAX_ROWS
    assert all(ix.ivf_train_rows(n) >= 39 * n for n in (1, 16, 256, 4096, 65536))


def test_shards_per_task_bounds_memory_and_keeps_workers_busy():
    # 10 shards of 10k rows, 8-byte codes: everything fits one batch, but 2 workers want 2 tasks
    assert ix.shards_per_task(10_000, 8, 2**31, 2, 10) == 5
    # a tight budget forces one shard per task
    assert ix.shards_per_task(1_000_000, 64, 100 * 2**20, 2, 50) == 1


# -- search equals the coder's own ranking ------------------------------------------------------
@pytest.mark.parametrize("method,bits,engine", [
    ("itq", 32, ix.BINARY_FLAT), ("lsh", 64, ix.BINARY_FLAT), ("pq", 32, ix.PQ_LUT), ("opq", 32, ix.PQ_LUT),
    ("float", None, ix.FLAT), ("drq", 32, ix.RQ_LUT), ("drq", 16, ix.RQ_LUT), ("drq", 8, ix.RQ_LUT),
    ("drq-ip", 32, ix.RQ_LUT), ("drq-ip", 8, ix.RQ_LUT), ("drq-cos", 16, ix.CODER_LUT),
    ("drq-k16", 24, ix.RQ_LUT), ("drq-k16", 12, ix.RQ_LUT), ("drq-k16", 4, ix.RQ_LUT),
])
def test_index_search_equals_coder_search_up_to_ties(data, coders, method, bits, engine):
    coder, codes = coders[method]
    bits = bits or coder.full_bits
    ci = build_in_memory(coder, codes, bits)
    assert ci.plan.index_type == engine and ci.ntotal == N
    assert_coder_ranking(coder, codes, bits, data[0][::40], ci)


@pytest.mark.parametrize("method", ["pq", "opq", "drq"])
def test_generic_coder_lut_scan_equals_coder_search(data, coders, method):
    coder, codes = coders[method]
    ci = build_in_memory(coder, codes, coder.full_bits, index_type=ix.CODER_LUT)
    assert_coder_ranking(coder, codes, coder.full_bits, data[0][::40], ci)


def test_results_map_positions_to_stable_ids_in_merge_order(coders):
    coder, codes = coders["itq"]
    ci = build_in_memory(coder, codes, 32)
    np.testing.assert_array_equal(ci.ids, np.arange(N) + 10_000)
    np.testing.assert_array_equal(ci.parts, np.repeat(np.arange(PARTS), N // PARTS))
    np.testing.assert_array_equal(ci.codes(), codes)


# -- serialisation, merge, removal ---------------------------------------------------------------
@pytest.mark.parametrize("method,index_type", [
    ("itq", ix.BINARY_FLAT), ("itq", ix.BINARY_IVF), ("pq", ix.PQ_LUT), ("pq", ix.CODER_LUT),
    ("drq", ix.RQ_LUT), ("float", ix.FLAT), ("float", ix.IVF_FLAT), ("float", ix.HNSW),
])
def test_serialisation_round_trip_searches_identically(data, coders, method, index_type):
    coder, codes = coders[method]
    ci = build_in_memory(coder, codes, coder.full_bits, index_type=index_type)
    back = ix.code_index_from_bytes(ci.plan, ci.bits, ix.index_to_bytes(ci.index), ix.ids_bytes(ci.ids, ci.parts))
    q = ix.prepare_queries(ci.plan, coder, ci.bits, data[0][:50])
    s1, p1 = ix.search_prepared(ci, coder, q, 10)
    s2, p2 = ix.search_prepared(back, coder, q, 10)
    np.testing.assert_array_equal(p1, p2)
    np.testing.assert_array_equal(s1, s2)
    np.testing.assert_array_equal(back.ids, ci.ids)
    np.testing.assert_array_equal(back.parts, ci.parts)


@pytest.mark.parametrize("method", ["itq", "pq", "drq", "drq-k16", "float"])
def test_sharded_build_equals_a_single_build(coders, method):
    coder, codes = coders[method]
    one = build_in_memory(coder, codes, coder.full_bits, parts=1)
    many = build_in_memory(coder, codes, coder.full_bits, parts=7)
    np.testing.assert_array_equal(one.codes(), many.codes())


@pytest.mark.parametrize("method", ["itq", "pq", "drq", "drq-k16", "float"])
def test_remove_parts_drops_their_rows_and_keeps_the_order(data, coders, method):
    coder, codes = coders[method]
    ci = build_in_memory(coder, codes, coder.full_bits)
    keep = ci.parts != 1
    assert ix.remove_parts(ci, [1, 99]) == N // PARTS
    assert ci.ntotal == keep.sum() and not (ci.parts == 1).any()
    np.testing.assert_array_equal(ci.codes(), codes[keep])
    assert_coder_ranking(coder, codes[keep], coder.full_bits, data[0][::80], ci)


def test_ivf_indexes_refuse_removal(coders):
    coder, codes = coders["float"]
    ci = build_in_memory(coder, codes, coder.full_bits, index_type=ix.IVF_FLAT)
    with pytest.raises(ix.IndexBuildError, match="do not support removal"):
        ix.remove_parts(ci, [0])


# -- evaluation ---------------------------------------------------------------------------------
def test_evaluate_exact_indexes_have_recall_one(data, coders):
    for method in ("itq", "pq", "drq", "float"):
        coder, codes = coders[method]
        ci = build_in_memory(coder, codes, coder.full_bits)
        pos = np.arange(0, N, 8)
        ev = ix.evaluate(ci, coder, pos, data[0][pos], latency_queries=20)
        assert ev["recall_at_10"] == 1.0 and ev["queries"] == len(pos), (method, ev)
        assert 0 < ev["p50_ms"] <= ev["p99_ms"]


@pytest.mark.parametrize("index_type", [ix.IVF_FLAT, ix.HNSW])
def test_float_approximate_indexes_reach_recall_095(coders, index_type):
    coder, codes = coders["float"]
    ci = build_in_memory(coder, codes, coder.full_bits, index_type=index_type)
    ev = ix.evaluate(ci, coder, np.arange(0, N, 8), None, latency_queries=20)
    assert ev["recall_at_10"] >= 0.95, ev


def test_binary_ivf_recall_is_measured_against_exhaustive_search(coders):
    coder, codes = coders["lsh"]
    ci = build_in_memory(coder, codes, 64, index_type=ix.BINARY_IVF)
    ev = ix.evaluate(ci, coder, np.arange(0, N, 8), None, latency_queries=20)
    assert 0.5 < ev["recall_at_10"] <= 1.0


def test_tie_aware_recall_counts_tied_items_as_hits():
    kth = np.array([-3.0, -1.0])
    returned = np.array([[-1.0, -3.0, -3.0], [-1.0, -2.0, -5.0]])
    assert ix.tie_aware_recall(returned, kth, 3) == pytest.approx((3 + 1) / 6)


# -- refresh planning ------------------------------------------------------------------------------
def ref(part, checksum):
    return ShardRef(f"codes/d/c/part-{part:05d}.parquet", part, checksum, 100)


def test_plan_refresh_finds_added_changed_and_removed_shards():
    inputs = [{"key": ref(p, "a").key, "part": p, "checksum": "a", "rows": 10} for p in range(4)]
    inputs.append({"key": ref(9, "x").key, "part": 9, "checksum": "x", "reason": "bad"})
    listing = [ref(0, "a"), ref(1, "b"), ref(3, "a"), ref(4, "a"), ref(9, "x")]
    d = ix.plan_refresh(inputs, listing)
    assert [r.part for r in d.added] == [4] and [r.part for r in d.changed] == [1]
    assert [i["part"] for i in d.removed] == [2] and d.unchanged == 3
    assert d.drop_parts == [1, 2] and [r.part for r in d.to_read] == [1, 4]
    assert ix.plan_refresh(inputs, [ref(p, "a") for p in range(4)] + [ref(9, "x")]).empty
    # an invalid shard that disappears drops no rows; one that is fixed is read again
    d2 = ix.plan_refresh(inputs, [ref(p, "a") for p in range(4)] + [ref(9, "y")])
    assert d2.drop_parts == [] and [r.part for r in d2.to_read] == [9]


# -- versions and CURRENT on the local store ---------------------------------------------------------
def test_versions_are_claimed_once_and_current_moves_only_from_what_was_read(tmp_path, coders):
    store = LocalStore(tmp_path)
    assert ix.read_current(store, "idx") is None
    v1 = ix.claim_version(store, "idx", 0, "a")
    v2 = ix.claim_version(store, "idx", 0, "b")  # v1 is taken: the next free number
    assert (v1, v2) == (1, 2)
    coder, codes = coders["itq"]
    ci = build_in_memory(coder, codes, 32)
    ix.write_version_files(store, "idx", v1, ci)
    ix.write_build(store, "idx", v1, ix.BuildRecord(
        format=ix.FORMAT, name="idx", mode="build", dataset="d", coder_id="itq", coder_checksum="c", method="itq",
        model_id=None, bits=32, memory_budget=2**30, version=v1, plan=ci.plan.as_dict()))
    cur = ix.commit_current(store, "idx", v1, None, "a")
    with pytest.raises(PreconditionFailed):
        ix.commit_current(store, "idx", v2, None, "b")  # If-None-Match: CURRENT exists
    read = ix.read_current(store, "idx")
    assert read.version == 1 and read.etag == cur.etag
    ix.commit_current(store, "idx", v2, read, "b")
    with pytest.raises(PreconditionFailed):
        ix.commit_current(store, "idx", v1, read, "a")  # stale ETag: the other writer won
    assert ix.read_current(store, "idx").version == 2
    loaded, build = ix.load_version(store, "idx", 1)
    np.testing.assert_array_equal(loaded.codes(), codes)
    assert ix.discard_version(store, "idx", 2) == 1  # only its claim was written
    assert not store.list("indexes/idx/v000002/")


def test_a_code_shard_is_read_whole_unless_a_split_is_excluded(local_settings):
    """Every row is indexed by default (query rows too); excluding the evaluation's 'query' split is
    an explicit choice, and the count of rows left out comes back with the shard."""
    import pyarrow as pa

    from infra import layout
    from infra.planner import ShardRef
    from infra.shards import codes_table, write_table
    from infra.store import open_store
    from tasks.index import read_code_shard

    store = open_store(local_settings)
    ids = np.arange(10, dtype=np.int64)
    split = ["query" if i % 4 == 0 else "database" for i in ids]
    write_table(store, layout.raw_key("d", 3), pa.table({"id": ids, "text": ["t"] * 10, "split": split}))
    etag = write_table(store, layout.codes_key("d", "c", 3), codes_table(ids, np.zeros((10, 2), np.uint8)))
    ref = ShardRef(layout.codes_key("d", "c", 3), 3, etag, 0)
    got, codes, _, left_out = read_code_shard(store, ref, 2)
    assert got.tolist() == ids.tolist() and len(codes) == 10 and left_out == 0
    got, codes, _, left_out = read_code_shard(store, ref, 2, exclude_split="query")
    assert got.tolist() == [1, 2, 3, 5, 6, 7, 9] and len(codes) == 7 and left_out == 3


def test_choose_merge_rule_on_disk_when_two_indexes_exceed_the_budget_or_when_asked():
    plan = ix.choose_index(10_000, 8, "adc", 10**9, adc_engine=ix.PQ_LUT, index_type="ivf-pq", codec="PQ8x8")
    assert not ix.choose_merge(plan, 2 * plan.memory_bytes).ondisk  # small tests keep the in-memory merge
    chosen = ix.choose_merge(plan, 2 * plan.memory_bytes - 1)
    assert chosen.ondisk and "merge on disk: 2 x" in chosen.reason
    assert ix.choose_merge(plan, 10**9, asked=True).ondisk
    assert not ix.choose_merge(plan, 1, asked=False).ondisk
    binary = ix.choose_index(10_000, 8, "binary", 10**9, index_type="binary-ivf")
    assert not ix.choose_merge(binary, 1).ondisk  # no on-disk lists for IndexBinaryIVF
    with pytest.raises(ValueError, match="on-disk merge needs one of"):
        ix.choose_merge(binary, 10**9, asked=True)
    assert ix.IndexPlan.from_dict({k: v for k, v in plan.as_dict().items() if k != "ondisk"}).ondisk is False


def test_on_disk_merge_equals_the_in_memory_merge_after_the_files_move(tmp_path):
    """Unequal partials merged with merge_ondisk into one .ivfdata file, both files moved to another
    directory, read back (IO_FLAG_ONDISK_SAME_DIR): the same top-10 ids and distances as merge_from in
    memory (labels are positions across the partials)."""
    import faiss
    x = np.random.default_rng(0).standard_normal((3000, 16)).astype(np.float32)
    trained = faiss.index_factory(16, "IVF16,PQ4x8")
    trained.train(x)
    tb = ix.index_to_bytes(trained)
    mem, paths = ix.index_from_bytes(tb, False), []
    for i, (lo, hi) in enumerate([(0, 1300), (1300, 2200), (2200, 3000)]):  # unequal partials
        part = ix.index_from_bytes(tb, False)
        part.add(x[lo:hi])
        paths.append(str(tmp_path / f"p{i}.faiss"))
        faiss.write_index(part, paths[-1])
        mem.merge_from(part, mem.ntotal)
    (tmp_path / "a").mkdir()
    od = ix.merge_ivf_on_disk(tb, paths, str(tmp_path / "a" / ix.IVFDATA_FILE))
    assert ix.ivfdata_path_of(od) == str(tmp_path / "a" / ix.IVFDATA_FILE)
    faiss.write_index(od, str(tmp_path / "a" / ix.INDEX_FILE))
    del od
    (tmp_path / "a").rename(tmp_path / "b")
    back = ix.index_from_file(str(tmp_path / "b" / ix.INDEX_FILE), binary=False, ondisk=True)
    assert ix.ivfdata_path_of(back) == str(tmp_path / "b" / ix.IVFDATA_FILE) and back.ntotal == 3000
    mem.nprobe = back.nprobe = 16
    d1, i1 = mem.search(x[::60] + 0.01, 10)
    d2, i2 = back.search(x[::60] + 0.01, 10)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_array_equal(d1, d2)
