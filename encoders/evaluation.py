"""The evaluation protocol (METHODS.md) as pure functions: fit on train, select on val, report on
query vs database. One row per method x code length, with cost figures beside mAP.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import numpy as np

from encoders.coders import Coder, make_coder
from encoders import metrics
from encoders.metrics import mean_average_precision
from encoders.ood import auroc, detection_rates, fpr_at_tpr

LOG = logging.getLogger(__name__)

# Row variants: name -> (registry method, extra config, trains one model per length?).
# Derived rows ("+emb", "float-cos", ...) are built from a base variant's fitted coder (DERIVED).
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
# Ceiling and isolation rows (encoders/views.py): name -> (base variant, view)
DERIVED: dict[str, tuple[str, str]] = {
    "float-cos": ("float", "cosine"),      # cosine on L2-normalised features: the fair float ceiling
    "drq-emb": ("drq", "embedding"),       # DRQ's own float embedding (its ceiling)
    "drq-emb+pq": ("drq", "pq"),           # the same embedding, plain PQ: DRQ's quantiser gain isolated
    "drq-emb+rq": ("drq", "rq"),           # the same embedding, plain residual quantisation (per-level codebooks)
    "gsl-emb": ("gsl", "embedding"),
    "gsl-none-emb": ("gsl-none", "embedding"),
}
BASELINES = ("lsh", "pca-rr", "itq", "pq", "opq", "float")
CUTOFFS = (1000, 5000)   # mAP@R cut-offs of the hashing literature, beside mAP@all


@dataclass(frozen=True)
class Split:
    """Features and labels of one split."""

    x: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True)
class EvalRow:
    """One method x length. map* are means over `n_seeds` seeds, *_std their sample std.
    map = mAP@all (normaliser: all relevant items); map_at_R normalises by min(R, relevant);
    map_at_R_lit by the relevant items retrieved in the top R (the hashing papers' evaluation
    code, e.g. DPSH/HashNet `CalcTopMap`). ann_recall_at_10: top-10 of the codes vs the exact
    top-10 in the float space the code quantises (nan where there is none). note: why a row is empty."""

    method: str
    bits: int
    map: float
    p_at_100: float
    bytes_per_item: int
    fit_s: float
    encode_us_per_item: float
    search_ms_per_query: float
    val_map: float
    map_std: float = 0.0
    n_seeds: int = 1
    map_at_1000: float = float("nan")
    map_at_1000_lit: float = float("nan")
    map_at_5000_lit: float = float("nan")
    ann_recall_at_10: float = float("nan")
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def retrieval_metrics(score_chunk: Callable[[slice], np.ndarray], q_labels: np.ndarray, db_labels: np.ndarray,
                      chunk: int = 16) -> dict[str, float]:
    """mAP@all, P@100, mAP@R (min(R, relevant) normaliser) and mAP@R with the hashing papers'
    normaliser (relevant retrieved in the top R; ratio of tie-aware expectations) for R in CUTOFFS,
    in one pass over query chunks. Cost: as `mean_average_precision` (one scoring pass)."""
    ql, dl = np.asarray(q_labels), np.asarray(db_labels)
    acc: dict[str, float] = {}
    for i in range(0, len(ql), chunk):
        sl = slice(i, min(i + chunk, len(ql)))
        blocks = metrics.tie_blocks(np.asarray(score_chunk(sl)), ql[sl, None] == dl[None, :])
        parts = {"map": metrics.ap_from_blocks(blocks), "p_at_100": metrics.hits_from_blocks(blocks, 100) / min(100, len(dl))}
        for R in CUTOFFS:
            ap = metrics.ap_from_blocks(blocks, R)
            hits = metrics.hits_from_blocks(blocks, R)
            parts[f"map_at_{R}"] = ap
            parts[f"map_at_{R}_lit"] = np.divide(ap * np.minimum(blocks.total_rel, min(R, len(dl))), hits,
                                                 out=np.zeros_like(ap), where=hits > 0)
        for k, v in parts.items():
            acc[k] = acc.get(k, 0.0) + float(np.sum(v))
    return {k: v / len(ql) for k, v in acc.items()}


def ann_recall(coder: Coder, bits: int, db_codes: np.ndarray, exact_scores: Callable[[np.ndarray], np.ndarray] | None,
               queries: np.ndarray, k: int = 10) -> float:
    """Mean |top-k by the code ∩ exact top-k| / k; `exact_scores(q)` scores q against the database in
    the float space the code quantises (None: no such space, nan). Ties at the k-th code score are
    broken by the coder's `search` order."""
    if exact_scores is None or len(queries) == 0:
        return float("nan")
    _, got = coder.search(queries, db_codes, k, bits)
    ex = exact_scores(queries)
    true = np.argpartition(-ex, k - 1, axis=1)[:, :k]
    return float(np.mean([len(np.intersect1d(a, b)) / k for a, b in zip(got, true)]))


