"""DRQ training cost: one model that serves every length vs a model per length (issue #16), in one run.

    PYTHONPATH=. python bench/drq_fit_times.py [--features /tmp/sci/fmnist_cnn.npz] [--seed 0]

Fits, in one process with one torch thread, on the `train` rows of the seen-protocol features
(bench/features_cache.py): the 64-bit DRQ model (8 levels; its prefixes are the 8-56-bit codes) and
a model per length for 8, 16 and 32 bits (the 64-bit per-length model is the one model itself); and
the 64-bit model with per-level codebooks (the ablation of encoders/drq_levels.py).
Prints wall and CPU seconds per fit (CPU seconds of this process: what a busy machine changes least)
and the per-length total against the one model. Quality of the same models: bench/science_table.py
--rows drq,drq-per-length.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from encoders.coders import make_coder


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--features", default="/tmp/sci/fmnist_cnn.npz")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(1)
    path = Path(a.features)
    if not path.exists():  # first run (e.g. `make bench`): build the shared features
        from bench import features_cache

        path.parent.mkdir(parents=True, exist_ok=True)
        features_cache.fmnist(path.parent)
    d = np.load(path)
    train = d["split"] == "train"
    x, y = d["features"][train].astype(np.float32), d["labels"][train]
    rows = []
    for bits in (64, 8, 16, 32):
        c = make_coder("drq", bits=bits, seed=a.seed)
        w0, c0 = time.perf_counter(), time.process_time()
        c.fit(x, y)
        rows.append((bits, time.perf_counter() - w0, time.process_time() - c0))
        print(f"drq model for {bits} bits: {rows[-1][1]:.0f} s wall, {rows[-1][2]:.0f} s CPU", flush=True)
    one_w, one_c = rows[0][1], rows[0][2]
    tot_w, tot_c = sum(r[1] for r in rows), sum(r[2] for r in rows)
    print("\n| DRQ training | wall s | CPU s |\n|---|---|---|")
    for bits, w, cpu in rows:
        print(f"| model for {bits} bits{' (the one model: every length)' if bits == 64 else ''} | {w:.0f} | {cpu:.0f} |")
    print(f"| a model per length (8, 16, 32, 64) | {tot_w:.0f} | {tot_c:.0f} |")
    print(f"| per length / one model | {tot_w / one_w:.2f}x | {tot_c / one_c:.2f}x |")
    c = make_coder("drq", bits=64, seed=a.seed, codebooks="per-level")
    w0, c0 = time.perf_counter(), time.process_time()
    c.fit(x, y)
    print(f"| per-level codebooks, 64 bits | {time.perf_counter() - w0:.0f} | {time.process_time() - c0:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
