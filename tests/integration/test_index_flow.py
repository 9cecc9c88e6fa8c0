"""Index build / refresh / search against SeaweedFS S3 under a real Prefect server.

Data: synthetic clustered features (D=32) in 20 shards of 300 rows with raw metadata and features,
real baseline coders (itq, pq, float) fitted on them and registered, code shards written with
infra.shards.codes_table exactly as the encode stage writes them.
"""
from __future__ import annotations

import collections
import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pytest

from encoders.coders import make_coder
from flows.build_index import build_index
from flows.refresh_index import refresh_index
from infra import indexes as ix
from infra import layout
from infra.registry import register_coder
from infra.search import Searcher
from infra.settings import Settings
from infra.shards import codes_table, features_table, write_table
from infra.store import open_store
from infra.store_counts import ACCESS
from flows.cli import main as cli
from tests.conftest import settings_dict
from tests.helpers import register_untrained_cnn

pytestmark = pytest.mark.s3

DATASET, MODEL, D, ROWS = "synth", "test-cnn", 32, 300  # MODEL: an untrained 32-d SmallCNN (image queries)


def synthetic(parts: range, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, features, labels) of `parts`; ids are stable (not positions): 1_000_000 + part*1000 + row."""
    centres = np.random.default_rng(42).normal(size=(10, D)).astype(np.float32) * 2
    ids, xs, ys = [], [], []
    for p in parts:
        rng = np.random.default_rng(seed * 10_000 + p)
        y = rng.integers(0, 10, ROWS)
        xs.append((centres[y] + rng.normal(size=(ROWS, D))).astype(np.float32))
        ys.append(y)
        ids.append(1_000_000 + p * 1000 + np.arange(ROWS))
    return np.concatenate(ids).astype(np.int64), np.concatenate(xs), np.concatenate(ys)


def fit_coders(store, methods=("itq", "pq", "float")) -> dict:
    _, x, y = synthetic(range(4))
    out = {}
    for m in methods:
        c = make_coder(m, bits=32)
        c.fit(x, y)
        cid = f"{m}-test"
        register_coder(store, cid, c.state(), {"dataset": DATASET, "model_id": MODEL,
                                               "lengths": list(c.lengths), "bits": c.full_bits})
        out[cid] = c
    return out


def write_parts(store, coders: dict, parts: range, seed: int = 0) -> None:
    """raw (id, text, label, split), features and one codes shard per coder, same part numbers."""
    for p in parts:
        ids, x, y = synthetic(range(p, p + 1), seed)
        split = np.where(np.arange(ROWS) % 10 == 0, "val", "database")  # no held-out queries here
        raw = pa.table({"id": pa.array(ids), "text": [f"item {i}" for i in ids],
                        "label": pa.array(y.astype(np.int32)), "split": split.tolist()})
        write_table(store, layout.raw_key(DATASET, p), raw)
        write_table(store, layout.features_key(DATASET, MODEL, p), features_table(ids, x))
        for cid, c in coders.items():
            write_table(store, layout.codes_key(DATASET, cid, p), codes_table(ids, c.encode(x)))


def all_codes(coder, parts):
    ids, x, _ = synthetic(parts)
    return ids, x, coder.encode(x)


def assert_equals_coder_ranking(res, coder, db_ids, db_codes, queries, k=10):
    """Index hits == coder.search over every stored code, up to ties (same multiset of scores)."""
    ref_scores, _ = coder.search(queries, db_codes, k)
    full = coder.scores(queries, db_codes)
    pos_of = {int(i): j for j, i in enumerate(db_ids)}
    got = np.array([[full[r, pos_of[int(i)]] for i in row] for r, row in enumerate(res.ids)])
    np.testing.assert_allclose(np.sort(got, 1), np.sort(ref_scores, 1), rtol=1e-4, atol=1e-4)


def code_reads_since(store, coder_id: str, before: collections.Counter) -> set[str]:
    """Code shard keys read by anything in this process (every task's store) since `before`."""
    prefix = store.uri_of(layout.codes_prefix(DATASET, coder_id))
    return {k[len(store.uri_of("")):] for k, n in ACCESS.reads().items() if k.startswith(prefix) and n > before[k]}


def staged(store, name):
    return [i.key for i in store.list(layout.index_prefix(name) + "_staging/")]


def cli_json(capsys, *argv, settings) -> dict:
    """Run `codeshard …` in-process against `settings`' store; its printed JSON."""
    capsys.readouterr()
    assert cli([*argv, "--store", settings.store, "--s3-endpoint", settings.s3_endpoint]) == 0
    return json.loads(capsys.readouterr().out)


def test_build_search_refresh_on_s3(prefect_server, s3_settings, capsys, tmp_path):
    cfg = settings_dict(s3_settings)
    store = open_store(s3_settings)
    coders = fit_coders(store)
    write_parts(store, coders, range(20))

    # -- build: 5 batches of 4 shards, merged, evaluated, published -------------------------------
    s = build_index(DATASET, "itq-test", 32, "synth-itq", memory_budget="64MB", shards_per_task=4, settings=cfg)
    assert (s["status"], s["version"], s["n"], s["index_type"]) == ("published", 1, 6000, ix.BINARY_FLAT)
    assert s["recall_at_10"] == 1.0 and s["batches"] == {"total": 5, "done": 5, "skipped": 0}
    b = ix.read_build(store, "synth-itq", 1)
    assert b.n == 6000 and b.index_bytes > 6000 * 4 and b.bits == 32 and b.coder_id == "itq-test"
    assert set(b.seconds) >= {"train", "add_wall", "add_tasks", "merge", "eval", "total"}
    assert b.peak_rss_bytes["merge"] > 0 and b.eval["queries"] == ix.QUERIES and b.eval["p99_ms"] > 0
    assert [i["part"] for i in b.inputs] == list(range(20))
    assert all(i["checksum"] == store.head(i["key"]).etag for i in b.inputs)
    assert set(b.code_shards_read) == {layout.codes_key(DATASET, "itq-test", p) for p in range(20)}
    assert not staged(store, "synth-itq")
    keys = {i.key.rsplit("/", 1)[-1] for i in store.list(layout.index_version_prefix("synth-itq", 1))}
    assert keys == {"_claim.json", "index.faiss", "ids.parquet", "build.json"}
    # a second build over the same shards is skipped
    assert build_index(DATASET, "itq-test", 32, "synth-itq", settings=cfg)["status"] == "skipped"

    # -- search through CURRENT: the coder's own ranking, stable ids, metadata --------------------
    searcher = Searcher(open_store(s3_settings), "synth-itq", poll_seconds=0)
    itq = coders["itq-test"]
    db_ids, db_x, db_codes = all_codes(itq, range(20))
    queries = db_x[::300] + 0.1
    res = searcher.search(queries, k=10)
    assert res.version == 1 and res.ids.shape == (20, 10)
    assert_equals_coder_ranking(res, itq, db_ids, db_codes, queries)
    hit = res.hits[0][0]
    assert set(hit) >= {"id", "score", "label", "split", "rank"} and hit["split"] in ("val", "database")
    by_id = searcher.search_by_id(int(db_ids[123]), k=5)
    assert by_id.scores[0][0] == 0.0 and int(db_ids[123]) in by_id.ids[0][by_id.scores[0] == 0.0]
    me = [h for h in by_id.hits[0] if h["id"] == int(db_ids[123])][0]
    assert me["label"] == int(synthetic(range(0, 1))[2][123]) and me["split"] == "database"
    # the CLI: --id uses the stored feature; --image embeds a PNG with the coder's model (test-cnn)
    out = cli_json(capsys, "search", "--name", "synth-itq", "--id", str(db_ids[123]), "-k", "3", settings=s3_settings)
    assert out["version"] == 1 and len(out["hits"]) == 3 and out["hits"][0]["score"] == 0.0
    register_untrained_cnn(store)
    from PIL import Image

    Image.fromarray((np.arange(28 * 28).reshape(28, 28) % 256).astype(np.uint8)).save(tmp_path / "q.png")
    out = cli_json(capsys, "search", "--name", "synth-itq", "--image", str(tmp_path / "q.png"), "-k", "4",
                   settings=s3_settings)
    assert len(out["hits"]) == 4 and all(h["id"] in set(db_ids.tolist()) for h in out["hits"])

    # -- refresh after adding 2 shards (10%): reads only those -----------------------------------
    write_parts(store, coders, range(20, 22))
    before = ACCESS.reads()
    r = refresh_index("synth-itq", settings=cfg)
    new_keys = {layout.codes_key(DATASET, "itq-test", p) for p in (20, 21)}
    assert (r["status"], r["version"], r["n"], r["based_on"]) == ("published", 2, 6600, 1)
    assert code_reads_since(store, "itq-test", before) == new_keys  # the 20 old shards: never opened
    assert set(r["code_shards_read"]) == new_keys, r["code_shards_read"]
    res2 = searcher.search(queries, k=10)
    assert res2.version == 2 and searcher.loads == 2
    db_ids, db_x, db_codes = all_codes(itq, range(22))
    assert_equals_coder_ranking(res2, itq, db_ids, db_codes, queries)
    # nothing new: up to date, no code shard read
    before = ACCESS.reads()
    again = cli_json(capsys, "index", "refresh", "--name", "synth-itq", settings=s3_settings)
    assert not code_reads_since(store, "itq-test", before)
    assert (again["status"], again["version"], again["code_shards_read"]) == ("up-to-date", 2, {})

    # -- a changed shard and a deleted shard: their old rows go, the changed one is re-read ----------
    write_parts(store, {"itq-test": itq}, range(3, 4), seed=7)
    store.delete(layout.codes_key(DATASET, "itq-test", 5))
    before = ACCESS.reads()
    with pytest.raises(ix.IndexBuildError, match="allow_removal"):  # a shrink needs a stated reason
        refresh_index("synth-itq", settings=cfg)
    assert ix.read_current(store, "synth-itq").version == 2
    r3 = refresh_index("synth-itq", settings=cfg, allow_removal="part 5 withdrawn by the test")
    assert (r3["status"], r3["version"], r3["n"]) == ("published", 3, 6300)
    assert code_reads_since(store, "itq-test", before) == {layout.codes_key(DATASET, "itq-test", 3)}
    ci, b3 = ix.load_version(store, "synth-itq", 3)
    assert len(np.unique(ci.ids)) == 6300 and not (ci.parts == 5).any()
    new3 = synthetic(range(3, 4), seed=7)[0]
    np.testing.assert_array_equal(np.sort(ci.ids[ci.parts == 3]), np.sort(new3))
    assert b3.delta["changed"] == [layout.codes_key(DATASET, "itq-test", 3)]
    assert b3.removal_reason == "part 5 withdrawn by the test"


def test_adc_and_float_indexes_on_s3(prefect_server, s3_settings):
    cfg = settings_dict(s3_settings)
    store = open_store(s3_settings)
    coders = fit_coders(store, ("pq", "float"))
    write_parts(store, coders, range(8))
    db_ids, db_x, _ = synthetic(range(8))
    queries = db_x[::200] + 0.05
    bad = layout.codes_key(DATASET, "pq-test", 9)
    store.write_bytes(bad, b"PAR1 not parquet")  # an unreadable shard: skipped and recorded, not fatal

    s = build_index(DATASET, "pq-test", 32, "synth-pq", shards_per_task=3, settings=cfg)
    assert (s["status"], s["index_type"], s["recall_at_10"], s["n"]) == ("published", ix.PQ_LUT, 1.0, 2400)
    invalid = ix.read_build(store, "synth-pq", 1).invalid
    assert [i["key"] for i in invalid] == [bad] and "not a readable codes shard" in invalid[0]["reason"]
    before = ACCESS.reads()
    assert refresh_index("synth-pq", settings=cfg)["status"] == "up-to-date"  # unchanged: not re-read
    assert not code_reads_since(store, "pq-test", before)
    res = Searcher(store, "synth-pq").search(queries, k=10)
    pq_coder = coders["pq-test"]
    assert_equals_coder_ranking(res, pq_coder, db_ids, pq_coder.encode(db_x), queries)

    f = build_index(DATASET, "float-test", None, "synth-float-ivf", index_type="ivf-flat", settings=cfg)
    assert f["index_type"] == ix.IVF_FLAT and f["recall_at_10"] >= 0.95, f
    b1 = ix.read_build(store, "synth-float-ivf", 1)
    # the k-means sample size and iterations are recorded: the plan's rows per list, capped by N
    assert b1.trained["rows"] == min(ix.ivf_train_rows(b1.plan["nlist"]), b1.n) > 0
    assert b1.trained["niter"] == ix.IVF_TRAIN_NITER
    assert store.head(ix.version_key("synth-float-ivf", 1, ix.TRAINED_FILE)) is not None
    write_parts(store, {"float-test": coders["float-test"]}, range(8, 9))
    r = refresh_index("synth-float-ivf", settings=cfg)  # IVF: new rows go into the trained lists
    assert (r["status"], r["n"]) == ("published", 2700) and r["recall_at_10"] >= 0.95
    assert ix.read_build(store, "synth-float-ivf", 2).trained["rows"] == b1.trained["rows"]  # kept
    # IVF cannot drop the rows of a changed shard: the refresh does a (documented) full rebuild
    write_parts(store, {"float-test": coders["float-test"]}, range(0, 1), seed=3)
    rb = refresh_index("synth-float-ivf", settings=cfg)
    assert (rb["status"], rb["version"], rb["n"], rb["based_on"]) == ("published", 3, 2700, None)
    assert ix.read_build(store, "synth-float-ivf", 3).mode == "build"

    with pytest.raises(ix.IndexBudgetError, match="raise --memory-budget or use a shorter code"):
        build_index(DATASET, "pq-test", 32, "synth-pq-small", memory_budget="10KB", settings=cfg)
    assert ix.read_current(store, "synth-pq-small") is None


# -- two refreshes racing from two processes ---------------------------------------------------
def _race_worker(settings: dict, name: str, barrier, results) -> None:
    """Child process: run the real refresh flow; hold the first CURRENT move until both racers are
    ready to move it, so both conditional writes carry the same If-Match."""
    real = ix.commit_current
    state = {"first": True}

    def synced(*a, **kw):
        if state["first"]:
            state["first"] = False
            barrier.wait(timeout=120)
        return real(*a, **kw)

    ix.commit_current = synced
    try:
        out = refresh_index(name, settings=settings)
        results.put({k: out.get(k) for k in ("status", "version", "attempts", "n")})
    except BaseException as e:  # noqa: BLE001 - report to the parent
        results.put({"status": "error", "error": f"{type(e).__name__}: {e}"})


@pytest.mark.slow  # two spawned interpreters importing torch + prefect: ~35 s on 2 shared cores
def test_two_refreshes_race_exactly_one_wins(prefect_server, s3_settings):
    cfg = settings_dict(s3_settings)
    store = open_store(s3_settings)
    coders = fit_coders(store, ("itq",))
    write_parts(store, coders, range(6))
    assert build_index(DATASET, "itq-test", 32, "race", settings=cfg)["version"] == 1
    write_parts(store, coders, range(6, 8))

    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_race_worker, args=(cfg, "race", barrier, results)) for _ in range(2)]
    for p in procs:
        p.start()
    reader = Searcher(open_store(s3_settings), "race", poll_seconds=0)
    seen, q = set(), synthetic(range(1))[1][:3]
    while any(p.is_alive() for p in procs):  # CURRENT always names a complete, loadable version
        seen.add(reader.search(q, k=5).version)
        time.sleep(0.05)
    for p in procs:
        p.join(30)
    out = sorted([results.get(timeout=10) for _ in procs], key=lambda r: r["status"])
    assert [r["status"] for r in out] == ["published", "up-to-date"], out
    winner, loser = out
    assert winner["attempts"] == 1 and loser["attempts"] == 2  # lost once, re-planned on top: nothing left
    assert loser["version"] == winner["version"]
    cur = ix.read_current(store, "race")
    assert cur.version == winner["version"] and seen <= {1, winner["version"]}
    published = [i.key for i in store.list(layout.index_prefix("race")) if i.key.endswith("/build.json")]
    assert len(published) == 2  # v1 and the winner's; the loser's claimed version was discarded
    ci, _ = ix.load_version(store, "race", cur.version)
    assert ci.ntotal == 8 * ROWS == len(np.unique(ci.ids))


