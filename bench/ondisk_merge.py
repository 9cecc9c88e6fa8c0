"""Peak RSS of the IVF merge step, in memory vs on disk (issue #18), each in a fresh process.

Usage: PYTHONPATH=. python bench/ondisk_merge.py [--items 1000000] [--batches 10] [--dim 64]
           [--nlist 1024] [--dir /tmp/ondisk-merge]

Setup (this process): a seeded clustered float set, an `IVF<nlist>,Flat` index trained on 65,536 rows,
and `--batches` partial index files (the batch tasks' staged partials, as files). Then one child
process per mode runs what `tasks.index.merge_index` does with the partials once they are local:
  memory: each partial's bytes read and deserialised (`code_index_from_bytes` path), `merge_from`
          onto the trained index, then serialised (`index_to_bytes`, as `write_version_files`);
  disk:   `ix.merge_ivf_on_disk` (labels shifted per partial, contrib.ondisk.merge_ondisk into one
          index.ivfdata), then serialised (list offsets and the file name only).
Store transfers are left out (the same for both modes, streamed). Peak RSS: the child's own ru_maxrss at
the end (what wait4 reports; it counts mapped file pages), and, sampled every 5 ms during the merge,
the peaks of RssAnon (private memory) and RssFile (mapped file pages: page cache the kernel can
evict or write back); its RSS after imports is the baseline; both modes' top-10 are compared on 100 queries.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time


def rss_kib() -> dict[str, int]:
    """RssAnon (private memory) and RssFile (mapped file pages, evictable) of this process, KiB."""
    out = {}
    for line in open("/proc/self/status"):
        if line.startswith(("RssAnon:", "RssFile:")):
            out[line.split(":")[0]] = int(line.split()[1])
    return out


def child(a: argparse.Namespace) -> None:
    import faiss
    import numpy as np

    from infra import indexes as ix

    base = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    peak = {"RssAnon": 0, "RssFile": 0}
    stop = threading.Event()

    def sample() -> None:  # every 5 ms: the peak of private and of file-backed resident memory
        while not stop.wait(0.005):
            for k, v in rss_kib().items():
                peak[k] = max(peak[k], v)

    threading.Thread(target=sample, daemon=True).start()
    trained = open(os.path.join(a.dir, "trained.faiss"), "rb").read()
    paths = [os.path.join(a.dir, f"partial-{i}.faiss") for i in range(a.batches)]
    work = os.path.join(a.dir, "disk")
    if a.mode == "disk":  # merge_ivf_on_disk rewrites the partials (label shift): it works on copies
        os.makedirs(work, exist_ok=True)
        subprocess.run(["cp", *paths, work], check=True)
    t0 = time.perf_counter()
    if a.mode == "memory":
        index = ix.index_from_bytes(trained, False)
        for p in paths:
            src = ix.index_from_bytes(open(p, "rb").read(), False)
            index.merge_from(src, index.ntotal)
            del src
        data = ix.index_to_bytes(index)
    else:
        index = ix.merge_ivf_on_disk(trained, [os.path.join(work, os.path.basename(p)) for p in paths],
                                     os.path.join(work, ix.IVFDATA_FILE))
        data = ix.index_to_bytes(index)
    seconds = time.perf_counter() - t0
    stop.set()
    q = np.load(os.path.join(a.dir, "queries.npy"))
    index.nprobe = 16
    d, i = index.search(q, 10)
    np.save(os.path.join(a.dir, f"top10-{a.mode}.npy"), np.concatenate([i.astype(np.float64), d], axis=1))
    print(json.dumps({"mode": a.mode, "ntotal": int(index.ntotal), "merge_s": round(seconds, 2),
                      "baseline_rss_mib": round(base / 2**20), "index_bytes": len(data),
                      "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                      "peak_anon_mib": round(peak["RssAnon"] / 1024), "peak_file_mib": round(peak["RssFile"] / 1024),
                      "faiss": faiss.__version__}))


def setup(a: argparse.Namespace) -> None:
    import faiss
    import numpy as np

    os.makedirs(a.dir, exist_ok=True)
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(1000, a.dim)).astype(np.float32) * 3
    per = -(-a.items // a.batches)

    def rows(b: int) -> np.ndarray:
        r = np.random.default_rng(1 + b)
        n = min(per, a.items - b * per)
        return (centres[r.integers(0, len(centres), n)] + r.normal(size=(n, a.dim))).astype(np.float32)

    idx = faiss.index_factory(a.dim, f"IVF{a.nlist},Flat")
    idx.cp.niter = 10
    idx.train(rows(0)[:65_536])
    trained = faiss.serialize_index(idx).tobytes()
    open(os.path.join(a.dir, "trained.faiss"), "wb").write(trained)
    for b in range(a.batches):
        x = rows(b)
        part = faiss.deserialize_index(np.frombuffer(trained, np.uint8))
        part.add(x)
        faiss.write_index(part, os.path.join(a.dir, f"partial-{b}.faiss"))
        if b == 0:
            np.save(os.path.join(a.dir, "queries.npy"), x[:100] + 0.05)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--batches", type=int, default=10)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--nlist", type=int, default=1024)
    p.add_argument("--dir", default="/tmp/ondisk-merge")
    p.add_argument("--fresh", action="store_true", help="rebuild the partials even if --dir has them")
    p.add_argument("--mode", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.mode:
        return child(a)
    import numpy as np

    t0 = time.perf_counter()
    if not os.path.exists(os.path.join(a.dir, f"partial-{a.batches - 1}.faiss")) or a.fresh:
        setup(a)
    print(json.dumps({"setup_s": round(time.perf_counter() - t0, 1), "items": a.items, "batches": a.batches,
                      "lists_mib": round(a.items * (4 * a.dim + 8) / 2**20)}))
    for mode in ("memory", "disk"):
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--mode", mode], stdout=subprocess.PIPE,
                             text=True, check=True).stdout
        print(out.strip().splitlines()[-1])
    m, d = (np.load(os.path.join(a.dir, f"top10-{x}.npy")) for x in ("memory", "disk"))
    print(json.dumps({"same_top10_ids_and_distances": bool((m == d).all())}))


if __name__ == "__main__":
    main()
