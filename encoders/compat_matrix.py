"""The compatibility matrix of a model update and its gate (METHODS.md, "Dual-Tuning"):
M(old,old), M(new,new) and M(new query, old gallery) (mAP@all and top-1, both tie-aware, from
`encoders/metrics.py`, per query because the negative-flip rate needs per-query top-1) on float
features (`compat_matrix`) or on a coder's codes (`code_compat_matrix`), the update gain, the
negative-flip rate, the ship rule (`CompatReport.gate`) and its decision record (`GateDecision`).
Pure numpy, no I/O."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from encoders import metrics

# Default bound on the negative-flip rate (NFR: the fraction of ALL queries that are right at top-1
# under M(old,old) and wrong under M(new,old), the definition of Yan et al., "Positive-congruent
# training", CVPR 2021). A model that raises mAP while breaking more than a quarter of the answers
# users had is refused. The measured figures (BENCHMARKS.md section 7: Dual-Tuning ~0.20, BCT ~0.24-0.27,
# independent ~0.76 on the 5 -> 10 class Fashion-MNIST update) are far above the 2-5 % the
# literature reports for same-class ImageNet updates; a tighter bound refuses every method here.
DEFAULT_MAX_FLIP_RATE = 0.25


def cosine_scores(q: np.ndarray, g: np.ndarray) -> np.ndarray:
    """(nq, ng) cosine similarity, higher is closer."""
    qn = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    gn = g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)
    return (qn @ gn.T).astype(np.float32)


def average_precision_from_scores(scores: np.ndarray, q_labels: np.ndarray,
                                  g_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Tie-aware AP@all and top-1 of each query from a (nq, ng) score matrix (higher = closer),
    relevance = same label, via `encoders.metrics` (exact expectation over orders of tied
    scores; top-1 = expected P@1). Returns (ap (nq,), top1 (nq,)) float64; a query with no
    relevant item scores 0. Cost O(nq ng log ng); ~32 B of temporaries per (query, item).
    """
    scores = np.asarray(scores)
    rel = np.asarray(q_labels).reshape(-1, 1) == np.asarray(g_labels).reshape(1, -1)
    blocks = metrics.tie_blocks(scores, rel)
    return metrics.ap_from_blocks(blocks), metrics.hits_from_blocks(blocks, 1)


CELLS = (("old", "old"), ("new", "new"), ("new", "old"))


def _cell(q: str, g: str) -> str:
    return f"M({q},{g})"


@dataclass
class CompatReport:
    """Compatibility matrix of one model update, on one query set and gallery.

    map / top1: {"M(old,old)": ..., "M(new,new)": ..., "M(new,old)": ...} (query model, gallery
    model). update_gain (mAP) = [M(new,old) - M(old,old)] / [M(new,new) - M(old,old)], nan when
    the denominator is 0. negative_flip_rate: fraction of queries right at top-1 under old/old
    and wrong under new/old (tie-aware: mean of p_old_old * (1 - p_new_old)).
    max_negative_flip_rate: the gate also refuses a model whose negative flip rate is above it
    (mAP can rise while single queries users relied on break); DEFAULT_MAX_FLIP_RATE unless set,
    None switches the bound off.
    """

    map: dict[str, float]
    top1: dict[str, float]
    negative_flip_rate: float
    n_queries: int
    n_gallery: int
    extra: dict[str, float] = field(default_factory=dict)
    max_negative_flip_rate: float | None = DEFAULT_MAX_FLIP_RATE

    @staticmethod
    def _gain(m: dict[str, float]) -> float:
        den = m["M(new,new)"] - m["M(old,old)"]
        return float("nan") if den == 0 else (m["M(new,old)"] - m["M(old,old)"]) / den

    @property
    def update_gain(self) -> float:
        return self._gain(self.map)

    @property
    def update_gain_top1(self) -> float:
        return self._gain(self.top1)

    def gate(self) -> tuple[bool, str]:
        """Ship rule on mAP: M(new,old) > M(old,old) and M(new,new) > M(old,old), and, when
        `max_negative_flip_rate` is set, negative flips <= it. Returns (passed, reason); the
        reason names every failing condition with its numbers."""
        m = self.map
        oo = m["M(old,old)"]
        fails, oks = [], []
        for cell in ("M(new,old)", "M(new,new)"):
            (oks if m[cell] > oo else fails).append(
                f"{cell}={m[cell]:.4f} {'>' if m[cell] > oo else '<='} M(old,old)={oo:.4f}")
        bound = self.max_negative_flip_rate
        if bound is not None:
            ok = self.negative_flip_rate <= bound
            (oks if ok else fails).append(
                f"negative flips {self.negative_flip_rate:.4f} {'<=' if ok else '>'} {bound:.4f}")
        if fails:
            return False, "gate failed: " + "; ".join(fails)
        return True, "gate passed: " + "; ".join(oks)

    def as_dict(self) -> dict:
        passed, reason = self.gate()
        return {"map": dict(self.map), "top1": dict(self.top1), "update_gain": self.update_gain,
                "update_gain_top1": self.update_gain_top1,
                "negative_flip_rate": self.negative_flip_rate,
                "max_negative_flip_rate": self.max_negative_flip_rate, "gate_passed": passed,
                "gate_reason": reason, "n_queries": self.n_queries, "n_gallery": self.n_gallery,
                **self.extra}

    def table(self) -> str:
        rows = [f"{'cell':<12}{'mAP':>8}{'top-1':>8}"]
        for q, g in CELLS:
            c = _cell(q, g)
            rows.append(f"{c:<12}{self.map[c]:>8.4f}{self.top1[c]:>8.4f}")
        rows.append(f"update gain {self.update_gain:.3f} (top-1 {self.update_gain_top1:.3f}), "
                    f"negative flips {self.negative_flip_rate:.4f}")
        return "\n".join(rows)


