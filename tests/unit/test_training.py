"""encoders/training.py: determinism, best-on-val selection, the extra-loss and val hooks."""
import numpy as np
import pytest
import torch

from encoders.backbones import ClassifierHead, SmallCNN
from encoders.training import classifier_accuracy, train_classifier
from infra.datasets import load_digits


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def digits():
    ds = load_digits()
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(ds))
    tr, va = idx[:300], idx[300:450]
    return ds.pixels[tr], ds.labels[tr], ds.pixels[va], ds.labels[va]


def _fit(digits, seed=0, **kw):
    torch.manual_seed(123)
    m, h = SmallCNN(embed_dim=16), ClassifierHead(16, 10)
    x, y, vx, vy = digits
    rep = train_classifier(m, h, x, y, vx, vy, epochs=kw.pop("epochs", 1), batch_size=kw.pop("batch_size", 64),
                           lr=3e-3, seed=seed, **kw)
    return m, h, rep


def test_learns_and_keeps_best_epoch(digits):
    m, h, rep = _fit(digits, epochs=3, batch_size=16)
    assert len(rep.val_accuracy) == 3 and rep.seconds > 0
    assert rep.best_epoch == int(np.argmax(rep.val_accuracy))
    x, y, vx, vy = digits
    # the restored weights are the kept epoch's
    assert classifier_accuracy(m, h, vx, vy) == pytest.approx(rep.best_val_accuracy)
    assert rep.best_val_accuracy > 0.5  # chance is 0.1


def test_deterministic_with_seed(digits):
    m1, h1, r1 = _fit(digits, seed=7)
    m2, h2, r2 = _fit(digits, seed=7)
    assert r1.val_accuracy == r2.val_accuracy and r1.train_loss == r2.train_loss
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    _, _, r3 = _fit(digits, seed=8)
    assert r3.train_loss != r1.train_loss  # the seed drives the batch order


def test_extra_loss_hook_sees_rows_and_adds_to_loss(digits):
    x, y, _, _ = digits
    seen = []

    def hook(rows, emb, logits, labels):
        seen.append(rows.clone())
        torch.testing.assert_close(labels, torch.as_tensor(y[rows.numpy()], dtype=torch.long))
        return emb.pow(2).mean() * 0 + 5.0

    _, _, rep = _fit(digits, epochs=1, extra_loss=hook)
    rows = torch.cat(seen)
    assert sorted(rows.tolist()) == list(range(len(x)))  # each row once per epoch
    assert rep.train_loss[0] > 5.0


def test_val_fn_drives_selection(digits):
    scores = iter([0.9, 0.1, 0.5])
    _, _, rep = _fit(digits, epochs=3, val_fn=lambda m, h: next(scores))
    assert rep.val_score == [0.9, 0.1, 0.5] and rep.best_epoch == 0


def test_rejects_mismatched_inputs(digits):
    x, y, vx, vy = digits
    with pytest.raises(ValueError):
        train_classifier(SmallCNN(8), ClassifierHead(8, 10), x, y[:-1], vx, vy, epochs=1)
