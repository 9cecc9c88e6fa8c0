"""GloVe 400k x 50 end to end through the real CLI: ingest -> train-coder -> encode -> index build
-> search, one fresh process per stage (its own wall time, CPU seconds and peak RSS).

Usage: .venv/bin/python bench/glove_scale.py [--rows 400000] [--shard-rows 10000]
           [--store file:///tmp/glove_scale] [--float-types ivf-flat,hnsw] [--quick] [--runner threads|dask]

Stages (each one `codeshard ...` process against a Prefect server started for the run):
- ingest glove --limit ROWS: the packaged vectors land as features/glove/glove-6b-50d/part-N
  (id, feature) and raw/glove/part-N (id, text = the word, label = -1, split); 1,000 queries,
  20,000 train, 1,000 val, the rest database (`infra.datasets.assign_unlabelled_splits`, seed 0).
- train-coder: itq at 48 bits (ITQ needs bits <= D = 50), lsh / pq / float at 64 bits. No DRQ:
  it is trained with labels (a proxy loss over classes); GloVe has none.
- encode: the four coders over every features shard.
- index build: one index per coder (the build chooses: binary-flat, binary-flat, pq-lut, flat), plus
  the float features forced to each of `--float-types` (ivf-flat, hnsw).
- search: every index searched with the 1,000 query rows (batch 1,000, faiss 1 thread) through
  infra.search.Searcher; recall@10 against exact float L2 brute force over the database (every row
  whose split is not 'query', what the indexes hold).
- then the same ingest / encode / index build again with nothing to do (every shard or index
  skipped): the fixed per-run cost of a stage process (interpreter, imports, Prefect flow run).
`--quick` (what `make bench` runs): 100,000 rows, float types ivf-flat only.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import harness
from harness import stages as S

MODEL = "glove-6b-50d"
CODERS = [("itq", 48), ("lsh", 64), ("pq", 64), ("float", 64)]


def coder_id(method: str, bits: int) -> str:
    return f"float-{MODEL}" if method == "float" else f"{method}-{bits}-{MODEL}"


def index_name(method: str, bits: int, index_type: str | None = None) -> str:
    return f"glove-{method}" + ("" if method == "float" else f"-{bits}") + (f"-{index_type}" if index_type else "")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=400_000)
    p.add_argument("--shard-rows", type=int, default=10_000)
    p.add_argument("--store", default="file:///tmp/glove_scale")
    p.add_argument("--float-types", default="ivf-flat,hnsw", help="extra forced index types for the float coder")
    p.add_argument("--runner", choices=("threads", "dask"), default="threads")
    p.add_argument("--quick", action="store_true", help="100,000 rows, float types ivf-flat only")
    p.add_argument("--keep", action="store_true", help="keep the store afterwards (default: removed)")
    p.add_argument("--no-skip-runs", action="store_true")
    p.add_argument("--recall-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--names", help=argparse.SUPPRESS)
    harness.add_device_arg(p)
    args = p.parse_args(argv)
    if args.quick:
        args.rows, args.float_types = min(args.rows, 100_000), "ivf-flat"
    return args


# -- the search stage (run in its own process: `--recall-worker`) ----------------------------------
def load_split_features(store, dataset: str = "glove") -> tuple:
    """(ids, x, is_query) over every features shard, joined with the raw split column by part.
    Memory: N x D float32 (80 MB at 400k x 50)."""
    import numpy as np

    from infra import layout
    from infra.planner import select_shards
    from infra.shards import features_matrix, read_table

    ids, xs, qs = [], [], []
    for ref in select_shards(store.list(layout.features_prefix(dataset, MODEL))):
        ft = read_table(store, ref.key)
        meta = read_table(store, layout.raw_key(dataset, ref.part), columns=["id", "split"])
        split = dict(zip(meta.column("id").to_numpy().tolist(), meta.column("split").to_pylist()))
        fid = ft.column("id").to_numpy()
        ids.append(fid)
        xs.append(features_matrix(ft))
        qs.append(np.fromiter((split[int(i)] == "query" for i in fid), bool, len(fid)))
    return np.concatenate(ids), np.concatenate(xs), np.concatenate(qs)


def exact_top_k(db: np.ndarray, q: np.ndarray, k: int):
    """Exact L2 top-k positions in `db` (faiss IndexFlatL2 on the BLAS path)."""
    import faiss

    faiss.cvar.distance_compute_blas_threshold = 20  # the shipped 128000 keeps 1k queries off BLAS
    idx = faiss.IndexFlatL2(db.shape[1])
    idx.add(db)
    return idx.search(q, k)[1]


def recall_worker(args: argparse.Namespace) -> int:
    """Search every index with the query split and print JSON: recall@10 vs exact float L2."""
    import numpy as np

    from infra.search import Searcher
    from infra.settings import Settings
    from infra.store import open_store

    harness.set_threads(1)
    store = open_store(Settings.load(store=args.store))
    t0 = time.perf_counter()
    ids, x, is_q = load_split_features(store)
    qx, db_ids, db = x[is_q], ids[~is_q], np.ascontiguousarray(x[~is_q])
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    truth = db_ids[exact_top_k(db, qx, 10)]
    exact_s = time.perf_counter() - t0
    out = {"queries": int(len(qx)), "database": int(len(db)), "load_s": load_s, "exact_s": exact_s, "indexes": {}}
    for name in args.names.split(","):
        s = Searcher(store, name, poll_seconds=0)
        lv = s.current()
        t0 = time.perf_counter()
        res = s.search(qx, 10, with_metadata=False)
        search_s = time.perf_counter() - t0
        hit = [len(set(res.ids[i].tolist()) & set(truth[i].tolist())) for i in range(len(qx))]
        out["indexes"][name] = {"recall_at_10": float(np.mean(hit)) / 10, "search_s": search_s,
                                "ms_per_query": 1e3 * search_s / len(qx), "n": lv.ci.ntotal,
                                "index_type": lv.ci.plan.index_type}
    print(json.dumps(out))
    return 0


# -- the run ---------------------------------------------------------------------------------------
def run_pipeline(args: argparse.Namespace, rows: int, store: str, float_types: list[str],
                 runner_flags: list[str], with_search: bool = True, coders=CODERS,
                 skip_runs: bool = True) -> tuple[list[S.StageRun], dict]:
    """Every stage of the GloVe pipeline as its own process; returns the runs and build summaries."""
    ex = runner_flags
    runs: list[S.StageRun] = []

    def stage(name, *cli_args, rows_=None):
        r = S.run_stage(name, S.cli(*cli_args, store=store, extra=ex))
        r.extra["rows"] = rows_
        runs.append(r)
        print(f"  {name}: {r.wall_s:.1f} s wall, {r.cpu_s:.1f} s CPU, peak RSS {S.mib(r.peak_rss)} MiB, "
              f"load {r.load}", flush=True)
        return r

    stage("ingest", "ingest", "glove", "--limit", str(rows), "--rows-per-shard", str(args.shard_rows), rows_=rows)
    by_bits: dict[int, list[str]] = {}
    for m, b in coders:
        by_bits.setdefault(b, []).append(m)
    for b, ms in by_bits.items():
        stage(f"train-coder {','.join(ms)} @{b}", "train-coder", "--dataset", "glove", "--features", MODEL,
              "--method", ",".join(ms), "--bits", str(b))
    ids = [coder_id(m, b) for m, b in coders]
    stage(f"encode ({len(ids)} coders)", "encode", "--dataset", "glove", "--features", MODEL, "--coder",
          ",".join(ids), rows_=rows * len(ids))
    builds, names = {}, []
    jobs = [(m, b, None) for m, b in coders] + [("float", 64, t) for t in float_types if any(m == "float" for m, _ in coders)]
    for m, b, t in jobs:
        name = index_name(m, b, t)
        extra = ["--index-type", t] if t else []
        r = stage(f"index build {name}", "index", "build", "--dataset", "glove", "--coder", coder_id(m, b),
                  "--name", name, *extra, rows_=rows)
        builds[name] = r.out
        names.append(name)
    recall = None
    if with_search:
        argv = [sys.executable, os.path.abspath(__file__), "--recall-worker", "--store", store, "--names", ",".join(names)]
        r = S.run_stage(f"search + recall ({len(names)} indexes)", argv)
        runs.append(r)
        recall = r.out
        print(f"  search: {r.wall_s:.1f} s wall, peak RSS {S.mib(r.peak_rss)} MiB", flush=True)
    if skip_runs:
        stage("ingest (all skipped)", "ingest", "glove", "--limit", str(rows), "--rows-per-shard", str(args.shard_rows))
        stage(f"encode (all skipped, {len(ids)} coders)", "encode", "--dataset", "glove", "--features", MODEL,
              "--coder", ",".join(ids))
        m, b = coders[0]
        stage(f"index build {index_name(m, b)} (skipped)", "index", "build", "--dataset", "glove",
              "--coder", coder_id(m, b), "--name", index_name(m, b))
    return runs, {"builds": builds, "recall": recall}


def stage_table(runs: list[S.StageRun]) -> None:
    rows = []
    for r in runs:
        n = r.extra.get("rows")
        rows.append([r.name, round(r.wall_s, 1), round(r.cpu_s, 1), S.mib(r.peak_rss),
                     f"{n / r.wall_s:,.0f}" if n else "", r.load])
    harness.print_table(["stage (one process each)", "wall s", "CPU s", "peak RSS MiB", "rows/s (wall)",
                         "load 1/5/15 before"], rows)


def index_table(info: dict) -> None:
    rows = []
    rec = (info.get("recall") or {}).get("indexes", {})
    for name, b in info["builds"].items():
        b = b or {}
        sec = b.get("seconds") or {}
        rr = rec.get(name, {})
        rows.append([name, b.get("index_type"), b.get("n"), round(sec.get("total", 0.0), 1),
                     round(sec.get("add_wall", 0.0), 2), round(sec.get("merge", 0.0), 2), round(sec.get("train", 0.0), 2),
                     round(sec.get("eval", 0.0), 2), b.get("recall_at_10"),
                     round(rr["recall_at_10"], 3) if rr else "", round(rr["ms_per_query"], 3) if rr else "",
                     b.get("p50_ms")])
    harness.print_table(["index", "type", "N", "build s (build.json total)", "add s", "merge s", "train s", "eval s",
                         "recall@10 vs own codes (build.json)", "recall@10 vs exact float L2",
                         "ms/query (batch 1,000, 1 thread)", "p50 ms (batch 1)"], rows)
    r = info.get("recall") or {}
    if r:
        print(f"\n{r['queries']} queries vs {r['database']:,} database rows; exact float top-10 by IndexFlatL2 "
              f"in {r['exact_s']:.1f} s; features loaded in {r['load_s']:.1f} s.")


def main() -> int:
    args = parse_args()
    harness.require_device(args.device)
    if args.recall_worker:
        return recall_worker(args)
    harness.header(f"GloVe {args.rows:,} x 50 end to end, one process per stage ({args.runner} runner)")
    print(f"store: {args.store}; shards of {args.shard_rows:,} rows; load before: {harness.load_avg()}")
    S.fresh_store(args.store)
    t0 = time.perf_counter()
    flags = ["--runner", args.runner]
    with S.PrefectServer() as srv:
        print(f"prefect server: {srv.url} (start-up {srv.startup_s:.1f} s)")
        runs, info = run_pipeline(args, args.rows, args.store,
                                  [t for t in args.float_types.split(",") if t], flags,
                                  skip_runs=not args.no_skip_runs)
    print()
    stage_table(runs)
    print()
    index_table(info)
    print(f"\nwhole run {time.perf_counter() - t0:.0f} s; load after: {harness.load_avg()}")
    if not args.keep:
        S.fresh_store(args.store)
    return 0


if __name__ == "__main__":
    sys.exit(main())
