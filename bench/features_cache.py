"""Feature sets the science benchmarks share, built once and cached as .npz (features, labels, split).

    PYTHONPATH=. python bench/features_cache.py [OUT_DIR]     (default /tmp/sci; ~4-8 min on 2 shared cores)

- fmnist_cnn.npz: SmallCNN (128-d) trained on the `train` rows of Fashion-MNIST (assign_splits,
  seed 0; best epoch on `val`), features of all 70,000 rows. The seen-class protocol.
- fmnist_cnn_half.npz: the same backbone trained on classes 0-4 only; features of all rows. The
  unseen-class protocol retrieves over classes 5-9 (coders fit on classes 0-4 train rows).
- wordnet_hyper.npz: WordNet 3.0 noun glosses labelled by their hypernym at a fixed depth of the
  noun hierarchy (first hypernym chain), MiniLM features (384-d); classes with >= MIN_PER_CLASS
  glosses, at most MAX_PER_CLASS per class (so MiniLM stays within minutes), >= 256 classes.

Everything here reads packages on disk; nothing downloads.
"""
from __future__ import annotations

import os
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch

from encoders.backbones import ClassifierHead, build_backbone
from encoders.training import train_classifier
from infra.datasets import WORDNET_ROOT, assign_splits, load_fashion_mnist

MIN_PER_CLASS, MAX_PER_CLASS, TARGET_CLASSES = 20, 50, 256


def _train_cnn(px, y, split, classes=None, epochs=4, seed=0):
    keep = np.ones(len(y), bool) if classes is None else np.isin(y, classes)
    tr, va = keep & (split == "train"), keep & (split == "val")
    torch.manual_seed(seed)
    bb = build_backbone("small-cnn")
    n_cls = int(y[keep].max()) + 1
    head = ClassifierHead(bb.feature_dim, n_cls)
    rep = train_classifier(bb.module, head, px[tr], y[tr], px[va], y[va], epochs=epochs, seed=seed)
    print(f"  cnn classes={classes or 'all'}: val top-1 {rep.best_val_accuracy:.3f} (epoch {rep.best_epoch})")
    return bb.features(px)


def fmnist(out: Path) -> None:
    ds = load_fashion_mnist()
    y = ds.labels.astype(np.int64)
    split = assign_splits(ds.labels, ds.is_test, seed=0)
    for name, classes in (("fmnist_cnn", None), ("fmnist_cnn_half", [0, 1, 2, 3, 4])):
        if (out / f"{name}.npz").exists():
            continue
        t0 = time.time()
        feats = _train_cnn(ds.pixels, y, split, classes)
        np.savez(out / f"{name}.npz", features=feats, labels=y, split=split)
        print(f"{name}: {feats.shape} in {time.time() - t0:.0f} s")


def wordnet_hypernym_labels(root: str = WORDNET_ROOT) -> tuple[list[str], np.ndarray, int]:
    """(glosses, labels, depth): noun synsets labelled by their first-chain hypernym at the depth
    (counted from `entity`) whose classes of >= MIN_PER_CLASS members first number >= TARGET_CLASSES."""
    hyper, gloss = {}, {}
    with open(os.path.join(root, "data.noun"), encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("  "):
                continue
            head, _, g = line.partition(" | ")
            tok = head.split()
            off, w_cnt = tok[0], int(tok[3], 16)
            i = 4 + 2 * w_cnt
            p_cnt = int(tok[i])
            ptrs = [tok[i + 1 + 4 * k: i + 5 + 4 * k] for k in range(p_cnt)]
            hyp = [p[1] for p in ptrs if p[0] in ("@", "@i")]
            hyper[off] = hyp[0] if hyp else None
            gloss[off] = " ".join(tok[4:4 + 2 * w_cnt:2]).replace("_", " ") + ": " + g.strip()

    def chain(o):  # root first
        c = []
        while o is not None and len(c) < 40:
            c.append(o)
            o = hyper.get(o)
        return c[::-1]

    chains = {o: chain(o) for o in hyper}
    for depth in range(2, 12):
        lab = {o: c[depth] for o, c in chains.items() if len(c) > depth + 1}
        cnt = Counter(lab.values())
        big = {a for a, n in cnt.items() if n >= MIN_PER_CLASS}
        if len(big) >= TARGET_CLASSES:
            break
    rng = np.random.default_rng(0)
    members = defaultdict(list)
    for o, a in sorted(lab.items()):
        if a in big:
            members[a].append(o)
    texts, labels = [], []
    for ci, a in enumerate(sorted(members)):
        ms = members[a]
        pick = rng.permutation(len(ms))[:MAX_PER_CLASS]
        texts += [gloss[ms[j]] for j in pick]
        labels += [ci] * len(pick)
    return texts, np.asarray(labels, np.int64), depth


def wordnet(out: Path) -> None:
    if (out / "wordnet_hyper.npz").exists():
        return
    t0 = time.time()
    texts, y, depth = wordnet_hypernym_labels()
    print(f"wordnet: depth {depth}, {len(np.unique(y))} classes, {len(y)} glosses")
    feats = build_backbone("minilm").features(texts, batch_size=128)
    # per class: 4 query, 10 train, 3 val, rest database (>= 20 per class)
    split = assign_splits(y, np.zeros(len(y), bool), seed=0, query_per_class=4, train_per_class=10,
                          val_per_class=3)
    np.savez(out / "wordnet_hyper.npz", features=feats, labels=y, split=split, depth=depth)
    print(f"wordnet_hyper: {feats.shape} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    torch.set_num_threads(1)
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/sci")
    out.mkdir(parents=True, exist_ok=True)
    fmnist(out)
    wordnet(out)
