"""IVF coarse-quantizer training: sample size and k-means iterations vs train time and recall.

Usage: PYTHONPATH=. python bench/ivf_train.py [--store file:///tmp/scale] [--coder pq-64-scale]
           [--configs 39x10,64x10,64x20,128x10] [--queries 1000] [--threads 2]
       [--items 1000000]  (when the store holds no codes yet, `bench/scale.py --items N --stages
       features,coder,codes` makes them first)

For each config `PxI` (P sample rows per list, I k-means iterations) the IVF-PQ over all stored codes
is trained (`infra.code_index.train_ivf`, timed), filled (`add_codes`) and searched with `--queries`
noisy queries (bench/scale.py's): recall@10 (tie-aware) against the exhaustive scan of the same
codes at every power-of-two nprobe, the smallest nprobe reaching 0.95 (what the build tunes to),
and ms/query (batched, one thread) at that nprobe. nlist is the plan's (`ivf_nlist(N)`).
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", default="file:///tmp/scale")
    p.add_argument("--coder", default="pq-64-scale")
    p.add_argument("--dataset", default="scale")
    p.add_argument("--configs", default="39x10,64x10,64x20,128x10")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--target", type=float, default=0.95)
    p.add_argument("--items", type=int, default=1_000_000, help="synthetic items when the codes must be made")
    a = p.parse_args()
    import faiss
    import pyarrow.parquet as pq

    from bench.scale import clustered
    from encoders.metrics import tie_aware_recall
    from infra import indexes as ix
    from infra import layout
    from infra.planner import select_shards
    from infra.registry import load_coder
    from infra.settings import Settings
    from infra.shards import codes_matrix
    from infra.store import open_store

    faiss.omp_set_num_threads(a.threads)
    store = open_store(Settings.load(store=a.store))
    if not select_shards(store.list(layout.codes_prefix(a.dataset, a.coder))):
        import subprocess

        subprocess.run([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "scale.py"),
                        "--items", str(a.items), "--store", a.store, "--stages", "features,coder,codes"], check=True)
    coder, _ = load_coder(store, a.coder)
    keys = [r.key for r in select_shards(store.list(layout.codes_prefix(a.dataset, a.coder)))]
    codes = np.concatenate([codes_matrix(pq.read_table(io.BytesIO(store.read_bytes(k)), columns=["code"]))
                            for k in keys])
    n, bits = len(codes), coder.full_bits
    plan = ix.choose_index(n, coder.bytes_per_item(bits), "adc", 2**40, adc_engine=ix.PQ_LUT,
                           index_type="ivf-pq", codec=ix.codec_of(coder, bits))
    print(harness.machine_line())
    print(f"N={n:,}, {plan.factory}, nlist {plan.nlist}, {len(keys)} shards, faiss threads {a.threads}, "
          f"load {harness.load_avg()}")
    rng = np.random.default_rng(7)
    q = np.concatenate([clustered(int(s), 200, coder.pq.d, 0)[1][:1] for s in rng.integers(0, len(keys), a.queries)])
    q += rng.normal(scale=0.5, size=q.shape).astype(np.float32)
    qp = ix.prepare_queries(plan, coder, bits, q)
    flat_plan = ix.choose_index(n, plan.bytes_per_item, "adc", 2**40, adc_engine=ix.PQ_LUT)
    flat = ix.new_index(flat_plan, coder, bits)
    ix.add_codes(flat, flat_plan, coder, bits, codes)
    kth = -flat.search(qp, 10)[0][:, 9]
    rows = []
    for cfg in a.configs.split(","):
        per, niter = (int(v) for v in cfg.split("x"))
        want = min(n, plan.nlist * per)
        sample = codes[np.sort(np.random.default_rng(0).choice(n, want, replace=False))]
        load = harness.load_avg()
        t0 = time.perf_counter()
        trained = ix.train_ivf(plan, coder, bits, sample, niter=niter)
        train_s = time.perf_counter() - t0
        idx = ix.new_index(plan, coder, bits, trained)
        t0 = time.perf_counter()
        ix.add_codes(idx, plan, coder, bits, codes)
        add_s = time.perf_counter() - t0
        tried, tuned = {}, None
        for npb in ix.nprobe_candidates(plan.nlist):
            d, _ = idx.search(qp, 10, params=faiss.SearchParametersIVF(nprobe=npb))
            tried[npb] = tie_aware_recall(-d, kth, 10)
            if tried[npb] >= a.target and tuned is None:
                tuned = npb
            if npb >= 4 * (tuned or plan.nlist):
                break
        faiss.omp_set_num_threads(1)
        t0 = time.perf_counter()
        idx.search(qp, 10, params=faiss.SearchParametersIVF(nprobe=tuned))
        ms = (time.perf_counter() - t0) * 1e3 / len(qp)
        faiss.omp_set_num_threads(a.threads)
        rows.append([f"{per}/list x {niter} it", want, round(train_s, 1), round(add_s, 1), tuned,
                     round(tried[tuned], 4), round(ms, 3),
                     " ".join(f"{k}:{v:.3f}" for k, v in tried.items()), load])
        print("  ", rows[-1], flush=True)
    print()
    harness.print_table(["sample", "train rows", "train s", "add s", "tuned nprobe", "recall@10 at tuned",
                         "ms/query at tuned (1 thread)", "recall@10 by nprobe", "load 1/5/15"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