def _exact_space(coder: Coder, database_x: np.ndarray) -> Callable[[np.ndarray], np.ndarray] | None:
    """Exact float scoring in the space a coder quantises: its embedding (cosine) when it has one,
    else the raw features by L2; None for LLC (sign of a classifier's logits: no float space searched)."""
    if coder.method == "llc":
        return None
    if hasattr(coder, "embed"):
        e = coder.embed(database_x)
        return lambda q: coder.embed(q) @ e.T
    import faiss

    return lambda q: -faiss.pairwise_distances(np.ascontiguousarray(q, np.float32),
                                               np.ascontiguousarray(database_x, np.float32))


def score_coder(coder: Coder, bits: int, db_codes: np.ndarray, query: Split, database: Split,
                R: int | None, search_sample: int = 100, k: int = 100) -> tuple[dict[str, float], float]:
    """(metrics, search ms/query) of a fitted coder at `bits` over pre-encoded database codes.
    Search time is the coder's own top-k over all database codes for `search_sample` queries."""
    if R is None:
        m = retrieval_metrics(lambda sl: coder.scores(query.x[sl], db_codes, bits), query.labels, database.labels)
    else:
        m = mean_average_precision(lambda sl: coder.scores(query.x[sl], db_codes, bits), query.labels,
                                   database.labels, R=R, precision_ks=(100,))
    sample = query.x[:search_sample]
    _, dt = _timed(lambda: coder.search(sample, db_codes, k, bits))
    return m, 1e3 * dt / len(sample)


def _fit(method: str, cfg: dict[str, Any], bits: int, seed: int, train: Split, val: Split) -> tuple[Coder, float]:
    coder = make_coder(method, bits=bits, seed=seed, **cfg)
    _, fit_s = _timed(lambda: coder.fit(train.x, train.labels, (val.x, val.labels)))
    return coder, fit_s


def evaluate_variant(variant: str, bits_list: Sequence[int], train: Split, val: Split, query: Split,
                     database: Split, R: int | None = None, seed: int = 0,
                     params: dict[str, Any] | None = None,
                     fitted: Coder | None = None, fitted_s: float | None = None,
                     ann_queries: int = 100) -> list[EvalRow]:
    """Rows for one variant (or DERIVED row) at each length, one seed. Multi-length variants fit once
    at max(bits_list) (or use `fitted`, a registered coder, with its recorded fit time); per-length
    ones fit once per length. val scores are val queries vs the train gallery (selection only).
    Cost: the fits + encoding the database once per model + nq x n scoring per length."""
    if variant in DERIVED:
        return _derived_rows(variant, bits_list, train, val, query, database, R, seed, params, ann_queries)
    method, extra, per_length = VARIANTS[variant]
    cfg = {**extra, **(params or {})}
    rows: list[EvalRow] = []

    def rows_for(coder: Coder, fit_s: float, lengths: Sequence[int]) -> None:
        rows.extend(_rows_of(coder, variant, train, val, query, database, R, fit_s, ann_queries, list(lengths)))

    if method == "float":
        coder, fit_s = _fit(method, cfg, 0, seed, train, val)
        rows_for(coder, fit_s, [coder.full_bits])
    elif per_length:
        for bits in bits_list:
            coder, fit_s = _fit(method, cfg, bits, seed, train, val)
            rows_for(coder, fit_s, [bits])
    else:
        if fitted is not None:
            coder, fit_s = fitted, float(fitted_s or 0.0)
        else:
            coder, fit_s = _fit(method, cfg, max(bits_list), seed, train, val)
        rows_for(coder, fit_s, [b for b in bits_list if b in coder.lengths])
    return rows


def _derived_rows(variant, bits_list, train, val, query, database, R, seed, params, ann_queries) -> list[EvalRow]:
    from encoders.views import CosineView, EmbeddingCoder, quantised_embedding

    base, view = DERIVED[variant]
    method, extra, per_length = VARIANTS[base]
    cfg = {**extra, **(params or {})}
    out: list[EvalRow] = []
    # one base model: DRQ at its longest code; a per-length base (GSL) at the longest length
    top = max(bits_list)
    bases = {top: _fit(method, cfg, 0 if method == "float" else top, seed, train, val)}
    if view in ("cosine", "embedding"):
        for b, (coder, fit_s) in sorted(bases.items()):
            v = CosineView(coder) if view == "cosine" else EmbeddingCoder(coder)
            v.fit(train.x, train.labels)
            rows = _rows_of(v, variant, train, val, query, database, R, fit_s, ann_queries)
            if per_length:
                rows = [EvalRow(**{**r.as_dict(), "note": f"float embedding of the {b}-bit {base} model"})
                        for r in rows]
            out += rows
        return out
    coder, fit_s = bases[max(bits_list)]
    for b in bits_list:
        q = quantised_embedding(coder, view, b, seed)
        _, qs = _timed(lambda: q.fit(train.x, train.labels))
        out += _rows_of(q, variant, train, val, query, database, R, fit_s + qs, ann_queries, [b])
    return out


