"""Re-select the learned coders' settings on val (issue #16): val queries vs the train gallery,
never the query split. Prints one table per grid and writes every candidate with its val score.

    PYTHONPATH=. python bench/select_on_val.py [/tmp/sci/fmnist_cnn.npz] [--out /tmp/sci/selection.json]

Features: bench/features_cache.py. Grids (seed 0, 1 torch thread; ~6-10 min on 2 shared cores):
- the SHARED proxy temperature T of the similarity loss, one value for DRQ, GSL, gsl-none and LLC
  (score: the mean over those four of their val mAP; DRQ at every length, GSL at 32 bits, LLC at 16);
- DRQ: level assignment l2 / cos, score l2 / ip, prefix loss on / off (at the chosen T);
- GSL: snap strength lam, and the loss-sum baseline (gsl-qloss) at the matched strength
  qloss_weight = lam / 2 (GSLConfig: equal gradient magnitude before projection).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

from encoders.coders import make_coder
from encoders.selection import SELECTION_METRIC, select_on_val, val_map

TEMPS = (0.05, 0.1, 0.2, 0.4, 0.8)
LAMS = (0.5, 2.0, 6.0, 20.0)


def load(path):
    from pathlib import Path

    if not Path(path).exists():  # first run: build the shared features (bench/features_cache.py)
        from bench import features_cache

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        features_cache.fmnist(Path(path).parent)
    d = np.load(path)
    x, y, s = d["features"].astype(np.float32), d["labels"].astype(np.int64), d["split"]
    return (x[s == "train"], y[s == "train"]), (x[s == "val"], y[s == "val"])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("features", nargs="?", default="/tmp/sci/fmnist_cnn.npz")
    ap.add_argument("--out", default="/tmp/sci/selection.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    (tx, ty), (vx, vy) = load(args.features)
    src = f"bench/select_on_val.py {args.features}"

    def fit(method, bits, **cfg):
        c = make_coder(method, bits=bits, seed=0, **cfg)
        c.fit(tx, ty, (vx, vy))
        return c

    def drq_score(c):
        return float(np.mean([val_map(None, c, b, tx, ty, vx, vy) for b in c.lengths if b in (8, 16, 32, 64)]))

    per_method: dict[str, dict[float, float]] = {m: {} for m in ("drq", "gsl", "gsl-none", "llc")}
    t0 = time.time()
    for t in TEMPS:
        per_method["drq"][t] = drq_score(fit("drq", 64, proxy_temperature=t))
        per_method["gsl"][t] = val_map(None, fit("gsl", 32, mode="gsl", scale=1 / t), 32, tx, ty, vx, vy)
        per_method["gsl-none"][t] = val_map(None, fit("gsl", 32, mode="none", scale=1 / t), 32, tx, ty, vx, vy)
        per_method["llc"][t] = val_map(None, fit("llc", 16, proxy_temperature=t), 16, tx, ty, vx, vy)
        print(f"T={t}: " + ", ".join(f"{m} {v[t]:.4f}" for m, v in per_method.items()), f"({time.time() - t0:.0f} s)",
              flush=True)
    shared = select_on_val("shared-proxy-temperature", [{"proxy_temperature": t} for t in TEMPS],
                           lambda p: np.mean([per_method[m][p["proxy_temperature"]] for m in per_method]),
                           metric="mean over drq/gsl/gsl-none/llc of " + SELECTION_METRIC, source=src,
                           notes="per-method val mAP: " + json.dumps({m: {str(k): round(v, 5) for k, v in d.items()}
                                                                      for m, d in per_method.items()}))
    T = shared.chosen["proxy_temperature"]
    # for the record: LLC with the paper's unnormalised logits z . B_c (proxy_temperature 0)
    llc_paper = val_map(None, fit("llc", 16, proxy_temperature=0.0), 16, tx, ty, vx, vy)
    print(f"llc, paper's unnormalised logits: {llc_paper:.4f}", flush=True)
    print("shared T:", T, flush=True)

    base = {"proxy_temperature": T}
    drq_cands = [dict(base), {**base, "assign": "cos"}, {**base, "prefix_loss": False}]
    drq_fits = {}

    def drq_fit_score(p):
        c = fit("drq", 64, **p)
        drq_fits[json.dumps(p, sort_keys=True)] = c
        return drq_score(c)

    drq = select_on_val("drq", drq_cands, drq_fit_score, source=src,
                        metric="mean over 8/16/32/64 bits of " + SELECTION_METRIC)
    best = drq_fits[json.dumps(drq.chosen, sort_keys=True)]
    score_rows = []
    for sc in ("l2", "ip", "cos"):  # the score is applied at search time: same fitted model
        object.__setattr__(best.config, "score", sc)
        score_rows.append({"params": {**drq.chosen, "score": sc}, "val_score": round(drq_score(best), 5)})
    drq_score_sel = max(score_rows, key=lambda r: r["val_score"])
    print("drq:", drq.candidates, score_rows, flush=True)

    gsl_rows = {}
    for lam in LAMS:
        for mode, kw in (("gsl", {"lam": lam}), ("qloss", {"qloss_weight": lam / 2})):
            gsl_rows[(mode, lam)] = val_map(None, fit("gsl", 32, mode=mode, scale=1 / T, **kw), 32, tx, ty, vx, vy)
        print(f"lam={lam}: gsl {gsl_rows[('gsl', lam)]:.4f}, qloss@{lam / 2} {gsl_rows[('qloss', lam)]:.4f}", flush=True)
    gsl = select_on_val("gsl", [{"lam": lam, "scale": 1 / T} for lam in LAMS],
                        lambda p: gsl_rows[("gsl", p["lam"])], source=src, metric="32 bits, " + SELECTION_METRIC)
    qloss = select_on_val("gsl-qloss", [{"qloss_weight": lam / 2, "scale": 1 / T} for lam in LAMS],
                          lambda p: gsl_rows[("qloss", 2 * p["qloss_weight"])], source=src,
                          metric="32 bits, " + SELECTION_METRIC, notes="matched strength: qloss_weight = lam / 2")
    out = {"shared_temperature": shared.as_dict(), "drq": drq.as_dict(), "drq_score": score_rows,
           "drq_score_chosen": drq_score_sel, "llc_paper_logits_val": round(llc_paper, 5), "gsl": gsl.as_dict(), "gsl-qloss": qloss.as_dict(),
           "seconds": round(time.time() - t0)}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
