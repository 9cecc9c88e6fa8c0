"""Peak RSS of the extract flow alone: one `extract_features` run per fresh process (so nothing
else the bench does is counted), with the decode-ahead thread and with decoding inline.

Usage: .venv/bin/python bench/extract_rss.py [--shard-rows 10000] [--shards 7] [--reps 2]

Setup (not timed): a temp file:// store, Fashion-MNIST ingested by the real `ingest` flow in shards
of `--shard-rows` rows, an untrained SmallCNN registered as tests/helpers.py does. Each row: wall
seconds and `ru_maxrss` of a child process that runs the flow with force over `--shards` shards.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHILD = """
import resource, sys, time
store, mode, shards = sys.argv[1], sys.argv[2], sys.argv[3]
import tasks.extract as te
if mode == "inline":
    te.prefetched = lambda items, fn: map(fn, items)
from flows.extract_features import extract_features
t = time.perf_counter()
out = extract_features("fashion-mnist", "rss-cnn", shards, True, settings={"store": store, "max_workers": 2})
print(out["done"], round(time.perf_counter() - t, 1), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shard-rows", type=int, default=10_000)
    p.add_argument("--shards", type=int, default=7)
    p.add_argument("--reps", type=int, default=2)
    a = p.parse_args()
    sys.path.insert(0, str(ROOT))
    from flows.ingest import ingest
    from infra.settings import Settings
    from infra.store import open_store
    from tests.helpers import register_untrained_cnn

    with tempfile.TemporaryDirectory() as tmp:
        store = f"file://{tmp}/store"
        ingest("fashion-mnist", shard_rows=a.shard_rows, settings={"store": store})
        register_untrained_cnn(open_store(Settings.load(store=store)), "rss-cnn")
        print("| decode | shards done | wall s | peak RSS MiB |\n|---|---|---|---|")
        for _ in range(a.reps):
            for mode in ("ahead", "inline"):
                out = subprocess.run([sys.executable, "-c", CHILD, store, mode, f"0:{a.shards}"], cwd=ROOT,
                                     capture_output=True, text=True, check=True, env=os.environ | {"PYTHONPATH": str(ROOT)})
                done, wall, rss = out.stdout.split()[-3:]
                print(f"| {mode} | {done} | {wall} | {rss} |", flush=True)


if __name__ == "__main__":
    main()