@dataclass(frozen=True)
class GateDecision:
    """The decision record of one model update: decided on `split` (val), never on query.

    passed / reason: `CompatReport.gate()` of the val matrix; map / negative_flip_rate /
    max_negative_flip_rate: the numbers it decided on; n_queries / n_gallery: the val sizes."""

    passed: bool
    reason: str
    split: str
    map: dict[str, float]
    top1: dict[str, float]
    negative_flip_rate: float
    max_negative_flip_rate: float | None
    update_gain: float
    n_queries: int
    n_gallery: int

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def decide_gate(report: CompatReport, split: str, max_negative_flip_rate: float | None = DEFAULT_MAX_FLIP_RATE
                ) -> GateDecision:
    """Apply the ship rule to a matrix measured on `split`; refuses to decide on 'query'."""
    if split == "query":
        raise ValueError("the gate decides on val (train/val rows only), never on the query split")
    report.max_negative_flip_rate = max_negative_flip_rate
    passed, reason = report.gate()
    return GateDecision(passed, reason, split, dict(report.map), dict(report.top1), report.negative_flip_rate,
                        max_negative_flip_rate, report.update_gain, report.n_queries, report.n_gallery)


def compat_matrix(query_feats: dict[str, np.ndarray], gallery_feats: dict[str, np.ndarray],
                  q_labels: np.ndarray, g_labels: np.ndarray,
                  score_fn: Callable[[np.ndarray, np.ndarray], np.ndarray] = cosine_scores,
                  chunk: int = 64) -> CompatReport:
    """Fill M(old,old), M(new,new), M(new,old) for mAP@all and top-1.

    query_feats / gallery_feats: {"old": (n, D_old), "new": (n, D_new)} features of the same
    query rows / gallery rows by each model; "new" query features used against the old gallery
    must be in the old space (project first). score_fn(q, g) -> (nq, ng), higher = closer; it is
    called on `chunk` queries at a time. Cost: 3 x O(nq ng (D + log ng)); memory ~32 B x chunk
    x ng; ~10-20 s for 1,000 x 69,000 on 2 shared cores.
    """
    _check_cells(query_feats, gallery_feats)
    if query_feats["new"].shape[1] != gallery_feats["old"].shape[1]:
        raise ValueError(f"new query dim {query_feats['new'].shape[1]} != old gallery dim "
                         f"{gallery_feats['old'].shape[1]}: project the new features first")
    return _fill_matrix(query_feats, gallery_feats, q_labels, g_labels, score_fn, chunk)


def code_compat_matrix(coder, bits: int, query_feats: dict[str, np.ndarray],
                       gallery_codes: dict[str, np.ndarray], q_labels: np.ndarray,
                       g_labels: np.ndarray, chunk: int = 64) -> CompatReport:
    """The same matrix on compact codes (METHODS.md: "report the same matrix on codes").

    coder: a fitted `encoders.coders.Coder`, trained on OLD features (the stored codes' coder).
    query_feats: {"old", "new"} float query features (the new ones in the old space);
    gallery_codes: {"old", "new"} full-length codes of the gallery made by `coder.encode` from
    old / new gallery features. Scores are `coder.scores(queries, codes, bits)` (Hamming for
    symmetric coders, asymmetric tables otherwise), so ties are scored tie-aware.
    `extra` carries {"bits": bits}. Cost: 3 x (encode/score nq x ng at `bits`).
    """
    _check_cells(query_feats, gallery_codes)
    if bits not in coder.lengths:
        raise ValueError(f"{bits} bits not in the coder's lengths {coder.lengths}")
    rep = _fill_matrix(query_feats, gallery_codes, q_labels, g_labels,
                       lambda q, g: coder.scores(q, g, bits), chunk)
    rep.extra["bits"] = bits
    return rep


def _check_cells(query: dict, gallery: dict) -> None:
    for name, d in (("query", query), ("gallery", gallery)):
        if not {"old", "new"} <= set(d):
            raise ValueError(f"{name} needs keys 'old' and 'new', got {sorted(d)}")


def _fill_matrix(query: dict[str, np.ndarray], gallery: dict[str, np.ndarray],
                 q_labels: np.ndarray, g_labels: np.ndarray,
                 score_fn: Callable[[np.ndarray, np.ndarray], np.ndarray], chunk: int) -> CompatReport:
    maps, top1s, per_q = {}, {}, {}
    q_labels, g_labels = np.asarray(q_labels), np.asarray(g_labels)
    for q, g in CELLS:
        aps, t1s = [], []
        for s in range(0, len(q_labels), chunk):  # bounded memory: chunk x ng scores at a time
            ap, t1 = average_precision_from_scores(
                score_fn(query[q][s:s + chunk], gallery[g]), q_labels[s:s + chunk], g_labels)
            aps.append(ap)
            t1s.append(t1)
        ap, t1 = np.concatenate(aps), np.concatenate(t1s)
        maps[_cell(q, g)], top1s[_cell(q, g)], per_q[(q, g)] = float(ap.mean()), float(t1.mean()), t1
    nfr = float(np.mean(per_q[("old", "old")] * (1.0 - per_q[("new", "old")])))
    return CompatReport(maps, top1s, nfr, len(q_labels), len(g_labels))
