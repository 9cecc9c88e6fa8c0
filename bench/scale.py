"""Scale benchmark: N seeded clustered synthetic items through the real flows, per stage in its own
process (peak RSS per stage from wait4), one JSON line per stage and a markdown table at the end.

Usage: PYTHONPATH=. python bench/scale.py --items 1000000 [--shard-rows 100000] [--dim 64]
           [--index-type ivf-pq] [--store file:///tmp/scale] [--queries 1000] [--max-shard-tasks 8]
       --items 10000000 is the 10M run (the target machine: quiet, 2 cores, <= 4 GiB per stage).

Stages: features (write features + raw shards) -> coder (fit a 64-bit PQ on a 65,536-row sample,
register it) -> codes (the `encode` flow, forced so a rerun measures it again) -> index (the `build_index` flow: train the coarse
quantizer on a sample, per-batch partials, merge, nprobe tuned to recall@10 >= 0.95 on a fixed
query count, publish) -> bare (the same faiss work by hand, no flow: read every code shard, train on
the same sample size and iterations, add, write the index file: the index stage's reference; the
last line is the ratio) -> search (Searcher on a memory-mapped local copy: recall@10 against the
exhaustive scan of the same codes, ms/query one at a time). One Prefect server serves every stage.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

DATASET, MODEL, CODER = "scale", "synthetic-64", "pq-64-scale"
STAGES = ("features", "coder", "codes", "index", "bare", "search")


def clustered(part: int, rows: int, dim: int, seed: int = 0):
    import numpy as np

    centres = np.random.default_rng(seed).normal(size=(1000, dim)).astype(np.float32) * 3
    rng = np.random.default_rng(seed + 1 + part)
    y = rng.integers(0, len(centres), rows)
    return (np.int64(part) * 10_000_000 + np.arange(rows)), (centres[y] + rng.normal(size=(rows, dim))).astype(np.float32), y


def run_stage(a: argparse.Namespace) -> dict:
    import numpy as np
    import pyarrow as pa

    from infra import layout
    from infra.settings import Settings
    from infra.shards import features_table, write_table
    from infra.store import open_store

    cfg = {"store": a.store, "max_workers": a.workers, **({"max_shard_tasks": a.max_shard_tasks} if a.max_shard_tasks else {})}
    store = open_store(Settings.load(**cfg))
    parts = -(-a.items // a.shard_rows)
    out: dict = {}
    if a.stage == "features":
        for p in range(parts):
            rows = min(a.shard_rows, a.items - p * a.shard_rows)
            ids, x, y = clustered(p, rows, a.dim)
            write_table(store, layout.raw_key(DATASET, p), pa.table({"id": ids, "label": y.astype(np.int32),
                                                                     "split": ["database"] * rows}))
            write_table(store, layout.features_key(DATASET, MODEL, p), features_table(ids, x))
    elif a.stage == "coder":
        from encoders.coders import make_coder
        from infra.registry import register_coder

        x = np.concatenate([clustered(p, min(a.shard_rows, 65_536 // max(1, min(parts, 4)) + 1), a.dim)[1]
                            for p in range(min(parts, 4))])[:65_536]
        c = make_coder("pq", bits=64)
        c.fit(x, np.zeros(len(x), np.int64))
        register_coder(store, CODER, c.state(), {"dataset": DATASET, "model_id": MODEL, "method": "pq",
                                                 "lengths": list(c.lengths), "bits": c.full_bits})
    elif a.stage == "codes":
        from flows.generate_codes import encode

        encode(DATASET, MODEL, [CODER], force=True, settings=cfg)  # force: a rerun measures the work again
    elif a.stage == "index":
        from flows.build_index import build_index

        t0 = time.perf_counter()
        s = build_index(DATASET, CODER, None, "scale-pq", memory_budget="3GB", force=True,
                        index_type=a.index_type or None, settings=cfg)
        out = {"flow_s": time.perf_counter() - t0,
               **{k: s.get(k) for k in ("index_type", "n", "recall_at_10", "p50_ms", "version", "seconds")}}
    elif a.stage == "bare":
        out = bare_build(store, a)
    elif a.stage == "search":
        from infra.search import Searcher

        s = Searcher(store, "scale-pq", cache_dir=os.path.join(a.cache, "cache"))
        lv = s.current()
        rng = np.random.default_rng(7)
        q = np.concatenate([clustered(int(p), 200, a.dim, 0)[1][:1] for p in rng.integers(0, parts, a.queries)])
        q += rng.normal(scale=0.5, size=q.shape).astype(np.float32)
        ex = s.search(q, k=10, with_metadata=False, nprobe=lv.ci.plan.nlist or None)
        t0 = time.perf_counter()
        got = [s.search(q[i], k=10, with_metadata=False) for i in range(len(q))]
        ms = (time.perf_counter() - t0) * 1e3 / len(q)
        scores = np.concatenate([g.scores for g in got])
        kth = ex.scores[:, 9:10]
        out = {"recall_at_10": float((scores >= kth - 1e-4 * np.maximum(1, np.abs(kth))).mean()),
               "ms_per_query": ms, "nprobe": int(getattr(lv.ci.index, "nprobe", 0)),
               "index_type": lv.ci.plan.index_type}
    return out


def bare_build(store, a: argparse.Namespace) -> dict:
    """read codes + train + add + write, timed per step, with the index stage's plan, sample size and
    k-means iterations (`ix.ivf_train_rows`, IVF_TRAIN_NITER)."""
    import io

    import faiss
    import numpy as np
    import pyarrow.parquet as pq

    from infra import indexes as ix
    from infra import layout
    from infra.planner import select_shards
    from infra.registry import load_coder
    from infra.shards import codes_matrix

    coder, _ = load_coder(store, CODER)
    bits = coder.full_bits
    t0 = time.perf_counter()
    refs = select_shards(store.list(layout.codes_prefix(DATASET, CODER)))
    codes = np.concatenate([codes_matrix(pq.read_table(io.BytesIO(store.read_bytes(r.key)), columns=["code"]))
                            for r in refs])
    t1 = time.perf_counter()
    plan = ix.choose_index(len(codes), coder.bytes_per_item(bits), ix.index_kind(coder), ix.parse_bytes("3GB"),
                           adc_engine=ix.adc_engine_for(coder, bits), index_type=a.index_type or None,
                           codec=ix.codec_of(coder, bits))
    trained = None
    if plan.needs_training:
        rows = min(len(codes), ix.ivf_train_rows(plan.nlist))
        sample = codes[np.sort(np.random.default_rng(0).choice(len(codes), rows, replace=False))]
        trained = ix.train_ivf(plan, coder, bits, sample)
    t2 = time.perf_counter()
    idx = ix.new_index(plan, coder, bits, trained, final=True)
    ix.add_codes(idx, plan, coder, bits, codes)
    t3 = time.perf_counter()
    path = os.path.join(a.cache, "bare.faiss")
    os.makedirs(a.cache, exist_ok=True)
    (faiss.write_index_binary if plan.binary_storage else faiss.write_index)(idx, path)
    os.remove(path)
    return {"index_type": plan.index_type, "read_s": t1 - t0, "train_s": t2 - t1, "add_s": t3 - t2,
            "write_s": time.perf_counter() - t3, "work_s": time.perf_counter() - t0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--shard-rows", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--index-type", default="ivf-pq", help="type name or factory string; '' lets the rule choose")
    p.add_argument("--store", default="file:///tmp/scale")
    p.add_argument("--cache", default="/tmp/scale-cache")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--max-shard-tasks", type=int, default=0,
                   help="Settings.max_shard_tasks (0: its default); fewer task runs, each over a batch of shards")
    p.add_argument("--stages", default=",".join(STAGES))
    p.add_argument("--stage", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.stage:
        t0 = time.perf_counter()
        out = run_stage(a)
        from infra.store_counts import ACCESS  # every store read and write of this stage process

        print("RESULT " + json.dumps({"stage": a.stage, "wall_s": time.perf_counter() - t0, **out,
                                      "store_reads": sum(ACCESS.reads().values()),
                                      "store_writes": sum(ACCESS.writes().values())}, default=str))
        return
    from harness import stages as S

    with S.PrefectServer() as srv:  # one server for every stage (an ephemeral one per process times out under load)
        print(f"prefect server {srv.url} (start-up {srv.startup_s:.1f} s), load {os.getloadavg()}", flush=True)
        rows = run_stages(a)
    report(rows)


def run_stages(a: argparse.Namespace) -> list[dict]:
    rows = []
    for stage in a.stages.split(","):
        argv = [sys.executable, __file__, *sys.argv[1:], "--stage", stage]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.getcwd(),
                                "PREFECT_LOGGING_LEVEL": "WARNING"})
        stdout = proc.stdout.read()
        _, status, ru = os.wait4(proc.pid, 0)
        if status:
            sys.exit(f"stage {stage} failed ({status}):\n{stdout[-3000:]}")
        res = json.loads([ln for ln in stdout.splitlines() if ln.startswith("RESULT ")][-1][7:])
        res["peak_rss_mib"] = ru.ru_maxrss / 1024
        res["items_per_s"] = a.items / res["wall_s"]
        res["us_per_item"] = 1e6 * res["wall_s"] / a.items
        print(json.dumps(res, default=str), flush=True)
        rows.append(res)
    return rows


def report(rows: list[dict]) -> None:
    print("\n| stage | wall s | items/s | µs/item | peak RSS MiB |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['stage']} | {r['wall_s']:.1f} | {r['items_per_s']:,.0f} | {r['us_per_item']:.2f} | "
              f"{r['peak_rss_mib']:.0f} |")
    by = {r["stage"]: r for r in rows}
    if "index" in by and "bare" in by:
        print(f"\nindex stage / bare faiss (read + train + add + write): {by['index']['wall_s']:.1f} s / "
              f"{by['bare']['wall_s']:.1f} s = {by['index']['wall_s'] / by['bare']['wall_s']:.2f}x (stage processes); "
              f"the build_index call / the faiss work: {by['index']['flow_s']:.1f} s / {by['bare']['work_s']:.1f} s "
              f"= {by['index']['flow_s'] / by['bare']['work_s']:.2f}x (imports left out on both sides)")


if __name__ == "__main__":
    main()