# -- kill during a build -------------------------------------------------------------------------
def test_kill_during_build_publishes_nothing_and_rerun_resumes(prefect_server, s3_settings):
    cfg = settings_dict(s3_settings)
    store = open_store(s3_settings)
    coders = fit_coders(store, ("itq",))
    write_parts(store, coders, range(20))
    env = {**os.environ, **Settings.load(**{**cfg, "max_workers": 1}).to_env(), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "index", "build", "--dataset", DATASET,
                             "--coder", "itq-test", "--name", "killed", "--shards-per-task", "1"],
                            env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if sum(k.endswith("/stats.json") for k in staged(store, "killed")) >= 3:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = sum(k.endswith("/stats.json") for k in staged(store, "killed"))
    assert 3 <= done < 20, f"kill landed outside the batch phase ({done} batches staged)"
    assert ix.read_current(store, "killed") is None
    assert not [i.key for i in store.list(layout.index_prefix("killed")) if i.key.endswith("build.json")]
    with pytest.raises(Exception, match="no index named"):
        Searcher(store, "killed").current()

    s = build_index(DATASET, "itq-test", None, "killed", shards_per_task=1, settings=cfg)
    assert s["status"] == "published" and s["n"] == 20 * ROWS
    assert s["batches"]["skipped"] >= done and s["batches"]["total"] == 20
    assert len(s["code_shards_read"]) == 20 - s["batches"]["skipped"]  # staged batches are not re-read
    assert Searcher(store, "killed").current().version == s["version"]
    assert not staged(store, "killed")
    assert json.loads(store.read_bytes(layout.index_current_key("killed")))["version"] == s["version"]


