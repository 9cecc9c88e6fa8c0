"""Model selection on the val split, and the record of what was selected (issue #16: "val selects,
query reports").

Every hyper-parameter default of a learned coder that was chosen by measurement is chosen here, on
`val` queries against the `train` gallery, never on `query`. `select_on_val` runs a grid and returns
a `Selection` (the split, the metric, every candidate with its val score, the winner); the winners
recorded by `bench/select_on_val.py` are kept in `SELECTIONS`, and coder/model cards copy the
matching record so a card says how its settings were chosen. Pure: no I/O.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import numpy as np

from encoders.metrics import mean_average_precision

LOG = logging.getLogger(__name__)

SELECTION_SPLIT = "val"
SELECTION_METRIC = "mAP@all, val queries vs the train gallery (tie-aware)"

# The similarity loss every label-supervised embedding uses (DRQ, GSL and gsl-none, LLC phase 1):
# normalised-softmax proxies, logits = cos(z, proxy) / PROXY_TEMPERATURE. One value for all of them,
# so no method's lead is its temperature; selected on val by bench/select_on_val.py (SELECTIONS).
PROXY_TEMPERATURE = 0.4


@dataclass(frozen=True)
class Selection:
    """How one method's settings were chosen. candidates: [{"params": {...}, "val_score": x}];
    chosen: the params of the best val score; source: the command that measured it."""

    method: str
    split: str
    metric: str
    candidates: list[dict[str, Any]]
    chosen: dict[str, Any]
    source: str = ""
    notes: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def val_map(score_fn: Callable[[np.ndarray, np.ndarray], np.ndarray] | None, coder: Any, bits: int | None,
            train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray) -> float:
    """mAP@all of val queries against the train gallery for a fitted coder at `bits` (codes), or,
    with `score_fn(q, g)`, of any float scoring. Never touches query rows."""
    if score_fn is not None:
        return float(mean_average_precision(lambda sl: score_fn(val_x[sl], train_x), val_y, train_y)["map"])
    codes = coder.encode(train_x)
    return float(mean_average_precision(lambda sl: coder.scores(val_x[sl], codes, bits), val_y, train_y)["map"])


def select_on_val(method: str, candidates: Sequence[dict[str, Any]], score: Callable[[dict[str, Any]], float],
                  metric: str = SELECTION_METRIC, source: str = "", notes: str = "") -> Selection:
    """Score every candidate with `score(params)` (which must fit on train and measure on val) and
    keep the best; ties keep the earlier candidate. Cost: one fit + one val scoring per candidate."""
    if not candidates:
        raise ValueError(f"{method}: no candidates to select from")
    rows = []
    for p in candidates:
        s = float(score(dict(p)))
        LOG.info("select %s %s: val %.4f", method, p, s)
        rows.append({"params": dict(p), "val_score": round(s, 5)})
    best = max(range(len(rows)), key=lambda i: (rows[i]["val_score"], -i))
    return Selection(method, SELECTION_SPLIT, metric, rows, rows[best]["params"], source, notes)


# Recorded winners (bench/select_on_val.py on fashion-mnist SmallCNN features; BENCHMARKS.md
# "Selection on val"). Cards copy these; a method missing here records that its defaults were not
# selected by measurement.
_SRC = "bench/select_on_val.py /tmp/sci/fmnist_cnn.npz (2026-11-30), seed 0"
_T = [0.05, 0.1, 0.2, 0.4, 0.8]


def _grid(method: str, key: str, values: list, scores: list, chosen: dict, notes: str = "", metric: str = "") -> dict:
    return {"method": method, "split": SELECTION_SPLIT, "metric": metric or SELECTION_METRIC, "source": _SRC,
            "candidates": [{"params": {key: v}, "val_score": s} for v, s in zip(values, scores)],
            "chosen": chosen, "notes": notes}


SELECTIONS: dict[str, dict[str, Any]] = {
    "drq": _grid("drq", "proxy_temperature", _T, [0.7823, 0.8098, 0.8524, 0.8644, 0.8622],
                 {"proxy_temperature": 0.4, "assign": "l2", "score": "l2", "prefix_loss": True},
                 "mean over 8/16/32/64 bits. At T=0.4: assign cos 0.86434 vs l2 0.8644; prefix loss off "
                 "0.86223; score ip 0.86404, cos 0.86458, l2 0.8644 (all within 0.002: one seed, kept l2). "
                 "T is shared with gsl, gsl-none and llc (mean of the four: 0.4 best)."),
    "gsl": _grid("gsl", "lam", [0.5, 2.0, 6.0, 20.0], [0.8556, 0.8543, 0.8510, 0.8434],
                 {"lam": 0.5, "proxy_temperature": 0.4},
                 "32 bits. Temperature grid (lam 6): " + ", ".join(
                     f"T={t}: {s}" for t, s in zip(_T, [0.8061, 0.8253, 0.8433, 0.8510, 0.8483]))
                 + ". The smallest strength won: on val, snapping never beat gsl-none (0.8564 at T=0.4)."),
    "gsl-qloss": _grid("gsl-qloss", "qloss_weight", [0.25, 1.0, 3.0, 10.0], [0.8552, 0.8547, 0.8508, 0.8404],
                       {"qloss_weight": 0.25, "proxy_temperature": 0.4}, "matched strength qloss_weight = lam / 2"),
    "gsl-none": _grid("gsl-none", "proxy_temperature", _T, [0.7941, 0.8077, 0.8409, 0.8564, 0.8560],
                      {"proxy_temperature": 0.4}, "32 bits; the shared T"),
    "dual-tuning": {"method": "dual-tuning", "split": SELECTION_SPLIT,
                    "metric": "val M(new,old) mAP: 2,000 val queries (new model) vs the 10,000 train rows (old model)",
                    "source": "bench/dual_tuning_ablation.py --epochs 3 --gallery 10000 (2026-11-30), seed 0",
                    "candidates": [{"params": {"proto_weight": 1.0, "mutual_weight": 0.0}, "val_score": 0.6131},
                                   {"params": {"proto_weight": 0.0, "mutual_weight": 1.0}, "val_score": 0.6166},
                                   {"params": {"proto_weight": 1.0, "mutual_weight": 1.0}, "val_score": 0.6301}],
                    "chosen": {"proto_weight": 1.0, "mutual_weight": 1.0},
                    "notes": "seed 0; BCT 0.6174, independent 0.1288 on the same val matrix. Over seeds 0-2: "
                             "both 0.6377 +- 0.0090, prototype only 0.6233 +- 0.0099, structure only 0.6288 +- "
                             "0.0166, BCT 0.6301 +- 0.0173 (ties; both passed the gate on 3 of 3 seeds)"},
    "llc": _grid("llc", "proxy_temperature", _T + [0.0], [0.7992, 0.8010, 0.8043, 0.8103, 0.8042, 0.8062],
                 {"proxy_temperature": 0.4}, "16 bits; 0.0 = the paper's unnormalised logits z . B_c"),
}


def selection_record(method: str) -> dict[str, Any]:
    """The recorded selection of `method` ('drq', 'gsl', 'llc', 'dual-tuning'), or a record saying
    its settings are unselected defaults."""
    rec = SELECTIONS.get(method)
    if rec is None:
        return {"method": method, "split": None, "candidates": [], "chosen": None,
                "notes": "defaults not selected by measurement"}
    return dict(rec)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sample std) of per-seed values; std 0 for a single value."""
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def verdict(a: Sequence[float], b: Sequence[float]) -> str:
    """'win' / 'loss' when mean(a) - mean(b) is outside the spread (the sum of both seed stds, and
    never below 0.001), else 'tie'. With one seed each, the spread is unknown: 'tie (1 seed)' unless
    the gap exceeds 0.01."""
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    d = ma - mb
    if len(a) < 2 or len(b) < 2:
        return ("win" if d > 0 else "loss") if abs(d) > 0.01 else "tie (1 seed)"
    spread = max(sa + sb, 1e-3)
    return "win" if d > spread else "loss" if d < -spread else "tie"
