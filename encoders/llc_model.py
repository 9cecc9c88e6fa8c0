"""LLC's building blocks (METHODS.md, "LLC"): sign binarisation with a straight-through gradient,
bit packing in faiss's layout (LSB first), the class codebook's distance and decoding radius, the
trunk MLP and the class-code layer, and nearest-class-code decoding. Pure torch/numpy."""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class SignSTE(torch.autograd.Function):
    """Forward: sign with sign(0) = +1 (codes stay in {-1, +1}). Backward: identity
    (straight-through estimator), so the real-valued latent weights keep learning."""

    @staticmethod
    def forward(ctx: Any, w: torch.Tensor) -> torch.Tensor:
        return torch.where(w >= 0, torch.ones_like(w), -torch.ones_like(w))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad


def sign_ste(w: torch.Tensor) -> torch.Tensor:
    return SignSTE.apply(w)


def pack_signs(s: np.ndarray) -> np.ndarray:
    """(n, k) values, >= 0 -> bit 1 -> (n, ceil(k/8)) uint8, bit i = bit i%8 of byte i//8."""
    return np.packbits(np.asarray(s) >= 0, axis=1, bitorder="little")


def unpack_bits(codes: np.ndarray, k: int) -> np.ndarray:
    """(n, B) packed uint8 -> (n, k) uint8 bits in {0, 1}."""
    return np.unpackbits(np.asarray(codes, dtype=np.uint8), axis=1, count=k, bitorder="little")


def min_pairwise_hamming(codebook: np.ndarray) -> int:
    """Minimum Hamming distance between distinct rows of a {-1,+1} (C, k) codebook (0 if two rows
    are equal)."""
    b = np.asarray(codebook) > 0
    if len(b) < 2:
        return b.shape[1]
    d = (b[:, None, :] != b[None, :, :]).sum(-1)
    d[np.diag_indices(len(b))] = b.shape[1] + 1
    return int(d.min())


def decoding_radius(d_min: int) -> int:
    """floor((d_min - 1) / 2): every word within it decodes to a unique class code. 0 (exact
    match) when d_min <= 2, including a degenerate codebook with repeated codes."""
    return max(0, (d_min - 1) // 2)


# --------------------------------------------------------------------------------------------
# Networks
# --------------------------------------------------------------------------------------------
class Trunk(nn.Module):
    """Standardise features, then MLP (hidden > 0) or linear map to `out` real values."""

    def __init__(self, d_in: int, hidden: int, out: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(d_in))
        self.register_buffer("inv_std", torch.ones(d_in))
        if hidden > 0:
            self.body = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, out))
        else:
            self.body = nn.Sequential(nn.Linear(d_in, out))

    def set_standardisation(self, x: np.ndarray) -> None:
        self.mean.copy_(torch.from_numpy(x.mean(0)))
        self.inv_std.copy_(torch.from_numpy(1.0 / (x.std(0) + 1e-6)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body((x - self.mean) * self.inv_std)


def spread_codebook(n_classes: int, k: int, gen: torch.Generator, tries: int = 256) -> torch.Tensor:
    """The random {-1,+1} (C, k) codebook with the largest minimum pairwise Hamming distance
    (then largest mean distance) among `tries` draws, fewer for large C so the search stays
    under ~2e9 multiply-adds (1000 classes x 20 bits: 100 draws)."""
    tries = max(1, min(tries, int(2e9 // (n_classes * n_classes * k))))
    best, best_key = None, (-1, -1.0)
    for _ in range(tries):
        cb = torch.randint(0, 2, (n_classes, k), generator=gen) * 2 - 1
        d = (k - cb @ cb.t()) // 2
        off = d[~torch.eye(n_classes, dtype=torch.bool)]
        key = (int(off.min()) if n_classes > 1 else k, float(off.float().mean()) if n_classes > 1 else 0.0)
        if key > best_key:
            best, best_key = cb, key
    assert best is not None
    return best.float()


class ClassCodeLayer(nn.Module):
    """Bias-free (classes x k) layer with sign-binarised weights; `codebook()` is B.

    Latent weights start as a well-spread random code (max-min Hamming distance of 256 draws)
    times a random magnitude in (0, 1/sqrt(k)): with plain random init two classes sometimes
    start (or fall) on the same code and stay merged, since their features then get no pressure
    to separate (seen at k = 6 for 10 Fashion-MNIST classes: one seed in three).
    """

    def __init__(self, k: int, n_classes: int, gen: torch.Generator | None = None,
                 temperature: float = 0.0) -> None:
        super().__init__()
        self.temperature = temperature  # > 0: normalised-proxy logits cos(z, B_c) / temperature
        gen = gen if gen is not None else torch.Generator().manual_seed(0)
        mag = torch.rand(n_classes, k, generator=gen) / math.sqrt(k)
        self.weight = nn.Parameter(spread_codebook(n_classes, k, gen) * mag)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        b = sign_ste(self.weight)
        if self.temperature > 0:  # the shared similarity loss (encoders/selection.py): B_c are fixed-norm proxies
            return F.normalize(z, dim=1) @ b.t() / (math.sqrt(b.shape[1]) * self.temperature)
        return z @ b.t()

    def codebook(self) -> torch.Tensor:
        return SignSTE.apply(self.weight.detach()).to(torch.int8)


def nearest_class(bits_pm: np.ndarray, codebook: np.ndarray,
                  soft: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Nearest class code by Hamming distance. bits_pm: (n, k) in {-1,+1}; codebook (C, k).
    Ties broken by the larger soft correlation soft @ codebook^T when `soft` (n, k) is given,
    else by the lowest class index. Returns (class index (n,), distance (n,))."""
    b = np.asarray(codebook, dtype=np.float32)
    k = b.shape[1]
    dist = ((k - np.asarray(bits_pm, dtype=np.float32) @ b.T) / 2).round().astype(np.int32)
    dmin = dist.min(1)
    if soft is None:
        return dist.argmin(1), dmin
    corr = np.where(dist == dmin[:, None], np.asarray(soft, dtype=np.float32) @ b.T, -np.inf)
    return corr.argmax(1), dmin
