"""The science table (issue #16): every method x length, mean ± std over seeds, one protocol per run.

    PYTHONPATH=. python bench/science_table.py --protocol seen    [--seeds 0,1,2] [--out DIR]
    PYTHONPATH=. python bench/science_table.py --protocol unseen
    PYTHONPATH=. python bench/science_table.py --protocol wordnet
    PYTHONPATH=. python bench/science_table.py --protocol seen --rows drq,drq-levels,drq-per-length
        (only those rows, one gallery; OUT/science_seen_drq+drq-levels+drq-per-length.{md,json}, and a
         .jsonl of every finished row as it lands)
    PYTHONPATH=. python bench/science_table.py --combine 'DIR/*.jsonl' [--out DIR]
        (one table from the .jsonl rows of several runs, e.g. one process per seed on a busy machine)

Features: bench/features_cache.py (/tmp/sci/*.npz). Settings: the defaults, i.e. the val-selected ones
(encoders/selection.py; bench/select_on_val.py). Nothing here selects: query rows are scored once.

Protocols:
- seen: Fashion-MNIST SmallCNN features; coders fit on train, val for early stopping; 1,000 query rows
  vs every non-query row (a), and the same vs the gallery without the train/val rows (d).
- unseen: the backbone AND the coders saw classes 0-4 only (train/val rows of 0-4); retrieval is
  query rows of classes 5-9 vs the non-query rows of classes 5-9 (b).
- wordnet: 294 classes (WordNet noun glosses labelled by their depth-5 hypernym), MiniLM features;
  8 bits cannot name 294 classes, so short codes are tested where it matters.
Every row also has mAP@1000/@5000 with the papers' normaliser and ANN recall@10 against the exact
neighbours in the float space the code quantises (c) (e).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from encoders.coders import make_coder
from encoders.evaluation import EvalRow, Split, _rows_of, failed_rows
from encoders.selection import mean_std, verdict
from encoders.views import CosineView, EmbeddingCoder, quantised_embedding

GSL_BITS = (16, 32)


def splits(protocol: str, root: Path) -> tuple[dict[str, Split], dict[str, Split] | None]:
    name = {"seen": "fmnist_cnn", "unseen": "fmnist_cnn_half", "wordnet": "wordnet_hyper"}[protocol]
    if not (root / f"{name}.npz").exists():  # first run (e.g. `make bench`): build the shared features
        from bench import features_cache

        root.mkdir(parents=True, exist_ok=True)
        (features_cache.wordnet if protocol == "wordnet" else features_cache.fmnist)(root)
    d = np.load(root / f"{name}.npz")
    x, y, s = d["features"].astype(np.float32), d["labels"].astype(np.int64), d["split"]
    if protocol == "unseen":
        seen = y < 5
        out = {"train": Split(x[seen & (s == "train")], y[seen & (s == "train")]),
               "val": Split(x[seen & (s == "val")], y[seen & (s == "val")]),
               "query": Split(x[~seen & (s == "query")], y[~seen & (s == "query")]),
               "database": Split(x[~seen & (s != "query")], y[~seen & (s != "query")])}
        return out, None
    out = {"train": Split(x[s == "train"], y[s == "train"]), "val": Split(x[s == "val"], y[s == "val"]),
           "query": Split(x[s == "query"], y[s == "query"]), "database": Split(x[s != "query"], y[s != "query"])}
    no_train = None
    if protocol == "seen":
        db = s == "database"
        no_train = {**out, "database": Split(x[db], y[db])}
    return out, no_train


def run_seed(sp, no_train, bits, seed, log, only: set[str] | None = None,
             partial: Path | None = None) -> list[EvalRow]:
    """Every row of the table for one seed (`only`: the rows whose name before " (" is listed, without
    the second gallery). `partial`: each finished row is appended there as a JSON line, so a run cut
    short still leaves what it measured."""
    tr, va, q, db = sp["train"], sp["val"], sp["query"], sp["database"]
    rows: list[EvalRow] = []

    def fit(method, b, **cfg):
        c = make_coder(method, bits=b, seed=seed, **cfg)
        t0 = time.perf_counter()
        c.fit(tr.x, tr.labels, (va.x, va.labels))
        return c, time.perf_counter() - t0

    def add(name, make, lengths, extra_gallery=False):
        if only is not None and name.split(" (")[0] not in only:
            return None
        t0 = time.time()
        try:
            coder, fit_s = make()
            new = _rows_of(coder, name, tr, va, q, db, None, fit_s, 100, lengths)
            rows.extend(new)
            if partial is not None:
                with partial.open("a") as f:
                    f.writelines(json.dumps({"seed": seed, **asdict(r)}, default=float) + "\n" for r in new)
            if extra_gallery and no_train is not None and only is None:
                rows.extend(_rows_of(coder, name + " [gallery w/o train]", tr, va, q, no_train["database"], None,
                                     fit_s, 100, lengths))
            log(f"  seed {seed} {name} {lengths}: {time.time() - t0:.0f} s")
            return coder
        except Exception as e:  # noqa: BLE001 - a method that cannot run gets a row saying why
            rows.extend(failed_rows(name, lengths or [0], e))
            log(f"  seed {seed} {name}: not run ({e})")
            return None

    def fitted_float():
        c = make_coder("float")
        c.fit(tr.x, tr.labels)
        return c, 0.0

    add("float (L2, raw)", fitted_float, None, extra_gallery=True)
    add("float-cos", lambda: _fit_view(CosineView(), tr), None, extra_gallery=True)
    for b in bits:
        add("itq", lambda: fit("itq", b), [b], extra_gallery=True)
        add("pq", lambda: fit("pq", b), [b], extra_gallery=True)
    drq = add("drq", lambda: fit("drq", max(bits)), list(bits), extra_gallery=True)
    add("drq-levels (per-level codebooks, no scalars)", lambda: fit("drq", max(bits), codebooks="per-level"),
        list(bits))
    for b in sorted(bits)[:-1]:  # one model serves every length vs a model per length (at max(bits) it IS the drq model)
        add("drq-per-length", lambda: fit("drq", b), [b])
    if drq is not None:
        add("drq-emb (DRQ's float ceiling)", lambda: _fit_view(EmbeddingCoder(drq), tr), None)
        for b in bits:
            add("drq-emb+pq", lambda: _fit_view(quantised_embedding(drq, "pq", b, seed), tr), [b])
            add("drq-emb+rq", lambda: _fit_view(quantised_embedding(drq, "rq", b, seed), tr), [b])
    for b in bits:
        add("llc", lambda: fit("llc", b), [b])
    gsl_models = {}
    for mode in ("gsl", "none", "qloss"):
        for b in GSL_BITS:
            name = "gsl" if mode == "gsl" else f"gsl-{mode}"
            gsl_models[(mode, b)] = add(name, lambda: fit("gsl", b, mode=mode), [b])
    for mode in ("gsl", "none"):
        m = gsl_models.get((mode, max(GSL_BITS)))
        if m is not None:
            add(f"{'gsl' if mode == 'gsl' else 'gsl-none'}-emb ({max(GSL_BITS)}-bit model)",
                lambda: _fit_view(EmbeddingCoder(m), tr), None)
    return rows


def _fit_view(v, tr):
    t0 = time.perf_counter()
    v.fit(tr.x, tr.labels)
    return v, time.perf_counter() - t0


def combined_rows(pattern: str) -> list[list[EvalRow]]:
    """EvalRows of every .jsonl file matching `pattern`, grouped by seed (one list per seed)."""
    import glob

    by_seed: dict[int, list[EvalRow]] = defaultdict(list)
    for path in sorted(glob.glob(pattern)):
        for line in Path(path).read_text().splitlines():
            d = json.loads(line)
            by_seed[d.pop("seed")].append(EvalRow(**d))
    return [by_seed[k] for k in sorted(by_seed)]


def aggregate(per_seed: list[list[EvalRow]]) -> list[dict]:
    groups: dict[tuple, list[EvalRow]] = defaultdict(list)
    order = []
    for rows in per_seed:
        for r in rows:
            k = (r.method, r.bits)
            if k not in groups:
                order.append(k)
            groups[k].append(r)
    out = []
    for k in order:
        rs = groups[k]
        ok = [r for r in rs if r.map == r.map]
        d = {"method": k[0], "bits": k[1], "n_seeds": len(ok), "maps": [r.map for r in ok],
             "note": next((r.note for r in rs if r.note), "")}
        for col in ("map", "p_at_100", "map_at_1000", "map_at_1000_lit", "map_at_5000_lit", "ann_recall_at_10",
                    "val_map", "fit_s", "bytes_per_item"):
            vals = [getattr(r, col) for r in ok]
            d[col], d[col + "_std"] = mean_std(vals) if vals else (float("nan"), float("nan"))
        out.append(d)
    return out


def markdown(agg: list[dict], bits: list[int], title: str) -> str:
    methods = list(dict.fromkeys(r["method"] for r in agg))
    cell = {(r["method"], r["bits"]): r for r in agg}
    lines = [f"**{title}**", "", "| method | " + " | ".join(f"{b} bits" for b in bits) + " | float / other |",
             "|---|" + "---|" * (len(bits) + 1)]
    for m in methods:
        cells = []
        other = [r for r in agg if r["method"] == m and r["bits"] not in bits]
        for b in bits:
            r = cell.get((m, b))
            cells.append("" if r is None else _fmt(r))
        lines.append(f"| {m} | " + " | ".join(cells) + " | " + "; ".join(_fmt(r) for r in other) + " |")
    return "\n".join(lines)


def _fmt(r: dict) -> str:
    if r["n_seeds"] == 0:
        return "not run: " + r["note"].removeprefix("not run: ")[:80]
    return f"{r['map']:.4f} ± {r['map_std']:.4f}"


def detail(agg: list[dict]) -> str:
    lines = ["| method | bits | mAP@all | mAP@1000 (min(R,rel)) | mAP@1000 (papers) | mAP@5000 (papers) | "
             "P@100 | ANN recall@10 | val mAP | seeds |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in agg:
        if r["n_seeds"] == 0:
            continue
        lines.append(f"| {r['method']} | {r['bits']} | {r['map']:.4f} ± {r['map_std']:.4f} | {r['map_at_1000']:.4f} | "
                     f"{r['map_at_1000_lit']:.4f} | {r['map_at_5000_lit']:.4f} | {r['p_at_100']:.4f} | "
                     f"{r['ann_recall_at_10']:.3f} | {r['val_map']:.4f} | {r['n_seeds']} |")
    return "\n".join(lines)


def claims(agg: list[dict]) -> list[str]:
    """Seed-paper claims as verdicts (win / tie / loss outside the spread)."""
    cell = {(r["method"], r["bits"]): r["maps"] for r in agg if r["n_seeds"]}
    out = []

    def cmp(a, b, label):
        if a in cell and b in cell:
            out.append(f"- {label}: {verdict(cell[a], cell[b])} "
                       f"({np.mean(cell[a]):.4f} vs {np.mean(cell[b]):.4f})")

    for b in (8, 16, 32, 64):
        cmp(("drq", b), ("pq", b), f"DRQ@{b} > PQ@{b}")
        cmp(("drq", b), ("itq", b), f"DRQ@{b} > ITQ@{b}")
        cmp(("drq", b), ("drq-emb+pq", b), f"DRQ@{b} > PQ on DRQ's own embedding @{b} (the quantiser's gain)")
        cmp(("drq", b), ("drq-emb+rq", b), f"DRQ@{b} > plain RQ on DRQ's own embedding @{b}")
        cmp(("llc", b), ("itq", 2 * b), f"LLC@{b} > ITQ@{2 * b}")
        cmp(("drq", b), ("drq-levels (per-level codebooks, no scalars)", b),
            f"DRQ@{b} > per-level codebooks @{b} (the shared codebook's gain)")
        cmp(("drq", b), ("drq-per-length", b), f"DRQ (one model)@{b} vs a model trained for {b} bits")
    for b in GSL_BITS:
        cmp(("gsl", b), ("gsl-none", b), f"GSL@{b} > gsl-none@{b}")
        cmp(("gsl", b), ("gsl-qloss", b), f"GSL@{b} > gsl-qloss@{b} (matched strength)")
    return out


def fit_times(agg: list[dict]) -> str:
    """Training seconds of the DRQ models, mean ± std over seeds: one model serves every length, a
    per-length model serves one (their sum is what per-length training costs)."""
    first = {}
    for r in agg:
        if r["n_seeds"] and r["method"].startswith("drq") and "emb" not in r["method"]:
            first.setdefault(r["method"] if r["method"] != "drq-per-length" else (r["method"], r["bits"]), r)
    lines = ["| DRQ model | fit s (mean ± std) |", "|---|---|"]
    for k, r in first.items():
        name = k if isinstance(k, str) else f"{k[0]} {k[1]} bits"
        lines.append(f"| {name} | {r['fit_s']:.0f} ± {r['fit_s_std']:.0f} |")
    per_len = [r for k, r in first.items() if not isinstance(k, str)]
    if per_len and "drq" in first:  # the longest per-length model is the drq model itself
        total = sum(r["fit_s"] for r in per_len) + first["drq"]["fit_s"]
        lines.append(f"| a model per length, all {len(per_len) + 1} (the longest is drq) | {total:.0f} |")
    return "\n".join(lines)


def plot(agg: list[dict], protocol: str) -> bytes:
    """mAP vs bits with ± std bars (infra/reports.plot_png): codes as lines, float ceilings as dashes."""
    from infra.reports import plot_png

    keep = ("float-cos", "itq", "pq", "drq", "drq-emb", "drq-emb+pq", "drq-emb+rq", "llc", "gsl", "gsl-none",
            "gsl-qloss")
    rows = [{"method": r["method"].split(" (")[0], "bits": r["bits"], "map": r["map"], "map_std": r["map_std"]}
            for r in agg if r["method"].split(" (")[0] in keep and r["n_seeds"]]
    return plot_png(rows, f"{protocol} protocol: mAP@all vs bits (mean ± std, {max(r['n_seeds'] for r in agg)} seeds)")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--protocol", choices=["seen", "unseen", "wordnet"], default="seen")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--bits", default="8,16,32,64")
    ap.add_argument("--features", default="/tmp/sci")
    ap.add_argument("--out", default="/tmp/sci")
    ap.add_argument("--rows", help="comma-separated row names (before ' ('): run only those")
    ap.add_argument("--combine", help="glob of .jsonl row files: aggregate them into one table, run nothing")
    ap.add_argument("--plot", help="only redraw: read OUT/science_PROTOCOL.json, write this PNG")
    a = ap.parse_args()
    if a.plot:
        agg = json.loads(Path(a.out, f"science_{a.protocol}.json").read_text())
        Path(a.plot).write_bytes(plot(agg, a.protocol))
        return 0
    bits = [int(b) for b in a.bits.split(",")]
    if a.combine:
        agg = aggregate(combined_rows(a.combine))
        text = "\n\n".join([markdown(agg, bits, f"{a.protocol} protocol, combined from {a.combine}"), detail(agg),
                             "\n".join(claims(agg)), fit_times(agg)])
        Path(a.out, f"science_{a.protocol}_combined.md").write_text(text + "\n")
        Path(a.out, f"science_{a.protocol}_combined.json").write_text(json.dumps(agg, indent=1))
        print(text)
        return 0
    torch.set_num_threads(1)
    seeds = [int(s) for s in a.seeds.split(",")]
    sp, no_train = splits(a.protocol, Path(a.features))
    t0 = time.time()

    def log(msg):
        print(f"[{time.time() - t0:6.0f} s] {msg}", flush=True)

    log(f"{a.protocol}: train {len(sp['train'].labels)}, val {len(sp['val'].labels)}, query {len(sp['query'].labels)}, "
        f"gallery {len(sp['database'].labels)}, classes {len(np.unique(sp['train'].labels))}")
    only = set(a.rows.split(",")) if a.rows else None
    stem = f"science_{a.protocol}" + ("_" + a.rows.replace(",", "+") if only else "")
    partial = Path(a.out, f"{stem}_{'+'.join(map(str, seeds))}.jsonl")
    per_seed = [run_seed(sp, no_train, bits, s, log, only, partial) for s in seeds]
    agg = aggregate(per_seed)
    title = (f"{a.protocol} protocol: mAP@all, mean ± std over seeds {seeds} (query vs gallery; "
             f"val-selected settings)")
    text = "\n\n".join([markdown(agg, bits, title), detail(agg), "\n".join(claims(agg)), fit_times(agg)])
    Path(a.out, f"{stem}.md").write_text(text + "\n")
    Path(a.out, f"{stem}.json").write_text(json.dumps(agg, indent=1))
    if not only:
        Path(a.out, f"{stem}.png").write_bytes(plot(agg, a.protocol))
    print(text)
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
