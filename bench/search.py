"""Brute-force search: our coders' `search` vs faiss flat indexes over the same codes, same bytes.

Usage: .venv/bin/python bench/search.py [--db fmnist|glove] [--bits 64] [--k 10] [--threads 1]
                                       [--reps 3] [--b1-queries 20] [--device cpu|cuda]

Pairs (ours vs faiss), both sides start from float queries and return the top k:
- lsh / itq / llc (binary, `bits`): `coder.search(q, codes, k)` (encode queries, `hamming_scores`
  over all codes, argpartition) vs `faiss.IndexBinaryFlat(bits).search(coder.encode(q), k)`.
- hamming kernel (lsh codes, queries encoded beforehand): `hamming_scores` alone (full score matrix,
  no top-k) vs IndexBinaryFlat.search: where the time of the lsh row goes.
- (proposal) lsh codes searched by `faiss.knn_hamming(coder.encode(q), codes, k)`: what a
  `search` override on the binary coders would cost (not the code as it is).
- pq (M = bits/8 bytes): `PqCoder.search` (float64 distance tables + `adc_scores`) vs the coder's
  own trained faiss IndexPQ (cloned, same codes) `.search`.
- float: `FloatCoder.search` (faiss.pairwise_distances + argpartition) vs IndexFlatL2.
- drq / gsl (ADC, bits/8 bytes per item): `coder.search` vs the pq row's faiss IndexPQ at the same
  bytes per item (the reference a user would otherwise deploy).
Ours runs in chunks of 256 queries (the full score matrix of 1,000 x 400k would be 1.6 GB).
ms/query at batch 1 (`--b1-queries` single-query calls) and batch 1,000 (one call), medians of
`--reps` alternating rounds (ours, faiss, ours, faiss, ...). Throughput = db items scanned per second.

Targets: our binary search >= 0.9x IndexBinaryFlat throughput; anchor: faiss binary flat
~0.5 G codes/s/core.
"""
from __future__ import annotations

import argparse
import sys

import harness

CHUNK = 256


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--db", choices=("fmnist", "glove"), default="fmnist")
    p.add_argument("--bits", type=int, default=64)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--nq", type=int, default=1000)
    p.add_argument("--b1-queries", type=int, default=20)
    # 1 by default: per-core numbers are what survives a shared machine (with 2 OpenMP threads and
    # other jobs on both cores, faiss and torch spin at barriers: 10-40x slower, measured).
    p.add_argument("--threads", type=int, default=1, help="torch/faiss/BLAS threads (0: library defaults)")
    p.add_argument("--reps", type=int, default=3)
    harness.add_device_arg(p)
    return p.parse_args()


def chunked_search(coder, q, codes, k):
    import numpy as np

    out = [coder.search(q[i:i + CHUNK], codes, k) for i in range(0, len(q), CHUNK)]
    return np.concatenate([o[0] for o in out]), np.concatenate([o[1] for o in out])


