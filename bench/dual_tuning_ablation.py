"""Dual-Tuning on val: which terms (prototype alone / structure alone / both) and the gate's decision,
beside BCT and an independent model (issue #16). Val decides; query is reported.

    PYTHONPATH=. python bench/dual_tuning_ablation.py [--epochs 3] [--width 1.5] [--gallery 20000] [--seed 0]

Scenario (METHODS.md "Dual-Tuning", as bench/model_update.sh): old = SmallCNN trained 3 epochs on the
train rows of classes 0-4 of Fashion-MNIST; new = WideCNN (projected to the old 128-d space) on the
train rows of all 10 classes, epoch chosen on val (encoders.compat.train_compatible).
- val matrix (decides; what `update-model` gates on): 2,000 val queries vs the 10,000 train rows;
- query matrix (reported): 1,000 query rows vs a fixed random subset of `--gallery` non-query rows
  (a subset to keep four CPU embeddings of the gallery within minutes; the flow uses all of them).
Gate: encoders.compat.decide_gate with the default negative-flip bound. `--seed` seeds the old and the
new models' initialisation and batch order (the splits and the gallery subset stay those of seed 0), so
runs with seeds 0, 1, 2 give the spread; each run also prints its rows as one JSON line.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

from encoders.backbones import ClassifierHead, WideCNN, build_backbone, embed_pixels, grey_preprocess
from encoders.compat import CompatConfig, compat_matrix, decide_gate, train_compatible
from encoders.training import train_classifier
from infra.datasets import assign_splits, load_fashion_mnist

CONFIGS = [("independent", "independent", {}),
           ("bct", "bct", {}),
           ("dual-tuning: prototype term only", "dual-tuning", {"mutual_weight": 0.0}),
           ("dual-tuning: structure term only", "dual-tuning", {"proto_weight": 0.0}),
           ("dual-tuning: both (default)", "dual-tuning", {})]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--width", type=float, default=1.5)
    ap.add_argument("--gallery", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=0, help="model initialisation and batch order")
    a = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    ds = load_fashion_mnist()
    y = ds.labels.astype(np.int64)
    split = assign_splits(ds.labels, ds.is_test, seed=0)
    px = ds.pixels
    tr, va, qu = np.flatnonzero(split == "train"), np.flatnonzero(split == "val"), np.flatnonzero(split == "query")
    rest = np.flatnonzero(split != "query")
    gal = np.sort(np.random.default_rng(0).permutation(rest)[: a.gallery])

    old_tr = tr[y[tr] < 5]
    old_va = va[y[va] < 5]
    torch.manual_seed(a.seed)
    old_bb = build_backbone("small-cnn")
    old_head = ClassifierHead(old_bb.feature_dim, 5)
    train_classifier(old_bb.module, old_head, px[old_tr], y[old_tr], px[old_va], y[old_va], epochs=3, seed=a.seed)
    old = {k: embed_pixels(old_bb.module, grey_preprocess, px[idx]) for k, idx in
           (("train", tr), ("val", va), ("query", qu), ("gallery", gal))}
    print(f"[{time.time() - t0:.0f} s] old model trained on classes 0-4", flush=True)

    rows = []
    for label, method, params in CONFIGS:
        torch.manual_seed(a.seed)
        new = WideCNN(width=a.width)
        cfg = CompatConfig(epochs=a.epochs, seed=a.seed, **params)
        model, _, rep = train_compatible(new, new.embed_dim, old["train"], old_head.fc, px[tr], y[tr], px[va], y[va],
                                         10, method=method, config=cfg, val_old_features=old["val"])
        emb = {k: embed_pixels(model, grey_preprocess, px[idx]) for k, idx in
               (("train", tr), ("val", va), ("query", qu), ("gallery", gal))}
        on_val = compat_matrix({"old": old["val"], "new": emb["val"]}, {"old": old["train"], "new": emb["train"]},
                               y[va], y[tr])
        decision = decide_gate(on_val, "val")
        on_q = compat_matrix({"old": old["query"], "new": emb["query"]}, {"old": old["gallery"], "new": emb["gallery"]},
                             y[qu], y[gal])
        rows.append((label, decision, on_q))
        print(f"[{time.time() - t0:.0f} s] {label}: {decision.reason}", flush=True)

    print("\n| method | val M(old,old) / M(new,new) / M(new,old) | val neg. flips | gate (val) | "
          "query M(old,old) / M(new,new) / M(new,old) | query update gain | query neg. flips |")
    print("|---|---|---|---|---|---|---|")
    for label, d, q in rows:
        m, qm = d.map, q.map
        print(f"| {label} | {m['M(old,old)']:.4f} / {m['M(new,new)']:.4f} / {m['M(new,old)']:.4f} | "
              f"{d.negative_flip_rate:.3f} | {'passed' if d.passed else 'refused'} | "
              f"{qm['M(old,old)']:.4f} / {qm['M(new,new)']:.4f} / {qm['M(new,old)']:.4f} | {q.update_gain:.3f} | "
              f"{q.negative_flip_rate:.3f} |")
    print(json.dumps({"seed": a.seed, "rows": [
        {"method": label, "val": d.map, "val_negative_flip_rate": d.negative_flip_rate, "gate_passed": d.passed,
         "query": q.map, "query_update_gain": q.update_gain, "query_negative_flip_rate": q.negative_flip_rate}
        for label, d, q in rows]}, default=float))
    print(f"\n{time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