def _rows_of(coder, name, train, val, query, database, R, fit_s, ann_queries, lengths=None) -> list[EvalRow]:
    rows: list[EvalRow] = []
    db_codes, enc_s = _timed(lambda: coder.encode(database.x))
    train_codes = coder.encode(train.x)
    exact = _exact_space(coder, database.x) if ann_queries else None
    for bits in lengths or [coder.full_bits]:
        m, ms = score_coder(coder, bits, db_codes, query, database, R)
        vm = mean_average_precision(lambda sl: coder.scores(val.x[sl], train_codes, bits), val.labels, train.labels)
        rec = ann_recall(coder, bits, db_codes, exact, query.x[:ann_queries]) if exact is not None else float("nan")
        rows.append(EvalRow(name, bits, round(m["map"], 5), round(m["p_at_100"], 5), coder.bytes_per_item(bits),
                            round(fit_s, 3), round(1e6 * enc_s / len(database.x), 3), round(ms, 4),
                            round(vm["map"], 5), map_at_1000=round(m.get("map_at_1000", float("nan")), 5),
                            map_at_1000_lit=round(m.get("map_at_1000_lit", float("nan")), 5),
                            map_at_5000_lit=round(m.get("map_at_5000_lit", float("nan")), 5),
                            ann_recall_at_10=round(rec, 4)))
    return rows


def failed_rows(variant: str, bits_list: Sequence[int], error: BaseException) -> list[EvalRow]:
    """The row a method that cannot run on a dataset gets: empty figures, the reason in `note`."""
    nan = float("nan")
    reason = f"{type(error).__name__}: {error}"[:300]
    return [EvalRow(variant, int(b), nan, nan, 0, nan, nan, nan, nan, n_seeds=0, note=f"not run: {reason}")
            for b in bits_list]


def aggregate_seeds(per_seed: Sequence[Sequence[EvalRow]]) -> list[EvalRow]:
    """Rows of several seeds (same methods and lengths in the same order) -> one row each: metric
    columns are the mean, map_std the sample std of mAP over seeds, n_seeds the count."""
    if len(per_seed) == 1:
        return list(per_seed[0])
    out = []
    for group in zip(*per_seed):
        d = [r.as_dict() for r in group]
        keys = ("map", "p_at_100", "fit_s", "encode_us_per_item", "search_ms_per_query", "val_map", "map_at_1000",
                "map_at_1000_lit", "map_at_5000_lit", "ann_recall_at_10")
        mean = {k: round(float(np.mean([x[k] for x in d])), 5) for k in keys}
        std = float(np.std([x["map"] for x in d], ddof=1))
        out.append(EvalRow(**{**d[0], **mean, "map_std": round(std, 5), "n_seeds": len(d)}))
    return out


def evaluate_seeds(variant: str, bits_list: Sequence[int], train: Split, val: Split, query: Split, database: Split,
                   seeds: Sequence[int], R: int | None = None, params: dict[str, Any] | None = None,
                   **kw: Any) -> list[EvalRow]:
    """`evaluate_variant` over `seeds`, aggregated (mean, std); a method that raises gets
    `failed_rows` (the reason in `note`) instead of sinking the table."""
    try:
        runs = [evaluate_variant(variant, bits_list, train, val, query, database, R=R, seed=s, params=params, **kw)
                for s in seeds]
    except Exception as e:  # noqa: BLE001 - one method's failure is a row, not a crash (issue #16)
        per_length = variant in VARIANTS and VARIANTS[variant][2] or DERIVED.get(variant, ("", ""))[1] in ("pq", "rq")
        if per_length and len(bits_list) > 1:  # one length that cannot run does not take the others with it
            return [r for b in bits_list
                    for r in evaluate_seeds(variant, [b], train, val, query, database, seeds, R, params, **kw)]
        LOG.warning("evaluate %s failed: %s", variant, e)
        return failed_rows(variant, bits_list, e)
    return aggregate_seeds(runs)


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
             the threshold-free `ood_flag` (decoding radius); flag_fpr is the OOD items it misses;
      exact_tpr / exact_fpr: the same for the exact-match variant (accepted only on a class code).
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
    nearest = coder.class_distances(x).min(1)
    exact_tpr, exact_fpr = detection_rates(nearest == 0, is_in)  # the exact-match variant, side by side
    return {"bits": int(coder.config.bits), "d_min": int(coder.d_min), "radius": int(coder.radius),
            "n_in": int(len(x_in)), "n_out": int(len(x_out)),
            "llc_auroc": auroc(llc, is_in), "llc_fpr95": fpr_at_tpr(llc, is_in, 0.95),
            "msp_auroc": auroc(msp, is_in), "msp_fpr95": fpr_at_tpr(msp, is_in, 0.95),
            "flag_tpr": flag_tpr, "flag_fpr": flag_fpr, "exact_tpr": exact_tpr, "exact_fpr": exact_fpr}
