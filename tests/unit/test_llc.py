"""encoders/llc.py, llc_model.py, llc_train.py: straight-through class codes, phase order, Hamming search, OOD flag, state."""
import io

import numpy as np
import pytest
import torch

from encoders.coders import coder_from_state, make_coder
from encoders.llc import LLCCoder, LLCConfig
from encoders.llc_model import SignSTE, Trunk, decoding_radius, min_pairwise_hamming, pack_signs, sign_ste, unpack_bits
from encoders.llc_train import train_instance_codes
from tests import synthetic


def blobs(n_per=100, n_classes=4, d=10, seed=0):
    x, y = synthetic.blobs(synthetic.blob_centres(n_classes, d, 4.0), n_per, seed, shuffle=True)
    return x, y * 3 + 1  # non-contiguous labels


TINY = dict(bits=6, hidden=16, epochs_class=15, epochs_instance=10, batch_size=64, lr=1e-2, patience=20)


@pytest.fixture(scope="module")
def fitted(one_torch_thread):
    x, y = blobs()
    vx, vy = blobs(n_per=30, seed=1)
    coder = LLCCoder(LLCConfig(**TINY))
    report = coder.fit(x, y, (vx, vy))
    return coder, report, x, y, vx, vy


def test_sign_ste_forward_is_sign_and_gradient_passes_through():
    w = torch.tensor([-2.0, -0.1, 0.0, 0.3, 5.0], requires_grad=True)
    out = sign_ste(w)
    assert out.tolist() == [-1.0, -1.0, 1.0, 1.0, 1.0]  # sign(0) = +1 keeps codes in {-1, +1}
    c = torch.tensor([1.0, -2.0, 3.0, 0.5, -1.0])
    (out * c).sum().backward()
    assert torch.equal(w.grad, c)  # identity backward, even where |w| > 1


def test_class_code_layer_uses_signed_weights():
    from encoders.llc_model import ClassCodeLayer
    layer = ClassCodeLayer(5, 3)
    z = torch.randn(4, 5, requires_grad=True)
    logits = layer(z)
    assert torch.allclose(logits, z @ SignSTE.apply(layer.weight).t())
    logits.sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    cb = layer.codebook()
    assert cb.dtype == torch.int8 and set(cb.unique().tolist()) <= {-1, 1}


def test_phase2_refuses_without_phase1():
    x, y = blobs(n_per=10)
    with pytest.raises(RuntimeError, match="phase 1"):
        LLCCoder(LLCConfig(**TINY)).fit_instance_codes(x, y)
    with pytest.raises(RuntimeError, match="phase 1"):
        train_instance_codes(Trunk(10, 0, 6), None, x, np.zeros(len(x), np.int64), None, epochs=1,
                             batch_size=8, lr=1e-3, weight_decay=0.0, patience=1, seed=0)
    with pytest.raises(ValueError, match="-1/\\+1"):
        train_instance_codes(Trunk(10, 0, 6), np.random.randn(4, 6), x, np.zeros(len(x), np.int64),
                             None, epochs=1, batch_size=8, lr=1e-3, weight_decay=0.0, patience=1, seed=0)


def test_too_few_bits_for_classes_is_refused():
    x, y = blobs(n_per=10, n_classes=5)
    with pytest.raises(ValueError, match="ceil\\(log2"):
        LLCCoder(bits=2, hidden=0).fit(x, y)


def hamming_bruteforce(a, b, k):
    return (unpack_bits(a, k)[:, None, :] != unpack_bits(b, k)[None]).sum(-1)


