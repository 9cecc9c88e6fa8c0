"""Encode throughput per coder vs the matmul-bound limit for its arithmetic.

Usage: .venv/bin/python bench/encode.py [--db fmnist|glove] [--bits 64] [--n 20000] [--threads 1]
                                       [--reps 3] [--device cpu|cuda]

For each coder: codes/s of `coder.encode(x)` over `--n` feature rows, and the limit
    limit = sgemm FLOP/s / FLOPs per item
where FLOPs per item counts the coder's arithmetic as dense multiply-adds (2 FLOPs each):
- lsh:    D x bits (projection)                         pca-rr / itq: D x bits + bits x bits
- pq:     256 x D' (distances to 256 centroids in each of M sub-spaces of D'/M dims, D' = padded D)
- opq:    D x D' (rotation) + 256 x D'
- drq:    MLP D x hidden + hidden x dim, then levels x K x dim (one r @ C^T per level)
- llc:    head MLP D x hidden + hidden x bits
- gsl:    MLP D x hidden + hidden x dim, then 256 x dim (PQ on the embedding)
- float:  no arithmetic (a copy): no limit.
sgemm FLOP/s is measured in the same run, a 1024^3 float32 matmul (numpy and torch, the faster),
timed alternately with each coder's encode (sgemm, encode, sgemm, encode, ...), so each coder's
"fraction of limit" compares two numbers taken seconds apart under the same load.
Learned coders (drq, llc, gsl) are trained for one short epoch per stage: timing only.
"""
from __future__ import annotations

import argparse
import sys

import harness

SGEMM_N = 1024


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--db", choices=("fmnist", "glove"), default="fmnist")
    p.add_argument("--bits", type=int, default=64)
    p.add_argument("--n", type=int, default=20000)
    # 1 by default: per-core numbers are what survives a shared machine (with 2 OpenMP threads and
    # other jobs on both cores, faiss and torch spin at barriers: 10-40x slower, measured).
    p.add_argument("--threads", type=int, default=1, help="torch/faiss/BLAS threads (0: library defaults)")
    p.add_argument("--reps", type=int, default=3)
    harness.add_device_arg(p)
    return p.parse_args()


