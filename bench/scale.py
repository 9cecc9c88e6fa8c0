"""Scale benchmark: N seeded clustered synthetic items through the real flows, per stage in its own
process (peak RSS per stage from wait4), one JSON line per stage and a markdown table at the end.

Usage: PYTHONPATH=. python bench/scale.py --items 1000000 [--shard-rows 100000] [--dim 64]
           [--index-type ivf-pq] [--store file:///tmp/scale] [--queries 1000]
       --items 10000000 is the 10M run (the target machine: quiet, 2 cores, <= 4 GiB per stage).

Stages: features (write features + raw shards) -> coder (fit a 64-bit PQ on a 65,536-row sample,
register it) -> codes (the `encode` flow) -> index (the `build_index` flow: train the coarse
quantizer on a sample, per-batch partials, merge, nprobe tuned to recall@10 >= 0.95 on a fixed
query count, publish) -> search (Searcher on a memory-mapped local copy: recall@10 against the
exhaustive scan of the same codes, ms/query one at a time).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

DATASET, MODEL, CODER = "scale", "synthetic-64", "pq-64-scale"
STAGES = ("features", "coder", "codes", "index", "search")


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

    cfg = {"store": a.store, "max_workers": a.workers}
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

        encode(DATASET, MODEL, [CODER], settings=cfg)
    elif a.stage == "index":
        from flows.build_index import build_index

        s = build_index(DATASET, CODER, None, "scale-pq", memory_budget="3GB", force=True,
                        index_type=a.index_type or None, settings=cfg)
        out = {k: s.get(k) for k in ("index_type", "n", "recall_at_10", "p50_ms", "version", "seconds")}
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
    p.add_argument("--stages", default=",".join(STAGES))
    p.add_argument("--stage", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.stage:
        t0 = time.perf_counter()
        out = run_stage(a)
        print("RESULT " + json.dumps({"stage": a.stage, "wall_s": time.perf_counter() - t0, **out}, default=str))
        return
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
    print(f"\n| stage | wall s | items/s | µs/item | peak RSS MiB |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['stage']} | {r['wall_s']:.1f} | {r['items_per_s']:,.0f} | {r['us_per_item']:.2f} | "
              f"{r['peak_rss_mib']:.0f} |")


if __name__ == "__main__":
    main()
