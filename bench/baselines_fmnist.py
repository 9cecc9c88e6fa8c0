"""One-off quality sanity check of the training-free baselines on Fashion-MNIST features.

Usage: .venv/bin/python bench/baselines_fmnist.py [path/to/features.npz]

Features: devdata/fmnist_cnn.npz (arrays features, labels, split); the gallery is every row whose
split != 'query'. If that file is missing, falls back to raw Fashion-MNIST pixels from
/usr/share/datasets/fashion-mnist (PCA-64; query = 1000 t10k rows, train = 10000 train rows,
gallery = the rest). Fits every baseline on split == 'train' only, then prints tie-aware mAP
(R = all) and P@100 of the 1000 queries against the gallery, with fit / encode / search time, and
checks the sanity claims: ITQ >= LSH at every length, float >= every code.
"""
from __future__ import annotations

import gzip
import sys
import time
from pathlib import Path

import faiss
import numpy as np

from encoders.coders import make_coder
from encoders.metrics import mean_average_precision

LENGTHS = (8, 16, 32, 64)
CODED = ("lsh", "pca-rr", "itq", "pq", "opq")
FMNIST_RAW = Path("/usr/share/datasets/fashion-mnist")


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """-> features (n, D) float32, labels (n,), split (n,) str, description."""
    if path.exists():
        z = np.load(path, allow_pickle=False)
        return z["features"].astype(np.float32), z["labels"], z["split"], str(path)
    x = np.concatenate([_idx(FMNIST_RAW / "train-images-idx3-ubyte.gz"),
                        _idx(FMNIST_RAW / "t10k-images-idx3-ubyte.gz")]).reshape(70000, -1)
    y = np.concatenate([_idx(FMNIST_RAW / "train-labels-idx1-ubyte.gz"),
                        _idx(FMNIST_RAW / "t10k-labels-idx1-ubyte.gz")]).astype(np.int64)
    split = np.full(70000, "database", dtype="<U8")
    split[:10000] = "train"
    split[60000:61000] = "query"
    x = x.astype(np.float32) / 255.0
    pca = faiss.PCAMatrix(x.shape[1], 64)
    pca.train(x[split == "train"])
    return pca.apply(x), y, split, "raw Fashion-MNIST pixels, PCA-64 fitted on train"


def evaluate(method: str, bits: int | None, x: np.ndarray, y: np.ndarray,
             split: np.ndarray) -> dict[str, float]:
    train, query, gallery = split == "train", split == "query", split != "query"
    coder = make_coder(method, bits=bits)
    fit = coder.fit(x[train], y[train])
    t0 = time.perf_counter()
    codes = coder.encode(x[gallery])
    encode_s = time.perf_counter() - t0
    xq = x[query]
    t0 = time.perf_counter()
    res = mean_average_precision(lambda sl: coder.scores(xq[sl], codes), y[query], y[gallery],
                                 precision_ks=(10, 100))
    eval_s = time.perf_counter() - t0
    return {"map": res["map"], "p_at_10": res["p_at_10"], "p_at_100": res["p_at_100"],
            "bytes": coder.bytes_per_item(),
            "fit_s": fit.fit_s, "encode_us": 1e6 * encode_s / gallery.sum(),
            "eval_ms_per_q": 1e3 * eval_s / query.sum()}


def main() -> int:
    # On shared cores faiss's OpenMP spin-waiting is 10-40x slower than one thread (measured).
    faiss.omp_set_num_threads(1)
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("devdata/fmnist_cnn.npz")
    x, y, split, what = load(path)
    print(f"features: {what}  D={x.shape[1]}  train={int((split == 'train').sum())}  "
          f"query={int((split == 'query').sum())}  gallery={int((split != 'query').sum())}")
    rows: dict[tuple[str, int | None], dict[str, float]] = {}
    for method in CODED:
        for bits in LENGTHS:
            rows[(method, bits)] = evaluate(method, bits, x, y, split)
    rows[("float", None)] = evaluate("float", None, x, y, split)

    print(f"\n{'method':8} {'bits':>5} {'B/item':>6} {'mAP':>7} {'P@10':>7} {'P@100':>7} "
          f"{'fit s':>7} {'enc us':>7} {'eval ms/q':>9}")
    for (method, bits), r in rows.items():
        print(f"{method:8} {bits or 32 * x.shape[1]:>5} {r['bytes']:>6} {r['map']:7.4f} "
              f"{r['p_at_10']:7.4f} {r['p_at_100']:7.4f} {r['fit_s']:7.2f} {r['encode_us']:7.2f} "
              f"{r['eval_ms_per_q']:9.2f}")

    ok = True
    for bits in LENGTHS:
        itq, lsh = rows[("itq", bits)]["map"], rows[("lsh", bits)]["map"]
        if itq < lsh:
            ok = False
            print(f"VIOLATED: ITQ < LSH mAP at {bits} bits ({itq:.4f} < {lsh:.4f})")
    for metric in ("map", "p_at_10", "p_at_100"):
        ceiling = rows[("float", None)][metric]
        above = [f"{m}@{b} {r[metric]:.4f}" for (m, b), r in rows.items()
                 if m != "float" and r[metric] > ceiling]
        if above:
            ok = False
            print(f"VIOLATED: float {metric} {ceiling:.4f} is below " + ", ".join(above))
        else:
            print(f"holds: float {metric} {ceiling:.4f} >= every code")
    print("sanity claims (ITQ >= LSH at every length; float >= every code):",
          "hold" if ok else "VIOLATED (see above)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