def flops_per_item(method: str, coder, d: int) -> tuple[float, str]:
    """(FLOPs per encoded item, the formula as text)."""
    cfg = getattr(coder, "config", None)
    if method == "lsh":
        b = cfg.bits
        return 2.0 * d * b, f"2·D·bits = 2·{d}·{b}"
    if method in ("pca-rr", "itq"):
        b = cfg.bits
        return 2.0 * (d * b + b * b), f"2·(D·bits + bits²) = 2·({d}·{b} + {b}²)"
    if method in ("pq", "opq"):
        m = cfg.bits // 8
        dp = m * -(-d // m)
        if method == "pq":
            return 2.0 * 256 * dp, f"2·256·D' = 2·256·{dp}"
        return 2.0 * (d * dp + 256 * dp), f"2·(D·D' + 256·D') = 2·({d}·{dp} + 256·{dp})"
    if method == "drq":
        h, e, lv, kk = cfg.hidden, cfg.dim, cfg.levels, cfg.codebook_size
        mlp = d * h + h * e if h else d * e
        return 2.0 * (mlp + lv * kk * e), f"2·(D·h + h·dim + L·K·dim) = 2·({d}·{h} + {h}·{e} + {lv}·{kk}·{e})"
    if method == "llc":
        h, b = cfg.hidden, cfg.bits
        mlp = d * h + h * b if h else d * b
        return 2.0 * mlp, f"2·(D·h + h·bits) = 2·({d}·{h} + {h}·{b})"
    if method == "gsl":
        h, e = cfg.hidden, cfg.dim
        return 2.0 * (d * h + h * e + 256 * e), f"2·(D·h + h·dim + 256·dim) = 2·({d}·{h} + {h}·{e} + 256·{e})"
    return 0.0, "copy (no arithmetic)"


def repeated(fn, min_s: float = 0.2):
    """(fn run r times, r) with r chosen from one calibration call so one sample lasts >= min_s:
    a 10 ms call on a shared machine is mostly scheduler noise."""
    r = max(1, int(min_s / max(harness.timed(fn), 1e-6)) + 1)

    def run():
        for _ in range(r):
            fn()
    return run, r


def blocked(coder, rows: int):
    """encode in blocks of `rows` (the proposal for pq/opq: faiss's distance tables stay in cache)."""
    import numpy as np

    return lambda x: np.concatenate([coder.encode(x[i:i + rows]) for i in range(0, len(x), rows)])


def main() -> int:
    args = parse_args()
    harness.require_device(args.device)
    import numpy as np
    import torch

    harness.set_threads(args.threads)
    data = harness.load_db(args.db)
    x = np.ascontiguousarray(data["db"][: args.n])
    d = x.shape[1]
    harness.header(f"encode: codes/s vs matmul-bound limit ({args.db})")
    print(f"data: {data['desc']}; encoding {len(x)} rows of D={d}; {harness.threads_line()}")

    rng = np.random.default_rng(0)
    a_np = rng.standard_normal((SGEMM_N, SGEMM_N), dtype=np.float32)
    b_np = rng.standard_normal((SGEMM_N, SGEMM_N), dtype=np.float32)
    a_t, b_t = torch.from_numpy(a_np), torch.from_numpy(b_np)
    sgemm_flops = 2.0 * SGEMM_N ** 3
    sgemm, reps_of = {}, {}
    for name, fn in (("numpy", lambda: a_np @ b_np), ("torch", lambda: torch.mm(a_t, b_t))):
        sgemm[name], reps_of[name] = repeated(fn)
    load = harness.load_avg()
    ts = harness.interleave(sgemm, max(args.reps, 5))
    gf = {k: reps_of[k] * sgemm_flops / harness.median(v) / 1e9 for k, v in ts.items()}
    best = max(gf, key=gf.get)
    print(f"sgemm {SGEMM_N}³ float32: numpy {gf['numpy']:.1f} GFLOP/s, torch {gf['torch']:.1f} GFLOP/s "
          f"(load {load}); the limit below uses {best}, re-measured beside each coder")

    rows = []
    cases = []
    for method in ("lsh", "pca-rr", "itq", "pq", "opq", "float", "drq", "llc", "gsl"):
        coder = harness.fit_coder(method, args.bits, data["train"], data["train_labels"], n_train=10000)
        if coder is None:
            continue
        cases.append((method, coder, coder.encode))
        if method in ("pq", "opq"):
            cases.append((f"{method} (proposal: 1024-row blocks)", coder, blocked(coder, 1024)))
    for name, coder, encode in cases:
        method = name.split(" ")[0]
        fl, formula = flops_per_item(method, coder, d)
        load = harness.load_avg()
        enc, r_enc = repeated(lambda e=encode: e(x))
        t = harness.interleave({"sgemm": sgemm[best], "encode": enc}, args.reps)
        ts_, te_ = [v / reps_of[best] for v in t["sgemm"]], [v / r_enc for v in t["encode"]]
        gflops = sgemm_flops / harness.median(ts_) / 1e9
        cps = len(x) / harness.median(te_)
        # fraction per round (sgemm and encode seconds apart), then the median: less load noise
        fracs = [(len(x) / te) / (sgemm_flops / tg / fl) for te, tg in zip(te_, ts_)] if fl else []
        limit = gflops * 1e9 / fl if fl else float("nan")
        t = {"encode": te_}
        rows.append([name, coder.bytes_per_item(), formula, fl / 1e3, gflops, cps,
                     limit if fl else "n/a", f"{harness.median(fracs):.2f}" if fl else "n/a",
                     f"{1e6 / cps:.2f}", harness.spread(t["encode"]), load])
    harness.print_table(["coder", "B/item", "FLOPs/item formula", "kFLOP/item", "sgemm GFLOP/s (beside)",
                         "codes/s", "limit codes/s", "fraction of limit", "µs/item", "encode s range",
                         "load 1/5/15"], rows)
    print(f"load after: {harness.load_avg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