def test_ivf_pq_from_a_factory_string_is_tuned_published_and_searched_memory_mapped(prefect_server, s3_settings,
                                                                                     tmp_path):
    cfg = settings_dict(s3_settings)
    store = open_store(s3_settings)
    coders = fit_coders(store, ("pq",))
    write_parts(store, coders, range(8))
    _, db_x, _ = synthetic(range(8))
    queries = db_x[::100] + 0.05
    flat = build_index(DATASET, "pq-test", 32, "synth-pq-flat", settings=cfg)
    s = build_index(DATASET, "pq-test", 32, "synth-ivfpq", index_type="IVF32,PQ4x8", recall_target=0.9,
                    shards_per_task=3, settings=cfg)
    assert (s["status"], s["index_type"], s["n"]) == ("published", ix.IVF_PQ, 2400) and s["recall_at_10"] >= 0.9
    b = ix.read_build(store, "synth-ivfpq", 1)
    assert b.plan["factory"] == "IVF32,PQ4x8" and b.index_type_requested == "IVF32,PQ4x8"
    assert b.plan["nprobe"] == b.eval["tuning"]["value"] == b.eval["nprobe"] and b.recall_target == 0.9
    assert b.eval["queries"] <= ix.QUERIES
    mm = Searcher(store, "synth-ivfpq", cache_dir=str(tmp_path / "cache"))
    lv = mm.current()
    assert lv.ci.index.nprobe == b.plan["nprobe"]
    assert (tmp_path / "cache" / "synth-ivfpq" / "v000001" / ix.INDEX_FILE).exists()
    exhaustive = mm.search(queries, k=10, nprobe=32, with_metadata=False)
    ref = Searcher(store, "synth-pq-flat").search(queries, k=10, with_metadata=False)
    assert flat["index_type"] == ix.PQ_LUT
    np.testing.assert_array_equal(exhaustive.scores, ref.scores)  # nprobe = nlist: the flat PQ scan


