"""encoders/drq.py, drq_model.py, drq_train.py: one DRQ model gives every code length as an exact prefix; encoding is
deterministic and survives a state round trip bit for bit; ADC scores equal brute-force scores of
the reconstructions (and faiss's residual-quantizer LUT search on the same bytes); bad lengths fail
loudly. Tiny synthetic data, a few seconds in all."""
from __future__ import annotations

import io

import faiss
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from encoders.coders import coder_from_state, make_coder
from encoders.drq import DRQCoder, DRQConfig, pack_levels, unpack_levels
from tests.synthetic import blob_centres, blobs

TINY = dict(dim=8, hidden=16, epochs_embed=3, epochs_level0=1, epochs_all=2, batch_size=128)


def synthetic(n: int = 900, d: int = 16, classes: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`n` rows over `classes` blobs (centres N(0, 3²)), shuffled."""
    x, y = blobs(blob_centres(classes, d, 3.0), -(-n // classes), seed, shuffle=True)
    return x[:n], y[:n]


@pytest.fixture(scope="module")
def data():
    return synthetic()


@pytest.fixture(scope="module", params=[256, 16], ids=["K256", "K16"])
def coder(request, data):
    """K=256 (one byte per level, 4 levels = 32 bits) and K=16 (4 bits per level, 5 levels = 20 bits:
    lengths 4, 12, 20 end inside a byte)."""
    x, y = data
    k = request.param
    c = make_coder("drq", codebook_size=k, levels=4 if k == 256 else 5, **TINY)
    c.fit(x[:600], y[:600], (x[600:800], y[600:800]))
    return c


def bitstream(codes: np.ndarray, bits: int) -> np.ndarray:
    """First `bits` bits of each code, faiss order (bit i = bit i % 8 of byte i // 8)."""
    return np.unpackbits(codes, axis=1, bitorder="little")[:, :bits]


def test_lengths_and_bytes(coder):
    nb = coder.config.bits_per_level
    assert coder.lengths == tuple(nb * m for m in range(1, coder.config.levels + 1))
    codes = coder.encode(synthetic(50, seed=1)[0])
    assert codes.dtype == np.uint8 and codes.shape == (50, coder.bytes_per_item())
    assert DRQConfig().levels * DRQConfig().bits_per_level == 64  # default: 8..64 bits


def test_prefix_is_first_bits_and_truncated_model(coder, data):
    x = data[0][800:]
    full = coder.encode(x)
    levels = coder.decode_levels(full)
    for bits in coder.lengths:
        m = bits // coder.config.bits_per_level
        pre = coder.prefix_codes(full, bits)
        assert pre.shape[1] == coder.bytes_per_item(bits)
        # the code of L bits is exactly the first L bits of the longest code (unused bits zero)
        np.testing.assert_array_equal(bitstream(pre, bits), bitstream(full, bits))
        assert not np.unpackbits(pre, axis=1, bitorder="little")[:, bits:].any()
        # ... and equals the code of the same model truncated to L / log2(K) levels
        np.testing.assert_array_equal(coder.truncated(m).encode(x), pre)
        np.testing.assert_array_equal(coder.decode_levels(pre, bits), levels[:, :m])
        # scores from the prefix equal scores from the full code at that length
        q = data[0][:5]
        np.testing.assert_array_equal(coder.scores(q, pre, bits), coder.scores(q, full, bits))


def test_encode_is_deterministic(coder, data):
    x = data[0][800:]
    np.testing.assert_array_equal(coder.encode(x), coder.encode(x))
    x2 = make_coder("drq", codebook_size=coder.config.codebook_size, levels=coder.config.levels, **TINY)
    x2.fit(data[0][:600], data[1][:600])
    np.testing.assert_array_equal(x2.encode(x), coder.encode(x))  # same seed -> same model


def test_state_round_trip_is_bit_identical(coder, data):
    buf = io.BytesIO()
    torch.save(coder.state(), buf)
    buf.seek(0)
    back = coder_from_state(torch.load(buf, weights_only=True))
    assert isinstance(back, DRQCoder) and back.config == coder.config
    x = data[0][800:]
    np.testing.assert_array_equal(back.encode(x), coder.encode(x))
    codes = coder.encode(x)
    np.testing.assert_array_equal(back.scores(x[:7], codes), coder.scores(x[:7], codes))


def brute_force(coder: DRQCoder, q: np.ndarray, codes: np.ndarray, bits: int, score: str) -> np.ndarray:
    """Scores from explicit float64 reconstructions z_hat = sum_m s_m C[b_m], independent of the coder's
    scoring code."""
    st_ = coder.state()
    cb = st_["codebook"].double().numpy()
    s = np.concatenate([[1.0], st_["level_scales"].double().numpy()])
    b = unpack_levels(codes, coder.config.bits_per_level, bits // coder.config.bits_per_level)
    z = sum(s[m] * cb[b[:, m]] for m in range(b.shape[1]))
    qe = coder.embed(q).astype(np.float64)
    if score == "ip":
        return qe @ z.T
    if score == "cos":
        return qe @ z.T / np.linalg.norm(z, axis=1)[None, :]
    return -((qe[:, None, :] - z[None, :, :]) ** 2).sum(-1)


@pytest.mark.parametrize("score", ["ip", "l2", "cos"])
def test_adc_scores_equal_brute_force(coder, data, score):
    st_ = coder.state()
    st_["config"]["score"] = score
    c = DRQCoder.from_state(st_)
    x = data[0]
    codes, q = c.encode(x[800:]), x[:20]
    for bits in c.lengths:
        ref = brute_force(c, q, codes, bits, score)
        np.testing.assert_allclose(c.scores(q, codes, bits), ref, rtol=1e-4, atol=1e-4)
        if score == "ip":
            np.testing.assert_allclose(c.lut_scores(q, codes, bits), ref, rtol=1e-4, atol=1e-4)


def test_faiss_residual_quantizer_reads_the_same_bytes(coder, data):
    """Our codes are faiss AdditiveQuantizer codes: an IndexResidualQuantizer with codebooks s_m C and
    LUT search ranks them exactly as `scores` with score='ip'."""
    st_ = coder.state()
    st_["config"]["score"] = "ip"
    c = DRQCoder.from_state(st_)
    x = data[0]
    codes, q = c.encode(x[800:]), x[:10]
    cb = st_["codebook"].numpy()
    s = c.net.scales().numpy()
    nb, m = c.config.bits_per_level, c.config.levels
    idx = faiss.IndexResidualQuantizer(cb.shape[1], m, nb, faiss.METRIC_INNER_PRODUCT,
                                       faiss.AdditiveQuantizer.ST_LUT_nonorm)
    faiss.copy_array_to_vector(np.concatenate([s[i] * cb for i in range(m)]).ravel(), idx.rq.codebooks)
    idx.rq.is_trained = idx.is_trained = True
    assert idx.code_size == codes.shape[1]
    faiss.copy_array_to_vector(codes.ravel(), idx.codes)
    idx.ntotal = len(codes)
    dist, _ = idx.search(c.embed(q), 5)
    ours = np.sort(c.scores(q, codes), axis=1)[:, ::-1][:, :5]
    np.testing.assert_allclose(dist, ours, rtol=1e-4, atol=1e-4)


def test_bad_bits_raise(coder, data):
    codes = coder.encode(data[0][:10])
    nb = coder.config.bits_per_level
    for bad in (nb + 1, coder.full_bits + nb, 0):
        with pytest.raises(ValueError, match="multiples of log2"):
            coder.scores(data[0][:2], codes, bad)
        with pytest.raises(ValueError):
            coder.prefix_codes(codes, bad)
    with pytest.raises(ValueError, match="multiple of log2"):
        DRQCoder(bits=12)                       # K=256: 8 bits per level
    with pytest.raises(ValueError, match="power of two"):
        DRQConfig(codebook_size=100)


def test_fit_reports_val_map_per_length_and_beats_chance(coder, data):
    rep = make_coder("drq", codebook_size=coder.config.codebook_size, levels=coder.config.levels,
                     **TINY).fit(data[0][:600], data[1][:600], (data[0][600:], data[1][600:]))
    assert rep.fit_s > 0
    assert {f"map@{b}" for b in coder.lengths} <= set(rep.val_metrics)
    assert min(rep.val_metrics[f"map@{b}"] for b in coder.lengths) > 0.5  # chance is 0.2 for 5 classes


def test_bits_builds_a_single_length_model():
    """`bits=L` is the per-length reference: the same recipe with L / log2(K) levels."""
    assert DRQCoder(bits=16).config.levels == 2 and DRQCoder(bits=16).lengths == (8, 16)
    assert DRQCoder(bits=12, codebook_size=16).lengths == (4, 8, 12)


def test_fit_leaves_threads_and_global_rng_alone(data):
    before = torch.get_num_threads(), faiss.omp_get_max_threads()
    rng_state = torch.random.get_rng_state()
    make_coder("drq", levels=1, **TINY).fit(data[0][:300], data[1][:300])
    assert (torch.get_num_threads(), faiss.omp_get_max_threads()) == before
    assert torch.equal(torch.random.get_rng_state(), rng_state)


@pytest.mark.parametrize("codebooks", ["shared", "per-level"])
def test_training_device_choice(data, codebooks):
    """`train_on`: DRQ accepts a device for its fit; asked for the CPU explicitly (the device code
    path, `.to(device)` on the CPU) it gives the default fit's codes bit for bit, and the fitted net
    lives on the CPU. Coders without a GPU path say so: itq, and pq without faiss GPU support. The
    CUDA fit itself is the next test (skipped without a GPU)."""
    x, y = data
    default = make_coder("drq", levels=2, codebooks=codebooks, **TINY)
    default.fit(x[:300], y[:300])
    explicit = make_coder("drq", levels=2, codebooks=codebooks, **TINY)
    assert explicit.train_on("cpu") and explicit.train_device == "cpu"
    explicit.fit(x[:300], y[:300])
    np.testing.assert_array_equal(explicit.encode(x[300:400]), default.encode(x[300:400]))
    assert {p.device.type for p in explicit.net.parameters()} == {"cpu"}
    assert make_coder("itq", bits=16).train_on("cuda") is False
    pq = make_coder("pq", bits=16)
    assert pq.train_on("cuda") is (getattr(faiss, "get_num_gpus", lambda: 0)() > 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (`make install GPU=1` on a GPU machine)")
def test_training_on_cuda_returns_a_cpu_model_with_prefix_codes(data):  # pragma: no cover - needs a GPU
    """On a GPU machine: the fit runs on CUDA, the net comes back on the CPU, and its codes keep the
    prefix property (the 1-level code is the first byte of the 2-level code)."""
    x, y = data
    gpu = make_coder("drq", levels=2, **TINY)
    assert gpu.train_on("cuda")
    gpu.fit(x[:300], y[:300])
    assert {p.device.type for p in gpu.net.parameters()} == {"cpu"}
    codes = gpu.encode(x[300:600])
    np.testing.assert_array_equal(gpu.prefix_codes(codes, 8), codes[:, :1])


@settings(max_examples=30, deadline=None)
@given(nb=st.integers(1, 16), m=st.integers(1, 9), n=st.integers(0, 5), seed=st.integers(0, 2**31))
def test_pack_unpack_round_trip(nb, m, n, seed):
    b = np.random.default_rng(seed).integers(0, 1 << nb, (n, m))
    packed = pack_levels(b, nb)
    assert packed.shape == (n, (m * nb + 7) // 8)
    np.testing.assert_array_equal(unpack_levels(packed, nb, m), b)
    for k in range(1, m + 1):  # any prefix of levels decodes from the first bytes
        np.testing.assert_array_equal(unpack_levels(packed[:, : (k * nb + 7) // 8], nb, k), b[:, :k])
