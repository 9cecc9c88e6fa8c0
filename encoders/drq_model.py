"""The DRQ model (METHODS.md, DRQ): its config, the code bit layout and the torch network (embedding
MLP, one shared codebook, per-level scales, recurrent residual quantisation). Training lives in
`encoders/drq_train.py`, the coder (encode, scores, state) in `encoders/drq.py`. Pure torch/numpy."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from encoders.selection import PROXY_TEMPERATURE


@dataclass(frozen=True)
class DRQConfig:
    """DRQ hyper-parameters.

    Bytes per item: levels * log2(codebook_size) / 8 at full length (8 for the default 8 x 256); the
    prefix of L bits is L / 8 bytes. Model: D_in*hidden + hidden*dim + codebook_size*dim floats
    (~0.1 M for D_in 128) and levels - 1 scalars.
    Fit cost: (epochs_embed + epochs_level0 + epochs_all) passes over train, one step
    O(batch * (D_in*hidden + hidden*dim + levels*codebook_size*dim)), plus one faiss k-means with
    codebook_size centroids (measured times: BENCHMARKS.md). Encode: O(D_in*hidden + hidden*dim +
    levels*codebook_size*dim) per item. Search: see `DRQCoder.scores`.
    """

    levels: int = 8                 # M; codes of log2(K), 2 log2(K), ..., M log2(K) bits
    codebook_size: int = 256        # K, a power of two; 256 -> one byte per level
    dim: int = 64                   # embedding dimension D
    hidden: int = 512               # MLP hidden width; 0 -> a single linear layer
    similarity_loss: str = "proxy"  # "proxy" (normalised-softmax proxies) or "triplet" (batch-hard)
    proxy_temperature: float = PROXY_TEMPERATURE  # the shared, val-selected temperature (encoders/selection.py)
    triplet_margin: float = 0.2
    assign: str = "l2"              # level assignment: "l2" (nearest s_m C_k) or "cos" (max cosine)
    score: str = "l2"               # "ip": <q, z_hat>; "l2": -||q - z_hat||^2; "cos": <q, z_hat>/||z_hat||
    soft_temperature: float = 0.05  # tau of the soft assignment softmax(similarity / tau)
    quant_weight: float = 1.0       # weight of the quantisation losses against the similarity loss
    prefix_loss: bool = True        # average quantisation losses over every prefix length
    finetune_embedding: bool = True  # keep training the MLP during the codebook stages
    codebooks: str = "shared"       # "shared" (C + scalars, DRQ) or "per-level" (ablation: encoders/drq_levels.py)
    epochs_embed: int = 30
    epochs_level0: int = 5
    epochs_all: int = 15
    batch_size: int = 256
    lr: float = 1e-3
    codebook_lr_all: float = 0.1    # codebook learning rate in the all-levels stage, times lr
    weight_decay: float = 1e-4
    seed: int = 0
    train_threads: int = 1          # torch/faiss threads during fit (0: leave as is); see _threads

    def __post_init__(self) -> None:
        if self.codebook_size < 2 or self.codebook_size & (self.codebook_size - 1) or self.codebook_size > 65536:
            raise ValueError(f"drq: codebook_size must be a power of two in [2, 65536], got {self.codebook_size}")
        if self.levels < 1:
            raise ValueError(f"drq: levels must be >= 1, got {self.levels}")
        if self.similarity_loss not in ("proxy", "triplet"):
            raise ValueError(f"drq: similarity_loss must be 'proxy' or 'triplet', got {self.similarity_loss!r}")
        if self.assign not in ("l2", "cos"):
            raise ValueError(f"drq: assign must be 'l2' or 'cos', got {self.assign!r}")
        if self.score not in ("ip", "l2", "cos"):
            raise ValueError(f"drq: score must be 'ip', 'l2' or 'cos', got {self.score!r}")
        if self.codebooks not in ("shared", "per-level"):
            raise ValueError(f"drq: codebooks must be 'shared' or 'per-level', got {self.codebooks!r}")

    @property
    def bits_per_level(self) -> int:
        return self.codebook_size.bit_length() - 1


# ---------------------------------------------------------------------------------------------
# code packing: level m occupies bits [m*nb, (m+1)*nb) of the code, LSB first (faiss's layout,
# identical to faiss AdditiveQuantizer codes), so a prefix of L bits holds exactly the first L/nb levels


def pack_levels(b: np.ndarray, bits_per_level: int) -> np.ndarray:
    """(n, M) level indices -> (n, ceil(M*nb/8)) uint8 codes, LSB-first bit stream."""
    b = np.asarray(b)
    if bits_per_level == 8:
        return np.ascontiguousarray(b, dtype=np.uint8)
    n, m = b.shape
    shifts = np.arange(bits_per_level, dtype=np.uint32)
    bitstream = ((b.astype(np.uint32)[:, :, None] >> shifts) & 1).astype(np.uint8).reshape(n, m * bits_per_level)
    return np.packbits(bitstream, axis=1, bitorder="little")


def unpack_levels(codes: np.ndarray, bits_per_level: int, levels: int) -> np.ndarray:
    """Inverse of `pack_levels` for the first `levels` levels: (n, levels) int64."""
    codes = np.asarray(codes, dtype=np.uint8)
    need = (levels * bits_per_level + 7) // 8
    if codes.ndim != 2 or codes.shape[1] < need:
        raise ValueError(f"drq: codes of shape {codes.shape} too short for {levels} levels of "
                         f"{bits_per_level} bits ({need} bytes needed)")
    if bits_per_level == 8:
        return codes[:, :levels].astype(np.int64)
    bitstream = np.unpackbits(codes[:, :need], axis=1, bitorder="little")[:, : levels * bits_per_level]
    weights = (1 << np.arange(bits_per_level, dtype=np.int64))
    return bitstream.reshape(len(codes), levels, bits_per_level).astype(np.int64) @ weights


# ---------------------------------------------------------------------------------------------
# the model


class DRQNet(nn.Module):
    """Embedding MLP + shared codebook + per-level scalars (scales[0] is fixed at 1)."""

    def __init__(self, d_in: int, cfg: DRQConfig):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("mean", torch.zeros(d_in))
        self.register_buffer("inv_std", torch.ones(d_in))
        if cfg.hidden > 0:
            self.mlp = nn.Sequential(nn.Linear(d_in, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, cfg.dim))
        else:
            self.mlp = nn.Sequential(nn.Linear(d_in, cfg.dim))
        self.codebook = nn.Parameter(torch.zeros(cfg.codebook_size, cfg.dim))
        self.level_scales = nn.Parameter(torch.ones(max(cfg.levels - 1, 0)))

    def scales(self, levels: int | None = None) -> torch.Tensor:
        """(levels,) multipliers [1, s_1, ..., s_{levels-1}]."""
        levels = self.cfg.levels if levels is None else levels
        return torch.cat([torch.ones(1, dtype=self.codebook.dtype, device=self.codebook.device), self.level_scales[: levels - 1]])

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(n, D_in) features -> (n, dim) unit vectors."""
        return F.normalize(self.mlp((x - self.mean) * self.inv_std), dim=1)

    def level_logits(self, r: torch.Tensor, s: torch.Tensor, cnorm2: torch.Tensor) -> torch.Tensor:
        """Similarity of residuals r (n, D) to every codeword of level s*C: (n, K), higher = closer.
        l2: -||r - s C_k||^2 + ||r||^2 (the dropped term is constant per row); cos: cos(r, s C_k)."""
        rc = r @ self.codebook.T
        if self.cfg.assign == "l2":
            return 2 * s * rc - (s * s) * cnorm2
        return torch.sign(s) * rc / (cnorm2.sqrt() * r.norm(dim=1, keepdim=True)).clamp_min(1e-12)

    def quantize(self, z: torch.Tensor, levels: int, soft: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Recurrent residual quantisation of z (n, D) over `levels` levels.

        Returns (b (n, levels) int64, hard codewords (levels, n, D), soft codewords (levels, n, D))
        when `soft`; the codeword tensors are None otherwise (inference: indices only).
        The recurrence always follows the hard residual, as encoding does.
        """
        s_all = self.scales(levels)
        cnorm2 = (self.codebook * self.codebook).sum(1)
        r = z
        idx, hards, softs = [], [], []
        for m in range(levels):
            s = s_all[m]
            logits = self.level_logits(r, s, cnorm2)
            b = logits.argmax(dim=1)
            hard = s * self.codebook[b]
            idx.append(b)
            if soft:
                # l2 logits are divided by the mean squared residual so tau means the same at every level
                scale = 1.0 if self.cfg.assign == "cos" else 1.0 / r.detach().pow(2).sum(1).mean().clamp_min(1e-12)
                p = torch.softmax(logits * scale / self.cfg.soft_temperature, dim=1)
                softs.append(s * (p @ self.codebook))
                hards.append(hard)
            r = r - hard
        b = torch.stack(idx, dim=1)
        if not soft:
            return b, None, None
        return b, torch.stack(hards), torch.stack(softs)

    def reconstruct(self, b: torch.Tensor) -> torch.Tensor:
        """(n, L) level indices -> (n, D) z_hat = sum_m s_m C[b_m]."""
        s = self.scales(b.shape[1])
        return torch.einsum("nld,l->nd", self.codebook[b], s)

    def level_codebooks(self, levels: int) -> torch.Tensor:
        """(levels, K, D) the codebook each level draws from: s_m C."""
        return self.scales(levels)[:, None, None] * self.codebook[None]


def make_net(d_in: int, cfg: DRQConfig) -> DRQNet:
    """The network for `cfg.codebooks`: DRQ's shared codebook, or the per-level ablation."""
    if cfg.codebooks == "per-level":
        from encoders.drq_levels import PerLevelDRQNet  # the ablation subclasses DRQNet

        return PerLevelDRQNet(d_in, cfg)
    return DRQNet(d_in, cfg)


