"""encoders/drq_levels.py: DRQ with one codebook per level and no scalars (the shared-codebook ablation)."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from encoders.coders import coder_from_state, make_coder
from encoders.drq import DRQCoder, DRQConfig, unpack_levels
from encoders.drq_levels import PerLevelDRQNet

TINY = dict(dim=8, hidden=16, epochs_embed=3, epochs_level0=1, epochs_all=2, batch_size=128, codebook_size=16,
            levels=3)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, 900)
    return (3.0 * rng.standard_normal((5, 16))[labels] + rng.standard_normal((900, 16))).astype(np.float32), labels


@pytest.fixture(scope="module")
def coder(data):
    x, y = data
    c = make_coder("drq", codebooks="per-level", **TINY)
    c.fit(x[:600], y[:600], (x[600:800], y[600:800]))
    return c


def test_each_level_has_its_own_codebook_and_no_scalars(coder):
    assert isinstance(coder.net, PerLevelDRQNet)
    cb = coder.state()["codebook"]
    assert cb.shape == (3, 16, 8) and coder.state()["level_scales"].numel() == 0
    assert not torch.allclose(cb[0], cb[1]) and not torch.allclose(cb[1], cb[2])
    np.testing.assert_array_equal(coder.net.scales().numpy(), np.ones(3, np.float32))
    books, nb, score = coder.additive_codebooks(8)
    np.testing.assert_array_equal(books, cb[:2].numpy())
    assert (nb, score) == (4, "l2")


@pytest.mark.parametrize("score", ["ip", "l2", "cos"])
def test_scores_equal_float64_reconstructions_from_the_per_level_codebooks(coder, data, score):
    st_ = coder.state()
    st_["config"]["score"] = score
    c = DRQCoder.from_state(st_)
    x = data[0]
    codes, q = c.encode(x[800:]), x[:20]
    cb = st_["codebook"].double().numpy()
    qe = c.embed(q).astype(np.float64)
    for bits in c.lengths:
        b = unpack_levels(codes, 4, bits // 4)
        z = sum(cb[m][b[:, m]] for m in range(b.shape[1]))
        ref = {"ip": qe @ z.T, "cos": qe @ z.T / np.linalg.norm(z, axis=1)[None, :],
               "l2": -((qe[:, None, :] - z[None, :, :]) ** 2).sum(-1)}[score]
        np.testing.assert_allclose(c.scores(q, codes, bits), ref, rtol=1e-4, atol=1e-4)


def test_prefixes_truncation_and_state_round_trip(coder, data):
    x = data[0][800:]
    full = coder.encode(x)
    for bits in coder.lengths:
        np.testing.assert_array_equal(coder.truncated(bits // 4).encode(x), coder.prefix_codes(full, bits))
    buf = io.BytesIO()
    torch.save(coder.state(), buf)
    buf.seek(0)
    back = coder_from_state(torch.load(buf, weights_only=True))
    assert back.config == coder.config and back.config.codebooks == "per-level"
    np.testing.assert_array_equal(back.encode(x), full)


def test_one_table_per_query_needs_the_shared_codebook(coder, data):
    with pytest.raises(ValueError, match="shared codebook"):
        coder.lookup_tables(data[0][:3])
    with pytest.raises(ValueError, match="codebooks must be"):
        DRQConfig(codebooks="per-level-ish")


def test_fit_reports_val_map_per_length_above_chance(coder, data):
    x, y = data
    m = coder.val_maps(x[600:800], y[600:800])
    assert set(m) == {"map@4", "map@8", "map@12", "map@float"} and min(m.values()) > 0.4  # 5 classes: chance 0.2
