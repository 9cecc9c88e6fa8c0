"""LLC OOD by exact match vs by decoding radius, on held-out classes (issue #16 ablation).

    PYTHONPATH=. python bench/llc_ood_exact_vs_radius.py [/tmp/sci/fmnist_cnn_half.npz] [--seeds 0,1,2]

Features: bench/features_cache.py (SmallCNN trained on classes 0-4 only). LLC fitted on the train
rows of classes 0-4 (val rows of 0-4 for early stopping); scored on the query + database rows
(never fitted on): in-distribution = classes 0-4, out = 5-9. No threshold is fitted on OOD data.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from encoders.evaluation import ood_report
from encoders.llc import LLCCoder
from encoders.selection import mean_std


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("features", nargs="?", default="/tmp/sci/fmnist_cnn_half.npz")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--bits", default="8,16,32")
    a = ap.parse_args()
    torch.set_num_threads(1)
    from pathlib import Path

    if not Path(a.features).exists():  # first run: build the shared features (bench/features_cache.py)
        from bench import features_cache

        Path(a.features).parent.mkdir(parents=True, exist_ok=True)
        features_cache.fmnist(Path(a.features).parent)
    d = np.load(a.features)
    x, y, s = d["features"].astype(np.float32), d["labels"], d["split"]
    seen = y < 5
    tr, va, held = seen & (s == "train"), seen & (s == "val"), np.isin(s, ["query", "database"])
    cols = ("llc_auroc", "msp_auroc", "exact_tpr", "exact_fpr", "flag_tpr", "flag_fpr")
    print("| bits | radius | " + " | ".join(cols) + " |\n|---|---|" + "---|" * len(cols))
    for b in [int(v) for v in a.bits.split(",")]:
        reps = []
        for seed in [int(v) for v in a.seeds.split(",")]:
            c = LLCCoder(bits=b, seed=seed)
            c.fit(x[tr], y[tr], (x[va], y[va]))
            reps.append(ood_report(c, x[held & seen], x[held & ~seen]))
        cells = [f"{mean_std([r[k] for r in reps])[0]:.3f} ± {mean_std([r[k] for r in reps])[1]:.3f}" for k in cols]
        print(f"| {b} | {sorted({r['radius'] for r in reps})} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
