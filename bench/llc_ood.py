"""LLC's threshold-free OOD flag and Hamming score vs max-softmax, on held-out Fashion-MNIST classes.

Usage: .venv/bin/python bench/llc_ood.py [--store file:///tmp/cs1] [--bits 8,16,32] [--epochs 8]

Protocol (METHODS.md "LLC", fixed before any number was seen): in-distribution = classes 0-7,
out-of-distribution = classes 8 (bag) and 9 (ankle boot). Everything goes through the project's
own flows on the store (default $CODESHARD_STORE, else file:///tmp/cs1):
1. `train_backbone` flow: SmallCNN on the train rows of classes 0-7 (best epoch on their val
   rows), registered as `fashion-mnist-small-cnn-8cls`; skipped if already registered.
2. `extract_features` flow: features of every raw shard with that model (done shards skipped).
3. LLC at each length fitted on train rows of classes 0-7, early-stopped on val rows of 0-7.
4. Reported on rows neither fitting nor selection touched: split query + split database
   (`load_features`'s "database" also holds the train and val rows; those are removed by id).
   Positive = in-distribution (46,400 rows of 0-7), negative = 11,600 rows of 8-9.
Columns: LLC score = minus the Hamming distance to the nearest class code (AUROC / FPR@95%TPR,
ties handled as a random tie-break, encoders/ood.py); flag = `ood_flag` (decoding radius, no
threshold) as the fraction of in-/out-distribution rows it accepts (TPR / FPR); MSP = max-softmax
of LLC's own phase-1 classifier (`msp_score`); MSP-bb = max-softmax of the backbone's classifier
head (the classic Hendrycks & Gimpel baseline, needs no coder). acc = nearest-class-code accuracy on
the in-distribution rows. Nothing is selected on the reported rows.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

IN_CLASSES = list(range(8))
OUT_CLASSES = [8, 9]
DATASET = "fashion-mnist"
MODEL_ID = "fashion-mnist-small-cnn-8cls"


def backbone_msp(store, model_id: str, x: np.ndarray) -> np.ndarray:
    """Max-softmax of the registered backbone's own linear classifier head over features x."""
    from infra.registry import load_model_state

    st = load_model_state(store, model_id, "head.pt")
    w, b = st["fc.weight"].float(), st["fc.bias"].float()
    with torch.no_grad():
        return torch.softmax(torch.from_numpy(x) @ w.t() + b, 1).max(1).values.numpy()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", default=os.environ.get("CODESHARD_STORE") or "file:///tmp/cs1")
    ap.add_argument("--bits", default="8,16,32")
    ap.add_argument("--epochs", type=int, default=8, help="backbone epochs")
    args = ap.parse_args()
    bits_list = [int(b) for b in args.bits.split(",")]

    import flows.cli  # noqa: F401 - sets the CLI's offline-safe Prefect env defaults (analytics off, ...)
    from encoders.evaluation import ood_report
    from encoders.llc import LLCCoder
    from encoders.ood import auroc, fpr_at_tpr
    from flows.extract_features import extract_features
    from flows.train_backbone import train_backbone
    from infra.features import load_features
    from infra.runners import task_runner
    from infra.settings import Settings
    from infra.store import open_store

    settings = {"store": args.store}
    cfg = Settings.load(**settings)
    store = open_store(cfg)
    t0 = time.perf_counter()
    card = train_backbone.with_options(task_runner=task_runner(cfg))(
        dataset=DATASET, arch="small-cnn", model_id=MODEL_ID, epochs=args.epochs, classes=IN_CLASSES,
        settings=settings)
    t_train = time.perf_counter() - t0
    if sorted(card["data"]["classes"]) != IN_CLASSES:
        raise SystemExit(f"{MODEL_ID} in {args.store} was trained on classes {card['data']['classes']}, "
                         f"not {IN_CLASSES}: it would have seen the held-out classes")
    t0 = time.perf_counter()
    summary = extract_features.with_options(task_runner=task_runner(cfg))(dataset=DATASET, model_id=MODEL_ID,
                                                                settings=settings)
    t_extract = time.perf_counter() - t0
    if summary.get("failed"):
        raise SystemExit(f"extract failed for some shards: {summary}")

    data = load_features(store, DATASET, MODEL_ID)
    tr, va = data["train"], data["val"]
    fit_mask, sel_mask = np.isin(tr.labels, IN_CLASSES), np.isin(va.labels, IN_CLASSES)
    seen = np.concatenate([tr.ids, va.ids])
    db = data["database"]
    keep = ~np.isin(db.ids, seen)  # split == "database" only
    x_rep = np.concatenate([data["query"].x, db.x[keep]])
    y_rep = np.concatenate([data["query"].labels, db.labels[keep]])
    is_in = np.isin(y_rep, IN_CLASSES)
    assert np.isin(y_rep[~is_in], OUT_CLASSES).all()
    x_in, x_out = x_rep[is_in], x_rep[~is_in]
    msp_bb = backbone_msp(store, MODEL_ID, np.concatenate([x_in, x_out]))
    lab = np.r_[np.ones(len(x_in), bool), np.zeros(len(x_out), bool)]
    bb_auroc, bb_fpr = auroc(msp_bb, lab), fpr_at_tpr(msp_bb, lab, 0.95)

    rows = []
    for bits in bits_list:
        coder = LLCCoder(bits=bits, seed=cfg.seed)
        rep = coder.fit(tr.x[fit_mask], tr.labels[fit_mask], (va.x[sel_mask], va.labels[sel_mask]))
        r = ood_report(coder, x_in, x_out)
        pred, _ = coder.predict_class(x_in)
        r.update(acc=float((pred == y_rep[is_in]).mean()), fit_s=rep.fit_s)
        rows.append(r)

    print(f"$ .venv/bin/python bench/llc_ood.py --store {args.store} --bits {args.bits} --epochs {args.epochs}")
    print(f"load average at end: {' '.join(open('/proc/loadavg').read().split()[:3])} "
          f"({os.cpu_count()} cores, shared)")
    print(f"backbone {MODEL_ID}: classes {IN_CLASSES}, val acc {card.get('val_accuracy', float('nan')):.4f}, "
          f"flow {t_train:.0f} s (train {card.get('train_seconds', float('nan')):.0f} s when it ran); "
          f"extract flow {t_extract:.0f} s")
    print(f"fit: {int(fit_mask.sum())} train rows / select: {int(sel_mask.sum())} val rows of classes 0-7; "
          f"report: query + database rows, {len(x_in)} in (0-7) vs {len(x_out)} out (8, 9)\n")
    print("| bits | d_min | radius | in acc | LLC AUROC | LLC FPR@95 | flag TPR | flag FPR "
          "| MSP AUROC | MSP FPR@95 | MSP-bb AUROC | MSP-bb FPR@95 | fit s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['bits']} | {r['d_min']} | {r['radius']} | {r['acc']:.4f} | {r['llc_auroc']:.4f} "
              f"| {r['llc_fpr95']:.4f} | {r['flag_tpr']:.4f} | {r['flag_fpr']:.4f} | {r['msp_auroc']:.4f} "
              f"| {r['msp_fpr95']:.4f} | {bb_auroc:.4f} | {bb_fpr:.4f} | {r['fit_s']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