def test_packing_is_faiss_layout():
    rng = np.random.default_rng(0)
    s = rng.normal(size=(7, 13))
    packed = pack_signs(s)
    assert packed.shape == (7, 2) and packed.dtype == np.uint8
    bits = s >= 0
    for i in range(13):  # bit i is bit i%8 of byte i//8, LSB first
        assert np.array_equal((packed[:, i // 8] >> (i % 8)) & 1, bits[:, i].astype(np.uint8))
    assert np.array_equal(unpack_bits(packed, 13), bits.astype(np.uint8))


def test_spread_codebook_initialisation_has_distinct_codes():
    from encoders.llc_model import ClassCodeLayer, spread_codebook
    cb = spread_codebook(10, 6, torch.Generator().manual_seed(0))
    assert min_pairwise_hamming(cb.numpy()) >= 2  # 10 codes in 6 bits: 2 is the best possible
    layer = ClassCodeLayer(6, 10, torch.Generator().manual_seed(0))
    assert min_pairwise_hamming(layer.codebook().numpy()) >= 2


def test_decoding_radius():
    assert [decoding_radius(d) for d in range(7)] == [0, 0, 0, 1, 1, 2, 2]
    cb = np.array([[1, 1, 1, 1], [1, 1, -1, -1], [-1, -1, 1, 1]])
    assert min_pairwise_hamming(cb) == 2
    assert min_pairwise_hamming(np.vstack([cb, cb[:1]])) == 0


def test_fit_learns_codes_that_classify(fitted):
    coder, report, x, y, vx, vy = fitted
    assert coder.codebook.shape == (4, 6) and set(np.unique(coder.codebook)) <= {-1, 1}
    assert report.fit_s > 0 and report.val_metrics["d_min"] >= 1
    pred, dist = coder.predict_class(vx)
    assert (pred == vy).mean() > 0.9
    assert (coder.predict_class_phase1(vx) == vy).mean() > 0.9
    assert dist.shape == (len(vx),) and dist.min() >= 0
    codes = coder.encode(vx)
    assert codes.shape == (len(vx), 1) and codes.dtype == np.uint8
    assert coder.lengths == (6,) and coder.bytes_per_item() == 1
    msp = coder.msp_score(vx)
    assert ((msp > 0) & (msp <= 1)).all()


def test_scores_are_minus_hamming_and_search_ranks_same_class_first(fitted):
    coder, _, x, y, vx, vy = fitted
    db = coder.encode(x)
    s = coder.scores(vx[:20], db)
    assert s.dtype == np.float32 and s.shape == (20, len(x))
    assert np.array_equal(-s, hamming_bruteforce(coder.encode(vx[:20]), db, 6))
    _, pos = coder.search(vx[:20], db, k=5)
    assert (y[pos] == vy[:20, None]).mean() > 0.9
    with pytest.raises(ValueError):
        coder.scores(vx[:2], db, bits=8)


def test_ood_flag_uses_decoding_radius_without_threshold(fitted):
    coder, *_ = fitted
    # Hand-built coder: instance logits = the input itself, codebook with d_min = 3 -> radius 1.
    cb = np.array([[1, 1, 1, 1, 1, 1], [-1, -1, -1, 1, 1, 1], [1, 1, 1, -1, -1, -1]], np.int8)
    c = LLCCoder.from_state(coder.state())
    c.codebook = cb
    c.classes = np.array([0, 1, 2])
    head = Trunk(6, 0, 6)
    with torch.no_grad():
        head.body[0].weight.copy_(torch.eye(6))
        head.body[0].bias.zero_()
    c.head = head
    assert c.d_min == 3 and c.radius == 1
    x = np.array([cb[0], cb[1] * [1, 1, 1, 1, 1, -1], [-1, -1, -1, -1, -1, -1], [1, -1, 1, -1, 1, -1]],
                 np.float32)
    dist = c.class_distances(x).min(1)
    assert dist.tolist() == [0, 1, 3, 2]
    assert c.ood_flag(x).tolist() == [False, False, True, True]
    # exact-match variant: d_min = 2 -> radius 0, any mismatch is OOD
    c.codebook = np.array([[1, 1, 1, 1, 1, 1], [-1, -1, 1, 1, 1, 1]], np.int8)
    c.classes = np.array([0, 1])
    assert c.radius == 0
    assert c.ood_flag(x[:2]).tolist() == [False, True]


def test_state_round_trip_is_bit_identical(fitted):
    coder, _, x, *_ = fitted
    buf = io.BytesIO()
    torch.save(coder.state(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    again = coder_from_state(state)
    assert isinstance(again, LLCCoder)
    assert np.array_equal(again.encode(x), coder.encode(x))
    assert np.array_equal(again.codebook, coder.codebook)
    assert np.array_equal(again.predict_class(x)[0], coder.predict_class(x)[0])
    assert np.array_equal(again.ood_flag(x), coder.ood_flag(x))
    assert np.array_equal(again.msp_score(x), coder.msp_score(x))


def test_registered():
    c = make_coder("llc", bits=8)
    assert isinstance(c, LLCCoder) and c.method == "llc" and c.symmetric
