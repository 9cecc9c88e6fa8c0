"""encoders/selection.py: selection on val, its record, and the spread rule for wins."""
import numpy as np
import pytest

from encoders.selection import PROXY_TEMPERATURE, select_on_val, selection_record, val_map, verdict


def test_select_on_val_keeps_every_candidate_and_the_best():
    sel = select_on_val("m", [{"a": 1}, {"a": 2}, {"a": 3}], lambda p: {1: 0.5, 2: 0.7, 3: 0.7}[p["a"]])
    assert sel.split == "val" and sel.chosen == {"a": 2}  # ties keep the earlier candidate
    assert [c["val_score"] for c in sel.candidates] == [0.5, 0.7, 0.7]
    assert sel.as_dict()["candidates"][0]["params"] == {"a": 1}


def test_val_map_scores_val_against_train_only():
    seen = []

    def score(q, g):
        seen.append((q.copy(), g.copy()))
        return -np.abs(q[:, :1] - g[:, :1].T)

    tx, ty = np.arange(10, dtype=np.float32)[:, None], np.repeat([0, 1], 5)
    vx, vy = np.array([[1.0], [8.0]], np.float32), np.array([0, 1])
    assert val_map(score, None, None, tx, ty, vx, vy) == pytest.approx(1.0)
    assert all(len(g) == 10 and len(q) == 2 for q, g in seen)


def test_verdict_calls_a_win_only_outside_the_spread():
    assert verdict([0.80, 0.81, 0.82], [0.70, 0.71, 0.72]) == "win"
    assert verdict([0.801, 0.806, 0.811], [0.800, 0.805, 0.810]) == "tie"      # inside the std
    assert verdict([0.70, 0.71, 0.72], [0.80, 0.81, 0.82]) == "loss"
    assert verdict([0.8040], [0.8000]) == "tie (1 seed)"                       # the old "wins" of 0.004


def test_every_learned_similarity_loss_uses_the_shared_temperature():
    from encoders.drq import DRQConfig
    from encoders.gsl import GSLConfig
    from encoders.llc import LLCConfig

    assert DRQConfig().proxy_temperature == PROXY_TEMPERATURE
    assert GSLConfig().scale == pytest.approx(1 / PROXY_TEMPERATURE)
    assert GSLConfig(mode="none").scale == pytest.approx(1 / PROXY_TEMPERATURE)
    assert LLCConfig().proxy_temperature == PROXY_TEMPERATURE


def test_selection_record_of_an_unselected_method_says_so():
    assert "not selected" in selection_record("no-such-method")["notes"]
