"""encoders/gsl.py: the snapping layer's geometry, the quantizer, the three modes, state."""
import io

import numpy as np
import pytest
import torch

from encoders.coders import coder_from_state, make_coder
from encoders.gsl import GSLCoder, GSLConfig, GradientSnap, PQQuantizer, gradient_snap, project_out
from tests import synthetic


def blobs(n_per=150, n_classes=4, d=12, seed=0):
    return synthetic.blobs(synthetic.blob_centres(n_classes, d, 3.0), n_per, seed, shuffle=True)


TINY = dict(bits=16, dim=8, hidden=16, epochs=2, batch_size=64, refit_every=4, refit_sample=300,
            val_queries=50)


def test_project_out_is_orthogonal_to_g_and_guards_zero():
    torch.manual_seed(0)
    v, g = torch.randn(32, 7, dtype=torch.float64), torch.randn(32, 7, dtype=torch.float64)
    g[3] = 0.0
    p = project_out(v, g)
    assert torch.allclose((p * g).sum(1), torch.zeros(32, dtype=torch.float64), atol=1e-12)
    assert torch.equal(p[3], v[3])  # nothing to remove along a zero gradient
    assert torch.allclose(p + (v * g).sum(1, keepdim=True) / (g * g).sum(1, keepdim=True).clamp_min(1e-300) * g
                          * (g.abs().sum(1, keepdim=True) > 0), v)


def test_snap_is_identity_forward_and_adds_orthogonal_term_backward():
    torch.manual_seed(1)
    x = torch.randn(16, 5, dtype=torch.float64, requires_grad=True)
    q = torch.randn(16, 5, dtype=torch.float64)
    w = torch.randn(16, 5, dtype=torch.float64)
    lam = 0.7
    out = GradientSnap.apply(x, q, lam)
    assert torch.equal(out, x.detach())
    (out * w).sum().backward()  # incoming gradient g = w
    snap = x.grad - w
    assert torch.allclose(snap, lam * project_out(x.detach() - q, w))
    # zero inner product with g: the first-order effect on the similarity loss is unchanged
    assert torch.allclose((snap * w).sum(1), torch.zeros(16, dtype=torch.float64), atol=1e-12)
    # and it points toward the codeword under descent: <snap, x - q> >= 0
    assert ((snap * (x.detach() - q)).sum(1) >= -1e-12).all()


def test_descent_step_pulls_toward_codeword_toy():
    q = torch.tensor([[1.0, 1.0]])
    # loss = x_0: g = (1, 0); x - q = (-1, -1); snap keeps only the y part, (0, -lam)
    x = torch.zeros(1, 2, requires_grad=True)
    gradient_snap(x, q, lam=1.0)[:, 0].sum().backward()
    assert torch.allclose(x.grad, torch.tensor([[1.0, -1.0]]))
    lr = 0.1
    with_snap = x.detach() - lr * x.grad
    without = x.detach() - lr * torch.tensor([[1.0, 0.0]])
    assert (with_snap - q).norm() < (without - q).norm()
    # zero similarity gradient: plain descent on the snap alone converges to the codeword
    x = torch.tensor([[3.0, -2.0]], requires_grad=True)
    d0 = (x.detach() - q).norm()
    opt = torch.optim.SGD([x], lr=0.1)
    for _ in range(100):
        opt.zero_grad()
        (gradient_snap(x, q, lam=1.0) * 0.0).sum().backward()
        opt.step()
    assert (x.detach() - q).norm() < 1e-3 * d0


@pytest.mark.parametrize("opq", [False, True])
def test_quantizer_torch_reconstruction_and_adc_match_faiss(opq):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 8)).astype(np.float32)
    qz = PQQuantizer(8, 2, opq=opq).fit(x)
    codes = qz.encode(x)
    assert codes.shape == (600, 2) and codes.dtype == np.uint8
    rec = qz.decode(codes)
    np.testing.assert_allclose(qz.reconstruct_torch(torch.from_numpy(x)).numpy(), rec, atol=1e-5)
    s = qz.adc_scores(x[:10], codes)
    np.testing.assert_allclose(s, -((x[:10, None, :] - rec[None]) ** 2).sum(-1), rtol=1e-4, atol=1e-4)
    if opq:
        r = qz.rotation
        np.testing.assert_allclose(r @ r.T, np.eye(8), atol=1e-4)
    again = PQQuantizer.from_arrays(qz.centroids, qz.rotation)
    assert np.array_equal(again.encode(x), codes)


@pytest.fixture(scope="module")
def data(one_torch_thread, one_faiss_thread):
    return blobs(), blobs(n_per=75, seed=1)


@pytest.mark.parametrize("mode", ["none", "qloss", "gsl"])
def test_three_modes_train_and_search(data, mode):
    (x, y), (vx, vy) = data
    coder = GSLCoder(GSLConfig(mode=mode, **TINY))
    rep = coder.fit(x, y, (vx, vy))
    assert rep.val_metrics["refits"] == (0 if mode == "none" else (rep.val_metrics["steps"] - 1) // 4 + 1)
    assert rep.val_metrics["val_map_adc"] > 0.5  # well-separated blobs
    codes = coder.encode(x)
    assert codes.shape == (len(x), 2) and codes.dtype == np.uint8 and coder.bytes_per_item() == 2
    s = coder.scores(vx[:5], codes)
    assert s.shape == (5, len(x)) and s.dtype == np.float32 and (s <= 1e-5).all()
    _, pos = coder.search(vx[:20], codes, k=5)
    assert (y[pos] == vy[:20, None]).mean() > 0.8


@pytest.mark.parametrize("opq", [False, True])
def test_state_round_trip_is_bit_identical(data, opq):
    (x, y), _ = data
    coder = GSLCoder(GSLConfig(mode="gsl", opq=opq, **TINY))
    coder.fit(x, y)
    buf = io.BytesIO()
    torch.save(coder.state(), buf)
    buf.seek(0)
    again = coder_from_state(torch.load(buf, weights_only=True))
    assert isinstance(again, GSLCoder) and again.config == coder.config
    assert np.array_equal(again.encode(x), coder.encode(x))
    assert np.array_equal(again.scores(x[:5], coder.encode(x)), coder.scores(x[:5], coder.encode(x)))


def test_config_checks_and_registry():
    with pytest.raises(ValueError, match="multiple of 8"):
        GSLCoder(bits=12)
    with pytest.raises(ValueError, match="mode"):
        GSLCoder(mode="snap")
    with pytest.raises(ValueError, match="divisible"):
        GSLCoder(bits=24, dim=64)
    c = make_coder("gsl", bits=64, dim=64)
    assert isinstance(c, GSLCoder) and c.lengths == (64,) and not c.symmetric
    with pytest.raises(RuntimeError, match="not fitted"):
        c.encode(np.zeros((1, 3), np.float32))
