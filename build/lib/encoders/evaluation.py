"""The evaluation protocol (METHODS.md) as pure functions: fit on train, select on val, report on
query vs database. One row per method x code length, with cost figures beside mAP.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import numpy as np

from encoders.coders import Coder, make_coder
from encoders.metrics import mean_average_precision
from encoders.ood import auroc, detection_rates, fpr_at_tpr

# Row variants of one coder family: name -> (registry method, extra config, trains one model per length?)
VARIANTS: dict[str, tuple[str, dict[str, Any], bool]] = {
    "float": ("float", {}, False),
    "lsh": ("lsh", {}, True),
    "pca-rr": ("pca-rr", {}, True),
    "itq": ("itq", {}, True),
    "pq": ("pq", {}, True),
    "opq": ("opq", {}, True),
    "drq": ("drq", {}, False),  # ONE model, every length a prefix
    "drq-per-length": ("drq", {}, True),  # the paper's comparison: one DRQ per length
    "llc": ("llc", {}, True),
    "gsl": ("gsl", {"mode": "gsl"}, True),
    "gsl-none": ("gsl", {"mode": "none"}, True),
    "gsl-qloss": ("gsl", {"mode": "qloss"}, True),
}
BASELINES = ("lsh", "pca-rr", "itq", "pq", "opq", "float")


@dataclass(frozen=True)
class Split:
    """Features and labels of one split."""

    x: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True)
class EvalRow:
    method: str
    bits: int
    map: float
    p_at_100: float
    bytes_per_item: int
    fit_s: float
    encode_us_per_item: float
    search_ms_per_query: float
    val_map: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def score_coder(coder: Coder, bits: int, db_codes: np.ndarray, query: Split, database: Split,
                R: int | None, search_sample: int = 100, k: int = 100) -> tuple[dict[str, float], float]:
    """(metrics, search ms/query) of a fitted coder at `bits` over pre-encoded database codes.
    Search time is the coder's own top-k over all database codes for `search_sample` queries."""
    m = mean_average_precision(lambda sl: coder.scores(query.x[sl], db_codes, bits), query.labels,
                               database.labels, R=R, precision_ks=(100,))
    sample = query.x[:search_sample]
    _, dt = _timed(lambda: coder.search(sample, db_codes, k, bits))
    return m, 1e3 * dt / len(sample)


def evaluate_variant(variant: str, bits_list: Sequence[int], train: Split, val: Split, query: Split,
                     database: Split, R: int | None = None, seed: int = 0,
                     params: dict[str, Any] | None = None,
                     fitted: Coder | None = None, fitted_s: float | None = None) -> list[EvalRow]:
    """Rows for one variant at each length. Multi-length variants fit once at max(bits_list) (or use
    `fitted`, a registered coder, with its recorded fit time); per-length ones fit once per length.
    Cost: the fits + encoding the database once per model + nq x n scoring per length."""
    method, extra, per_length = VARIANTS[variant]
    cfg = {**extra, **(params or {})}
    rows: list[EvalRow] = []

    def one_model(bits: int) -> tuple[Coder, float]:
        coder = make_coder(method, bits=bits, seed=seed, **cfg)
        _, fit_s = _timed(lambda: coder.fit(train.x, train.labels, (val.x, val.labels)))
        return coder, fit_s

    def rows_for(coder: Coder, fit_s: float, lengths: Sequence[int]) -> None:
        db_codes, enc_s = _timed(lambda: coder.encode(database.x))
        train_codes = coder.encode(train.x)  # val queries are scored against the train split
        for bits in lengths:
            m, ms = score_coder(coder, bits, db_codes, query, database, R)
            vm = mean_average_precision(lambda sl: coder.scores(val.x[sl], train_codes, bits), val.labels,
                                        train.labels)
            rows.append(EvalRow(variant, bits, round(m["map"], 5), round(m["p_at_100"], 5),
                                coder.bytes_per_item(bits), round(fit_s, 3),
                                round(1e6 * enc_s / len(database.x), 3), round(ms, 4), round(vm["map"], 5)))

    if method == "float":
        coder, fit_s = one_model(0)
        rows_for(coder, fit_s, [coder.full_bits])
    elif per_length:
        for bits in bits_list:
            coder, fit_s = one_model(bits)
            rows_for(coder, fit_s, [bits])
    else:
        if fitted is not None:
            coder, fit_s = fitted, float(fitted_s or 0.0)
        else:
            coder, fit_s = one_model(max(bits_list))
        rows_for(coder, fit_s, [b for b in bits_list if b in coder.lengths])
    return rows


def random_coder_map(query: Split, database: Split, seed: int = 0) -> float:
    """mAP of uniformly random scores: the floor any coder must clear (~1/classes when balanced)."""
    rng = np.random.default_rng(seed)
    return mean_average_precision(lambda sl: rng.random((sl.stop - sl.start, len(database.labels)),
                                                       dtype=np.float32),
                                  query.labels, database.labels)["map"]


def ood_report(coder: Any, x_in: np.ndarray, x_out: np.ndarray) -> dict[str, float]:
    """Held-out-class detection figures of a fitted LLC coder (METHODS.md, "LLC"). Pure.

    coder: fitted on the in-distribution classes only (needs `class_distances`, `ood_flag`,
    `msp_score`, `radius`, `d_min`, `config.bits`). x_in: (n_in, D) features of in-distribution
    classes; x_out: (n_out, D) features of held-out classes. Positive = in-distribution, higher
    score = more in-distribution (encoders/ood.py); *_fpr95 = FPR at 95% TPR:
      llc_*: score = minus the Hamming distance of the instance code to its nearest class code
             (an integer score: AUROC counts ties 1/2, FPR interpolates inside tied blocks);
      msp_*: the phase-1 classifier's max-softmax probability (the baseline);
      flag_tpr / flag_fpr: fraction of in- / out-of-distribution items accepted (not flagged) by
             the threshold-free `ood_flag`; flag_fpr is the OOD items it misses.
    Cost: three MLP forward passes (instance head twice, phase-1 trunk once) over n_in + n_out
    rows, plus O(n log n) ranking.
    """
    x_in = np.ascontiguousarray(x_in, dtype=np.float32)
    x_out = np.ascontiguousarray(x_out, dtype=np.float32)
    if len(x_in) == 0 or len(x_out) == 0:
        raise ValueError(f"need in- and out-of-distribution rows, got {len(x_in)} and {len(x_out)}")
    x = np.concatenate([x_in, x_out])
    is_in = np.r_[np.ones(len(x_in), bool), np.zeros(len(x_out), bool)]
    llc = -coder.class_distances(x).min(1).astype(np.float64)
    msp = np.asarray(coder.msp_score(x), dtype=np.float64)
    flag_tpr, flag_fpr = detection_rates(~np.asarray(coder.ood_flag(x), bool), is_in)
    return {"bits": int(coder.config.bits), "d_min": int(coder.d_min), "radius": int(coder.radius),
            "n_in": int(len(x_in)), "n_out": int(len(x_out)),
            "llc_auroc": auroc(llc, is_in), "llc_fpr95": fpr_at_tpr(llc, is_in, 0.95),
            "msp_auroc": auroc(msp, is_in), "msp_fpr95": fpr_at_tpr(msp, is_in, 0.95),
            "flag_tpr": flag_tpr, "flag_fpr": flag_fpr}
