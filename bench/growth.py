"""Growth: the GloVe pipeline at 1x, 2x and 4x the shards (same shard size), one process per stage:
wall time, CPU seconds and peak RSS per stage and scale, and each stage's RSS relative to 1x.

Usage: .venv/bin/python bench/growth.py [--full] [--base-rows N] [--scales 1,2,4] [--shard-rows N]
                                       [--store-prefix file:///tmp/growth]

Per scale s, a fresh store with the first s x base-rows GloVe vectors (`ingest glove --limit`), then
train-coder (itq@48; pq, float @64), encode (the three coders), index build (binary-flat ITQ-48,
pq-lut PQ-64, flat float). Target (ARCHITECTURE.md): peak RSS of a streaming stage must not grow
with the number of shards (within 10 % from 1x to 4x). An index's final structure is N x bytes per
item by construction (every index type here holds all codes), so index-build RSS is expected to
grow by a multiple of that; the table prints N x B beside it to check the growth is that and no more.
Default (what `make bench` runs, ~3 min): base 25,000 rows in shards of 5,000 (5 / 10 / 20 shards).
`--full` (the BENCHMARKS.md table, ~6 min): base 100,000 rows in shards of 10,000 (10 / 20 / 40 shards).
"""
from __future__ import annotations

import argparse
import sys
import time

import harness
from harness import stages as S

MODEL = "glove-6b-50d"
CODERS = {"itq-48": ("itq", 48, 6), "pq-64": ("pq", 64, 8), "float": ("float", 64, 200)}  # bytes per item


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-rows", type=int, default=None, help="default 25,000 (--full: 100,000)")
    p.add_argument("--scales", default="1,2,4")
    p.add_argument("--shard-rows", type=int, default=None, help="default 5,000 (--full: 10,000)")
    p.add_argument("--store-prefix", default="file:///tmp/growth")
    p.add_argument("--runner", choices=("threads", "dask"), default="threads")
    p.add_argument("--full", action="store_true", help="base 100,000 rows in shards of 10,000")
    harness.add_device_arg(p)
    a = p.parse_args()
    a.base_rows = a.base_rows or (100_000 if a.full else 25_000)
    a.shard_rows = a.shard_rows or (10_000 if a.full else 5_000)
    return a


def coder_id(key: str) -> str:
    m, b, _ = CODERS[key]
    return f"float-{MODEL}" if m == "float" else f"{m}-{b}-{MODEL}"


def run_scale(args, scale: int) -> list[tuple[str, S.StageRun, int]]:
    rows = scale * args.base_rows
    store = f"{args.store_prefix}-{scale}x"
    S.fresh_store(store)
    ex = ["--runner", args.runner]
    out = []

    def stage(name, *cli_args, nbytes=0):
        r = S.run_stage(name, S.cli(*cli_args, store=store, extra=ex))
        out.append((name, r, nbytes))
        print(f"  {scale}x {name}: {r.wall_s:.1f} s, {S.mib(r.peak_rss)} MiB, load {r.load}", flush=True)

    stage("ingest", "ingest", "glove", "--limit", str(rows), "--rows-per-shard", str(args.shard_rows))
    stage("train-coder itq@48", "train-coder", "--dataset", "glove", "--features", MODEL, "--method", "itq", "--bits", "48")
    stage("train-coder pq,float@64", "train-coder", "--dataset", "glove", "--features", MODEL, "--method", "pq,float",
          "--bits", "64")
    stage("encode (3 coders)", "encode", "--dataset", "glove", "--features", MODEL, "--coder",
          ",".join(coder_id(k) for k in CODERS))
    n_db = rows - 1000  # the 1,000 query rows are not indexed
    for key, (_, _, b) in CODERS.items():
        stage(f"index build {key}", "index", "build", "--dataset", "glove", "--coder", coder_id(key),
              "--name", f"glove-{key}", nbytes=n_db * b)
    S.fresh_store(store)
    return out


def main() -> int:
    args = parse_args()
    harness.require_device(args.device)
    scales = [int(s) for s in args.scales.split(",")]
    harness.header(f"growth: GloVe at {', '.join(f'{s}x' for s in scales)} of {args.base_rows:,} rows "
                   f"(shards of {args.shard_rows:,}), one process per stage, {args.runner} runner")
    print(f"load before: {harness.load_avg()}")
    t0 = time.perf_counter()
    results: dict[int, list] = {}
    with S.PrefectServer() as srv:
        print(f"prefect server: {srv.url} (start-up {srv.startup_s:.1f} s)")
        for s in scales:
            results[s] = run_scale(args, s)
    base = {name: r for name, r, _ in results[scales[0]]}
    headers = ["stage"] + [f"{s}x wall s" for s in scales] + [f"{s}x CPU s" for s in scales] + \
              [f"{s}x peak RSS MiB" for s in scales] + [f"RSS {scales[-1]}x / {scales[0]}x", "flat (<= 1.10)?",
                                                       f"N x B at {scales[-1]}x MiB", "load at last scale"]
    rows = []
    for i, (name, _, _) in enumerate(results[scales[0]]):
        per = [results[s][i][1] for s in scales]
        ratio = per[-1].peak_rss / base[name].peak_rss
        nb = results[scales[-1]][i][2]
        rows.append([name] + [round(r.wall_s, 1) for r in per] + [round(r.cpu_s, 1) for r in per] +
                    [S.mib(r.peak_rss) for r in per] + [round(ratio, 3), "yes" if ratio <= 1.10 else "**no**",
                                                        S.mib(nb) if nb else "", per[-1].load])
    print()
    print(f"rows: {', '.join(f'{s}x = {s * args.base_rows:,} ({-(-s * args.base_rows // args.shard_rows)} shards)' for s in scales)}")
    harness.print_table(headers, rows)
    print(f"\nwhole run {time.perf_counter() - t0:.0f} s; load after: {harness.load_avg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
