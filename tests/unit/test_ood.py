"""encoders/ood.py: AUROC and FPR@TPR against scikit-learn, ties included."""
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score, roc_curve as sk_roc_curve

from encoders.ood import auroc, detection_rates, fpr_at_tpr, roc_curve


@pytest.mark.parametrize("seed", range(5))
def test_auroc_matches_sklearn_continuous(seed):
    rng = np.random.default_rng(seed)
    y = rng.random(300) < 0.4
    s = rng.normal(size=300) + y * 0.8
    assert auroc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_auroc_matches_sklearn_with_heavy_ties(seed):
    rng = np.random.default_rng(seed)
    y = rng.random(400) < 0.5
    s = -rng.integers(0, 4, size=400) + y  # integer scores, like minus a Hamming distance
    assert auroc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_auroc_extremes_and_symmetry():
    y = np.array([0, 0, 1, 1])
    assert auroc(np.array([0.1, 0.2, 0.3, 0.4]), y) == 1.0
    assert auroc(np.array([0.4, 0.3, 0.2, 0.1]), y) == 0.0
    assert auroc(np.zeros(4), y) == 0.5
    s = np.array([0.3, 0.1, 0.2, 0.5])
    assert auroc(s, y) == pytest.approx(auroc(-s, 1 - y))


def test_roc_curve_matches_sklearn():
    rng = np.random.default_rng(1)
    y = rng.random(200) < 0.3
    s = rng.integers(0, 10, size=200).astype(float)
    fpr, tpr, thr = roc_curve(s, y)
    f2, t2, _ = sk_roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, f2)
    np.testing.assert_allclose(tpr, t2)


@pytest.mark.parametrize("target", [0.5, 0.9, 0.95])
def test_fpr_at_tpr_conservative_matches_sklearn(target):
    rng = np.random.default_rng(2)
    y = rng.random(500) < 0.5
    s = rng.normal(size=500) + y
    f, t, _ = sk_roc_curve(y, s, drop_intermediate=False)
    expected = f[np.argmax(t >= target)]
    assert fpr_at_tpr(s, y, target, interpolate=False) == pytest.approx(expected)
    # continuous scores: interpolation only moves inside a one-item step
    assert abs(fpr_at_tpr(s, y, target) - expected) <= 1.0 / (~y).sum() + 1e-12


def test_fpr_at_tpr_interpolates_inside_tied_block():
    # 4 positives, 4 negatives; one tied block holding 2 pos + 2 neg after 2 clean positives
    s = np.array([3, 3, 2, 2, 2, 2, 1, 1], float)
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    # tpr reaches 0.75 halfway through the tied block: expected fpr 0.25 (random tie-break)
    assert fpr_at_tpr(s, y, 0.75) == pytest.approx(0.25)
    assert fpr_at_tpr(s, y, 0.75, interpolate=False) == pytest.approx(0.5)
    assert fpr_at_tpr(s, y, 0.5) == 0.0


def test_detection_rates_and_input_checks():
    tpr, fpr = detection_rates(np.array([1, 1, 0, 1, 0]), np.array([1, 1, 1, 0, 0]))
    assert tpr == pytest.approx(2 / 3) and fpr == pytest.approx(0.5)
    with pytest.raises(ValueError, match="positive and one negative"):
        auroc(np.arange(3.0), np.ones(3))
    with pytest.raises(ValueError, match="same length"):
        auroc(np.arange(3.0), np.array([0, 1]))
