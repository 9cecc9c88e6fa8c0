"""Dask: the encode and index-build stages on a LocalCluster of 1 and 2 worker processes (and the
thread runner beside them), one `codeshard` process per run, alternated; speed-up 1 -> 2 workers.

Usage: .venv/bin/python bench/dask_scaling.py [--full] [--rows N] [--shard-rows 10000] [--reps N]
                                             [--store file:///tmp/dask_scaling]

Setup (untimed): `ingest glove --limit ROWS`, train-coder pq@64 and itq@48 (thread runner).
Timed, per round, in the order threads, dask-1, dask-2:
- encode --force with pq-64 and itq-48 over every shard (2 x shards tasks; PQ encode dominates);
- index build --force of pq-64 (pq-lut: count, batch tasks, merge, evaluate);
- encode without --force (every shard skipped): the fixed cost of a run on that runner (process,
  imports, LocalCluster start, Prefect flow run) plus the per-task cost of a task that does nothing.
Dask runs use `--runner dask --dask-workers N` (infra/runners.py: N single-threaded worker
processes, OMP_NUM_THREADS=1); the thread runner uses max_workers=2. Peak RSS is the CLI process's
and its waited-for descendants' maximum (one worker process at most, not their sum).
Default (what `make bench` runs, ~2 min): 100,000 rows, 1 round. `--full` (the BENCHMARKS.md
table, ~8 min): 400,000 rows, 2 rounds.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import harness
from harness import stages as S

MODEL = "glove-6b-50d"
PQ, ITQ = f"pq-64-{MODEL}", f"itq-48-{MODEL}"
RUNNERS = {"threads (2)": ["--runner", "threads", "--max-workers", "2"],
           "dask 1 worker": ["--runner", "dask", "--dask-workers", "1"],
           "dask 2 workers": ["--runner", "dask", "--dask-workers", "2"]}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=None, help="default 100,000 (--full: 400,000)")
    p.add_argument("--shard-rows", type=int, default=10_000)
    p.add_argument("--reps", type=int, default=None, help="default 1 (--full: 2)")
    p.add_argument("--store", default="file:///tmp/dask_scaling")
    p.add_argument("--full", action="store_true", help="400,000 rows, 2 rounds")
    harness.add_device_arg(p)
    a = p.parse_args()
    a.rows = a.rows or (400_000 if a.full else 100_000)
    a.reps = a.reps or (2 if a.full else 1)
    return a


def main() -> int:
    args = parse_args()
    harness.require_device(args.device)
    harness.header(f"Dask LocalCluster 1 vs 2 workers: encode + index build, GloVe {args.rows:,} rows "
                   f"in shards of {args.shard_rows:,}")
    print(f"load before: {harness.load_avg()}")
    t0 = time.perf_counter()
    st = args.store
    S.fresh_store(st)
    res: dict[tuple[str, str], list[S.StageRun]] = {}
    with S.PrefectServer() as srv:
        print(f"prefect server: {srv.url} (start-up {srv.startup_s:.1f} s)")
        S.run_stage("ingest", S.cli("ingest", "glove", "--limit", str(args.rows), "--rows-per-shard",
                                    str(args.shard_rows), store=st))
        S.run_stage("train", S.cli("train-coder", "--dataset", "glove", "--features", MODEL, "--method", "pq",
                                   "--bits", "64", store=st))
        S.run_stage("train", S.cli("train-coder", "--dataset", "glove", "--features", MODEL, "--method", "itq",
                                   "--bits", "48", store=st))
        jobs = {
            "encode --force (pq-64 + itq-48)": ["encode", "--dataset", "glove", "--features", MODEL, "--coder",
                                                f"{PQ},{ITQ}", "--force"],
            "index build --force pq-64": ["index", "build", "--dataset", "glove", "--coder", PQ, "--name",
                                          "glove-pq-64", "--force"],
            "encode, all skipped (fixed cost)": ["encode", "--dataset", "glove", "--features", MODEL, "--coder",
                                                 f"{PQ},{ITQ}"],
        }
        for rep in range(args.reps):
            for rname, flags in RUNNERS.items():
                for jname, argv in jobs.items():
                    r = S.run_stage(jname, S.cli(*argv, store=st, extra=flags))
                    res.setdefault((jname, rname), []).append(r)
                    print(f"  round {rep + 1} {rname:15s} {jname}: {r.wall_s:.1f} s wall, {r.cpu_s:.1f} s CPU, "
                          f"{S.mib(r.peak_rss)} MiB, load {r.load}", flush=True)
    S.fresh_store(st)
    med = {k: statistics.median(r.wall_s for r in v) for k, v in res.items()}
    rows = []
    for jname in jobs:
        for rname in RUNNERS:
            v = res[(jname, rname)]
            rows.append([jname, rname, round(med[(jname, rname)], 1), harness.spread([r.wall_s for r in v]),
                         round(statistics.median(r.cpu_s for r in v), 1), max(S.mib(r.peak_rss) for r in v),
                         " / ".join(r.load.split()[0] for r in v)])
    print()
    harness.print_table(["job", "runner", "wall s (median)", "wall s range", "CPU s (median, CLI + waited children)",
                         "peak RSS MiB", "load (1 min) per round"], rows)
    fixed = "encode, all skipped (fixed cost)"
    print()
    srows = []
    for jname in list(jobs)[:2]:
        one, two, thr = med[(jname, "dask 1 worker")], med[(jname, "dask 2 workers")], med[(jname, "threads (2)")]
        f1, f2 = med[(fixed, "dask 1 worker")], med[(fixed, "dask 2 workers")]
        ex = (one - f1) / (two - f2) if two - f2 > 0 else float("nan")
        srows.append([jname, round(one / two, 2), round(ex, 2) if jname.startswith("encode") else "n/a",
                      round(thr / two, 2)])
    harness.print_table(["job", "speed-up dask 1 -> 2 workers (wall)",
                         "speed-up excl. the skipped run's cost (encode only)", "threads(2) wall / dask-2 wall"], srows)
    print(f"\nwhole run {time.perf_counter() - t0:.0f} s; load after: {harness.load_avg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