def test_large_objects_upload_in_parts_and_download_whole(s3_settings, tmp_path):
    store = open_store(s3_settings)
    store.multipart_threshold = 6 * 2**20
    store.multipart_part_bytes = 5 * 2**20  # S3's smallest part
    data = np.random.default_rng(0).integers(0, 256, 12 * 2**20, dtype=np.uint8).tobytes()
    src = tmp_path / "big.faiss"
    src.write_bytes(data)
    etag = store.upload_file("big/index.faiss", str(src))
    assert etag.endswith("-3"), etag  # three parts: 5 + 5 + 2 MiB
    assert store.write_bytes("big/again.faiss", data).endswith("-3")
    store.download_file("big/index.faiss", str(tmp_path / "back.faiss"))
    assert (tmp_path / "back.faiss").read_bytes() == data and store.read_bytes("big/again.faiss") == data
    assert store.head("big/index.faiss").etag == etag


def test_ivf_merged_on_disk_searches_like_the_in_memory_merge_and_refresh_rebuilds_it(prefect_server, s3_settings,
                                                                                      tmp_path):
    """IVF-PQ over 3 batches merged on disk (index.faiss + index.ivfdata published, downloaded to the
    searcher's cache and read from there): the same top-10 ids and scores as the in-memory merge, with
    the tuned nprobe and with nprobe = nlist. A refresh that adds a shard rebuilds it in full (mode
    'build', still on disk; the same top-10 as an in-memory full build), and so does one that removes a
    shard once the removal has a stated reason (the removed shard's ids are gone)."""
    cfg = settings_dict(s3_settings)
    store = open_store(s3_settings)
    coders = fit_coders(store, ("pq",))
    write_parts(store, coders, range(8))
    _, db_x, _ = synthetic(range(9))
    queries = db_x[::100] + 0.05
    kw = dict(index_type="IVF32,PQ4x8", recall_target=0.9, shards_per_task=3, settings=cfg)
    mem = build_index(DATASET, "pq-test", 32, "synth-ivf-mem", **kw)
    od = build_index(DATASET, "pq-test", 32, "synth-ivf-disk", merge_on_disk=True, **kw)
    assert (od["status"], od["n"], od["batches"]["total"]) == ("published", 2400, 3)
    b, bm = ix.read_build(store, "synth-ivf-disk", 1), ix.read_build(store, "synth-ivf-mem", 1)
    assert b.plan["ondisk"] and b.merge_on_disk_requested is True and "merge on disk" in b.plan["reason"]
    assert not bm.plan["ondisk"] and bm.merge_on_disk_requested is None  # the rule: small -> in memory
    assert store.head(ix.version_key("synth-ivf-disk", 1, ix.IVFDATA_FILE)).size > 2400 * 4
    assert store.head(ix.version_key("synth-ivf-mem", 1, ix.IVFDATA_FILE)) is None
    assert b.plan["nprobe"] == bm.plan["nprobe"]

    def same_top10(version: int, cached: bool) -> None:
        s_disk = Searcher(store, "synth-ivf-disk", cache_dir=str(tmp_path / "cache") if cached else None)
        s_mem = Searcher(store, "synth-ivf-mem")
        assert s_disk.current().version == version
        for nprobe in (None, 32):
            a = s_disk.search(queries, k=10, with_metadata=False, nprobe=nprobe)
            r = s_mem.search(queries, k=10, with_metadata=False, nprobe=nprobe)
            np.testing.assert_array_equal(a.ids, r.ids)
            np.testing.assert_array_equal(a.scores, r.scores)

    same_top10(1, cached=True)
    vdir = tmp_path / "cache" / "synth-ivf-disk" / "v000001"
    assert sorted(p.name for p in vdir.iterdir()) == [ix.INDEX_FILE, ix.IVFDATA_FILE]
    same_top10(1, cached=False)  # read through a temporary directory

    write_parts(store, coders, range(8, 9))  # a shard added: the on-disk index is rebuilt in full
    assert build_index(DATASET, "pq-test", 32, "synth-ivf-mem", force=True, **kw)["n"] == 2700  # retrained alike
    r = refresh_index("synth-ivf-disk", settings=cfg)
    assert (r["status"], r["version"], r["n"], r["based_on"]) == ("published", 2, 2700, None)
    b2 = ix.read_build(store, "synth-ivf-disk", 2)
    assert b2.mode == "build" and b2.plan["ondisk"] and b2.merge_on_disk_requested is True
    same_top10(2, cached=True)

    store.delete(layout.codes_key(DATASET, "pq-test", 0))  # a shard removed, with a stated reason
    with pytest.raises(ix.IndexBuildError, match="allow_removal"):
        refresh_index("synth-ivf-disk", settings=cfg)
    r = refresh_index("synth-ivf-disk", allow_removal="part 0 withdrawn", settings=cfg)
    assert (r["version"], r["n"]) == (3, 2400) and ix.read_build(store, "synth-ivf-disk", 3).plan["ondisk"]
    hits = Searcher(store, "synth-ivf-disk", cache_dir=str(tmp_path / "cache")).search(queries, k=10, nprobe=32,
                                                                                        with_metadata=False)
    assert hits.version == 3 and not np.isin(hits.ids, 1_000_000 + np.arange(ROWS)).any()  # part 0's ids
