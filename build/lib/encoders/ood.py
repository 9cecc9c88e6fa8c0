"""Out-of-distribution detection metrics (pure numpy).

Convention: `labels` marks the positive class (1/True) and a higher score means "more positive".
For OOD reports we follow the max-softmax baseline paper: positive = in-distribution, so
FPR@95%TPR is the fraction of OOD items accepted while 95% of in-distribution items are kept.
AUROC is symmetric under swapping the positive class and negating the score.

Ties are handled the way a random tie-break would be on average: AUROC counts a tied
(positive, negative) pair as 1/2 (identical to `sklearn.metrics.roc_auc_score`), and
`fpr_at_tpr` interpolates linearly inside a tied block (the expected FPR of a randomised
threshold), which matters for integer scores such as Hamming distances.
"""
from __future__ import annotations

import numpy as np


def _check(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel().astype(bool)
    if s.shape != y.shape:
        raise ValueError(f"scores {s.shape} and labels {y.shape} must have the same length")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or inf")
    if y.all() or not y.any():
        raise ValueError("need at least one positive and one negative label")
    return s, y


def _average_ranks(s: np.ndarray) -> np.ndarray:
    """1-based ranks of `s`, tied values sharing the mean of their ranks."""
    order = np.argsort(s, kind="mergesort")
    ss = s[order]
    starts = np.r_[0, np.flatnonzero(np.diff(ss)) + 1]
    ends = np.r_[starts[1:], len(ss)]
    avg = (starts + ends + 1) / 2.0  # mean of ranks start+1 .. end
    ranks = np.empty(len(s))
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U / (n_pos * n_neg), ties count 1/2).

    scores: (n,) higher = more positive; labels: (n,) bool/0-1. O(n log n).
    """
    s, y = _check(scores, labels)
    r = _average_ranks(s)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    u = r[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds), one point per distinct score (descending), starting at (0, 0)
    with threshold +inf. Predict positive when score >= threshold."""
    s, y = _check(scores, labels)
    order = np.argsort(-s, kind="mergesort")
    ss, yy = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(ss)), len(ss) - 1]  # last index of each tied block
    tps = np.cumsum(yy)[last]
    fps = (last + 1) - tps
    tpr = np.r_[0.0, tps / y.sum()]
    fpr = np.r_[0.0, fps / (~y).sum()]
    return fpr, tpr, np.r_[np.inf, ss[last]]


def fpr_at_tpr(scores: np.ndarray, labels: np.ndarray, tpr: float = 0.95,
               interpolate: bool = True) -> float:
    """False-positive rate at the first threshold whose true-positive rate reaches `tpr`.

    interpolate=True: inside the tied block that crosses `tpr`, interpolate linearly (expected FPR
    of a random tie-break); False: the conservative value with the whole block accepted
    (equals the first `sklearn.metrics.roc_curve` point with tpr >= target).
    """
    if not 0.0 < tpr <= 1.0:
        raise ValueError(f"tpr must be in (0, 1], got {tpr}")
    fpr_c, tpr_c, _ = roc_curve(scores, labels)
    i = int(np.argmax(tpr_c >= tpr - 1e-12))
    if not interpolate or tpr_c[i] <= tpr + 1e-12 or i == 0:
        return float(fpr_c[i])
    w = (tpr - tpr_c[i - 1]) / (tpr_c[i] - tpr_c[i - 1])
    return float(fpr_c[i - 1] + w * (fpr_c[i] - fpr_c[i - 1]))


def detection_rates(predicted_positive: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(TPR, FPR) of a fixed binary decision, e.g. a threshold-free OOD flag turned into
    'accepted as in-distribution' = ~flag."""
    p = np.asarray(predicted_positive).ravel().astype(bool)
    y = np.asarray(labels).ravel().astype(bool)
    if p.shape != y.shape:
        raise ValueError(f"decisions {p.shape} and labels {y.shape} must have the same length")
    if y.all() or not y.any():
        raise ValueError("need at least one positive and one negative label")
    return float((p & y).sum() / y.sum()), float((p & ~y).sum() / (~y).sum())
