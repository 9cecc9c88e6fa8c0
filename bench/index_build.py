"""Index build: our `build_index` flow vs bare faiss on the same stored codes, per index type.

Usage: .venv/bin/python bench/index_build.py [--full] [--rows N] [--shard-rows 10000] [--reps N]
           [--types binary-flat,binary-ivf,pq-lut,flat,ivf-flat,hnsw] [--threads 1]
           [--store file:///tmp/index_build]

Setup (untimed, CLI processes): `ingest glove --limit ROWS`, train-coder itq@48, pq@64, float,
encode. Then, in this process, per index type, alternately (flow, bare+I/O, bare faiss, ...):
- flow: `flows.build_index.build_index(..., force=True, index_type=T)` on the thread runner, as
  `codeshard index build` calls it: plan (footer row counts), [IVF: train on a code sample], batch
  tasks (read code shards from the store, drop the query rows, add to a partial index, stage it),
  merge into a claimed version, evaluate (500 queries: recall@10 vs the coder's exact ranking and
  200 single-query latencies), write build.json, move CURRENT.
- bare+I/O: what a hand-written script does with the same stored codes: read every code shard
  (pyarrow), build the same faiss index ([train on the same sample size] + add), serialise it
  and write it to a file. No query-row filtering, no staging, no evaluation.
- bare faiss: the faiss calls alone on codes already in memory ([train] + add).
- skip: the flow again without force (CURRENT covers the shards: nothing is built): the fixed
  per-run cost (Prefect flow run, listing, CURRENT + build.json reads).
The types: binary-flat (ITQ-48 codes), binary-ivf (the same codes, forced), pq-lut (PQ-64 codes,
faiss IndexPQ fed with add_sa_codes), flat / ivf-flat / hnsw (the float coder's codes = the
features). Target: flow <= 1.3x bare. Default (what `make bench` runs, ~3 min): 50,000 rows,
2 rounds, no hnsw. `--full` (the BENCHMARKS.md table, ~10 min): 200,000 rows, 3 rounds, every type.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import harness
from harness import stages as S

# the flow runs in this process: keep its logs off the table, and off the API after the server stops
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_LOGGING_TO_API_ENABLED", "false")

MODEL = "glove-6b-50d"
TYPES = {"binary-flat": f"itq-48-{MODEL}", "binary-ivf": f"itq-48-{MODEL}", "pq-lut": f"pq-64-{MODEL}",
         "flat": f"float-{MODEL}", "ivf-flat": f"float-{MODEL}", "hnsw": f"float-{MODEL}"}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=None, help="default 50,000 (--full: 200,000)")
    p.add_argument("--shard-rows", type=int, default=10_000)
    p.add_argument("--reps", type=int, default=None, help="default 2 (--full: 3)")
    p.add_argument("--types", default=None, help="default: all but hnsw (--full: all)")
    p.add_argument("--threads", type=int, default=1, help="faiss/BLAS threads on both sides (0: library default)")
    p.add_argument("--store", default="file:///tmp/index_build")
    p.add_argument("--full", action="store_true", help="200,000 rows, 3 rounds, every type")
    harness.add_device_arg(p)
    a = p.parse_args()
    a.rows = a.rows or (200_000 if a.full else 50_000)
    a.reps = a.reps or (3 if a.full else 2)
    a.types = a.types or ",".join(t for t in TYPES if a.full or t != "hnsw")
    return a


def setup(store: str, rows: int, shard_rows: int) -> None:
    S.fresh_store(store)
    S.run_stage("ingest", S.cli("ingest", "glove", "--limit", str(rows), "--rows-per-shard", str(shard_rows), store=store))
    for m, b in (("itq", 48), ("pq", 64), ("float", 64)):
        S.run_stage("train", S.cli("train-coder", "--dataset", "glove", "--features", MODEL, "--method", m,
                                   "--bits", str(b), store=store))
    S.run_stage("encode", S.cli("encode", "--dataset", "glove", "--features", MODEL, "--coder",
                                ",".join(sorted(set(TYPES.values()))), store=store))


def shard_paths(store: str, coder_id: str) -> list[str]:
    root = os.path.join(S.store_path(store), "codes", "glove", coder_id)
    return sorted(os.path.join(root, f) for f in os.listdir(root) if f.endswith(".parquet"))


def read_codes(paths: list[str]):
    import numpy as np
    import pyarrow.parquet as pq

    from infra.shards import codes_matrix

    return np.concatenate([codes_matrix(pq.read_table(p, columns=["id", "code"])) for p in paths])


def bare_build(index_type: str, coder, codes, train_rows: int):
    """The faiss index of `index_type` over full-length stored `codes` (n, B) uint8, built the
    plain way; IVF types train on the first `train_rows` codes of a fixed permutation."""
    import faiss
    import numpy as np

    from infra import indexes as ix

    n, b = codes.shape
    if index_type == "binary-flat":
        idx = faiss.IndexBinaryFlat(8 * b)
        idx.add(codes)
    elif index_type == "binary-ivf":
        nlist = ix.ivf_nlist(n)
        idx = faiss.IndexBinaryIVF(faiss.IndexBinaryFlat(8 * b), 8 * b, nlist)
        idx.cp.niter = ix.IVF_TRAIN_NITER
        sample = codes[np.random.default_rng(0).permutation(n)[:train_rows]]
        idx.train(sample)
        idx.add(codes)
    elif index_type == "pq-lut":
        pq_ = coder.pq
        idx = faiss.IndexPQ(pq_.d, pq_.M, pq_.nbits)
        faiss.copy_array_to_vector(faiss.vector_to_array(pq_.centroids), idx.pq.centroids)
        idx.is_trained = True
        idx.add_sa_codes(codes)
    else:
        x = codes.view(np.float32)
        d = x.shape[1]
        if index_type == "flat":
            idx = faiss.IndexFlatL2(d)
        elif index_type == "ivf-flat":
            idx = faiss.IndexIVFFlat(faiss.IndexFlatL2(d), d, ix.ivf_nlist(n), faiss.METRIC_L2)
            idx.cp.seed, idx.cp.niter = 1234, ix.IVF_TRAIN_NITER
            idx.train(x[np.random.default_rng(0).permutation(n)[:train_rows]])
        else:
            idx = faiss.IndexHNSWFlat(d, ix.HNSW_M)
        idx.add(x)
    return idx


def main() -> int:
    args = parse_args()
    harness.require_device(args.device)
    harness.set_threads(args.threads)
    types = [t for t in args.types.split(",") if t]
    harness.header(f"index build: flow vs bare faiss, GloVe {args.rows:,} rows in shards of {args.shard_rows:,}")
    print(harness.threads_line())
    t_all = time.perf_counter()
    with S.PrefectServer() as srv:
        print(f"prefect server: {srv.url} (start-up {srv.startup_s:.1f} s)")
        t0 = time.perf_counter()
        setup(args.store, args.rows, args.shard_rows)
        print(f"setup (ingest, train-coder x3, encode; CLI processes): {time.perf_counter() - t0:.1f} s")
        rows, detail = run_types(args, types)
    print()
    harness.print_table(["index type", "coder", "N", "flow s (median)", "flow s range", "bare+I/O s", "bare faiss s",
                         "flow / bare+I/O", "flow / bare faiss", "<= 1.3x bare+I/O?", "skip run s (fixed)",
                         "(flow - skip) / bare+I/O", "load 1/5/15"], rows)
    print()
    harness.print_table(["index type", "plan s", "train s", "add (batch tasks, wall) s", "merge s", "eval s",
                         "build.json total s", "flow wall - build.json total s (Prefect, CURRENT, artifact)",
                         "bare: read s", "bare: train+add s", "bare: serialise+write s"], detail)
    S.fresh_store(args.store)
    print(f"\nwhole run {time.perf_counter() - t_all:.0f} s; load after: {harness.load_avg()}")
    return 0


def run_types(args, types):
    import faiss

    from flows.build_index import build_index
    from infra import indexes as ix
    from infra.registry import load_coder
    from infra.runners import task_runner
    from infra.settings import Settings
    from infra.store import open_store

    cfg = Settings.load(store=args.store)
    store = open_store(cfg)
    flow = build_index.with_options(task_runner=task_runner(cfg))
    rows, detail = [], []
    out_dir = tempfile.mkdtemp(prefix="bench-index-")
    for t in types:
        coder_id = TYPES[t]
        coder, _ = load_coder(store, coder_id)
        paths = shard_paths(args.store, coder_id)
        codes = read_codes(paths)
        n = len(codes)
        nlist = ix.ivf_nlist(n)
        train_rows = ix.ivf_train_rows(nlist)  # the flow's sample size
        name = f"bench-{t}"
        last: dict = {}
        parts: dict[str, list[float]] = {"read": [], "build": [], "write": []}

        def flow_side():
            last["res"] = flow(dataset="glove", coder_id=coder_id, name=name, force=True, index_type=t,
                               settings={"store": args.store})

        def bare_io_side():
            t1 = time.perf_counter()
            c = read_codes(paths)
            t2 = time.perf_counter()
            idx = bare_build(t, coder, c, train_rows)
            t3 = time.perf_counter()
            with open(os.path.join(out_dir, "index.faiss"), "wb") as f:
                f.write(ix.index_to_bytes(idx))
            parts["read"].append(t2 - t1)
            parts["build"].append(t3 - t2)
            parts["write"].append(time.perf_counter() - t3)

        def bare_side():
            bare_build(t, coder, codes, train_rows)

        load = harness.load_avg()
        times = harness.interleave({"flow": flow_side, "bare+io": bare_io_side, "bare": bare_side}, args.reps)
        skip = [harness.timed(lambda: flow(dataset="glove", coder_id=coder_id, name=name, force=False,
                                           index_type=t, settings={"store": args.store}))
                for _ in range(max(2, args.reps))]
        fm, bio, b, sk = (statistics.median(times["flow"]), statistics.median(times["bare+io"]),
                          statistics.median(times["bare"]), statistics.median(skip))
        res = last["res"]
        sec = res.get("seconds") or {}
        print(f"  {t}: flow {fm:.2f} s, bare+io {bio:.2f} s, bare {b:.3f} s, skip {sk:.2f} s (N={res['n']}, "
              f"{res['index_type']}), load {load}", flush=True)
        rows.append([t, coder_id.split("-glove")[0], res["n"], fm, harness.spread(times["flow"]),
                     bio, b, fm / bio, fm / b, "yes" if fm / bio <= 1.3 else "**no**", sk, (fm - sk) / bio, load])
        detail.append([t, sec.get("plan", 0.0), sec.get("train", 0.0), sec.get("add_wall", 0.0),
                       sec.get("merge", 0.0), sec.get("eval", 0.0), sec.get("total", 0.0),
                       fm - sec.get("total", 0.0), statistics.median(parts["read"]),
                       statistics.median(parts["build"]), statistics.median(parts["write"])])
        del codes
        if args.threads > 0:  # the flow's evaluation sets faiss to 1 thread and restores: keep it as asked
            faiss.omp_set_num_threads(args.threads)
    shutil.rmtree(out_dir, ignore_errors=True)
    return rows, detail


if __name__ == "__main__":
    sys.exit(main())