def main() -> int:
    args = parse_args()
    harness.require_device(args.device)
    import faiss

    from encoders.metrics import hamming_scores

    harness.set_threads(args.threads)
    gpu = args.device == "cuda" and harness.faiss_gpu_available()
    if args.device == "cuda" and not gpu:
        print("faiss-gpu not importable: faiss sides stay on the CPU")
    res = faiss.StandardGpuResources() if gpu else None

    def to_device(index):
        if not gpu:
            return index
        if isinstance(index, faiss.IndexBinaryFlat):
            return faiss.GpuIndexBinaryFlat(res, index)
        return faiss.index_cpu_to_gpu(res, 0, index)

    data = harness.load_db(args.db, nq=args.nq)
    xq, xb, k = data["queries"], data["db"], args.k
    n, nq = len(xb), len(xq)
    harness.header(f"search: ours vs faiss brute force ({args.db})")
    print(f"data: {data['desc']}; {nq} queries, k={k}, code length {args.bits} bits; {harness.threads_line()}"
          f"{'; faiss on GPU' if gpu else ''}; faiss distance_compute_blas_threshold "
          f"{faiss.cvar.distance_compute_blas_threshold} (IndexFlatL2 uses BLAS only above it)")

    pairs = []  # (row name, bytes/item, ours(q) -> (D, I), faiss(q) -> (D, I), exact-compare kind)
    coders = {}
    for method in ("lsh", "itq", "llc"):
        coder = harness.fit_coder(method, args.bits, data["train"], data["train_labels"], n_train=10000)
        if coder is None:
            continue
        codes = coder.encode(xb)
        index = faiss.IndexBinaryFlat(args.bits)
        index.add(codes)
        index = to_device(index)
        coders[method] = (coder, codes)
        pairs.append((f"{method} (Hamming)", codes.shape[1],
                      lambda q, c=coder, b=codes: chunked_search(c, q, b, k),
                      lambda q, c=coder, ix=index: ix.search(c.encode(q), k), "hamming"))
    if "lsh" in coders:
        coder, codes = coders["lsh"]
        index = faiss.IndexBinaryFlat(args.bits)
        index.add(codes)
        index = to_device(index)
        qcodes = coder.encode(xq)
        # batch 1 uses the first query's codes; batch 1000 all of them (the slicing below passes q).
        pairs.append(("hamming kernel only, lsh codes (ours: no top-k)", codes.shape[1],
                      lambda q, b=codes, qc=qcodes: [hamming_scores(qc[i:i + min(CHUNK, len(q))], b)
                                                     for i in range(0, len(q), CHUNK)],
                      lambda q, ix=index, qc=qcodes: ix.search(qc[:len(q)], k), None))
        # What coder.search would cost through faiss's fused scan + heap (the proposed change):
        pairs.append(("(proposal) faiss.knn_hamming on lsh codes", codes.shape[1],
                      lambda q, c=coder, b=codes: faiss.knn_hamming(c.encode(q), b, k),
                      lambda q, c=coder, ix=index: ix.search(c.encode(q), k), "hamming distances"))
    pq_index = None
    for method in ("pq", "float"):
        coder = harness.fit_coder(method, args.bits, data["train"], data["train_labels"])
        if coder is None:
            continue
        codes = coder.encode(xb)
        if method == "pq":
            index = faiss.clone_index(coder._index)  # the coder's trained IndexPQ (behind padding if any)
            index.add(xb)
            pq_index = index = to_device(index)
            name = f"pq M={args.bits // 8} (ADC)"
        else:
            index = to_device(faiss.IndexFlatL2(xb.shape[1]))
            index.add(xb)
            name = "float (exact L2)"
        pairs.append((name, codes.shape[1], lambda q, c=coder, b=codes: chunked_search(c, q, b, k),
                      lambda q, ix=index: ix.search(q, k), "pq" if method == "pq" else "l2"))
    for method in ("drq", "gsl"):
        if pq_index is None:
            break
        coder = harness.fit_coder(method, args.bits, data["train"], data["train_labels"], n_train=5000)
        if coder is None:
            continue
        codes = coder.encode(xb)
        pairs.append((f"{method} (ADC) vs faiss IndexPQ M={args.bits // 8}", codes.shape[1],
                      lambda q, c=coder, b=codes: chunked_search(c, q, b, k),
                      lambda q, ix=pq_index: ix.search(q, k), None))

    rows = []
    binary_ratios = []
    nthreads = faiss.omp_get_max_threads()
    for name, nbytes, ours, theirs, kind in pairs:
        load = harness.load_avg()
        q1 = xq[: args.b1_queries]
        t1 = harness.interleave({"ours": lambda: [ours(q1[i:i + 1]) for i in range(len(q1))],
                                 "faiss": lambda: [theirs(q1[i:i + 1]) for i in range(len(q1))]}, args.reps)
        tb = harness.interleave({"ours": lambda: ours(xq), "faiss": lambda: theirs(xq)}, args.reps)
        o1, f1 = (1e3 * harness.median(t1[s]) / len(q1) for s in ("ours", "faiss"))
        ob, fb = (1e3 * harness.median(tb[s]) / nq for s in ("ours", "faiss"))
        same = check(kind, ours(xq), theirs(xq))
        ratio_b = fb / ob  # ours throughput / faiss throughput
        if kind == "hamming" and not name.startswith("(proposal)"):
            binary_ratios.append((name, ratio_b))
        rows.append([name, nbytes, o1, f1, f"{f1 / o1:.2f}", ob, fb, f"{ratio_b:.2f}",
                     f"{n / (ob * 1e-3) / 1e9:.3f}", f"{n / (fb * 1e-3) / 1e9:.3f}", same,
                     f"{harness.spread(tb['ours'])} / {harness.spread(tb['faiss'])}", load])
    harness.print_table(
        ["searcher", "B/item", "ours ms/q b=1", "faiss ms/q b=1", "ratio b=1", f"ours ms/q b={nq}",
         f"faiss ms/q b={nq}", f"ratio b={nq}", "ours G items/s", "faiss G items/s", "same top-k",
         f"s/call b={nq} (ours / faiss)", "load 1/5/15"], rows)
    print("ratio = ours throughput / faiss throughput (faiss ms / ours ms); > 1 means ours is faster.")
    for name, nbytes, *_ in pairs:
        if name.startswith("lsh"):
            fb = next(r[6] for r in rows if r[0] == name)
            print(f"faiss IndexBinaryFlat {8 * nbytes}-bit at batch {nq}: {n / (fb * 1e-3) / nthreads / 1e9:.3f} "
                  f"G codes/s/core ({nthreads} OpenMP threads; anchor ~0.5 G codes/s/core)")
    for name, r in binary_ratios:
        print(f"target binary >= 0.9x IndexBinaryFlat at batch {nq}: {name} {r:.2f}x "
              f"-> {'met' if r >= 0.9 else 'MISSED'}")
    print(f"load after: {harness.load_avg()}")
    return 0


def check(kind, ours, theirs) -> str:
    """Do both sides return the same top-k distances? (ids may differ inside ties)."""
    import numpy as np

    if kind is None:
        return "n/a"
    so, _ = ours
    dt, _ = theirs
    dt = np.asarray(dt)
    if kind == "hamming":  # ours returns scores = -distance
        return "yes" if np.array_equal(-so, dt) else "NO"
    if kind == "hamming distances":
        return "yes" if np.array_equal(so, dt) else "NO"
    # pq: ours float64 tables vs faiss float32; l2: shifted vs unshifted float32 expansion
    ok = np.allclose(-so, dt, rtol=1e-3, atol=1e-3 * float(np.abs(dt).mean()))
    return "yes (1e-3)" if ok else "NO"


if __name__ == "__main__":
    sys.exit(main())
