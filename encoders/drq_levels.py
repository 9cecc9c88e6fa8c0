"""DRQ ablation: one codebook per level and no scalars (`DRQConfig(codebooks="per-level")`).

DRQ's recurrent quantiser draws every level from one shared codebook C, scaled by a learned scalar
s_m. The ablation gives level m its own codebook C_m (K x D), initialised as plain residual
quantisation does (k-means of the embeddings, then k-means of each level's residuals), and trains it
by the same staged losses, learning rates and prefix loss (encoders/drq_train.py), so a table row isolates
what sharing the codebook contributes (BENCHMARKS.md, "The seed papers' claims"). Codes, prefixes and
the l2/ip/cos scores are those of DRQ; the one-table-per-query lookup needs the shared codebook, so
scores here always go through reconstructions. Model: levels * K * D codebook floats instead of K * D.

Pure torch/numpy; no I/O.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from encoders.drq_model import DRQConfig, DRQNet
from encoders.drq_train import _kmeans


class PerLevelDRQNet(DRQNet):
    """Embedding MLP + per-level codebooks `codebook[m]` (levels, K, D); scales are all 1."""

    def __init__(self, d_in: int, cfg: DRQConfig):
        super().__init__(d_in, cfg)
        self.codebook = nn.Parameter(torch.zeros(cfg.levels, cfg.codebook_size, cfg.dim))
        self.level_scales = nn.Parameter(torch.zeros(0))  # kept so training's parameter groups are unchanged

    def scales(self, levels: int | None = None) -> torch.Tensor:
        return torch.ones(self.cfg.levels if levels is None else levels, dtype=self.codebook.dtype,
                          device=self.codebook.device)

    def level_codebooks(self, levels: int) -> torch.Tensor:
        return self.codebook[:levels]

    def quantize(self, z: torch.Tensor, levels: int, soft: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Residual quantisation of z (n, D) with codebook[m] at level m; returns as DRQNet.quantize
        (the same assignment rule, soft temperature and hard-residual recurrence)."""
        r, idx, hards, softs = z, [], [], []
        for cb in self.codebook[:levels]:
            if self.cfg.assign == "l2":  # -||r - c||^2 up to a per-row constant
                logits = 2 * r @ cb.T - (cb * cb).sum(1)
            else:
                logits = F.normalize(r, dim=1) @ F.normalize(cb, dim=1).T
            b = logits.argmax(dim=1)
            idx.append(b)
            if soft:
                scale = 1.0 if self.cfg.assign == "cos" else 1.0 / r.detach().pow(2).sum(1).mean().clamp_min(1e-12)
                softs.append(torch.softmax(logits * scale / self.cfg.soft_temperature, dim=1) @ cb)
                hards.append(cb[b])
            r = r - cb[b]
        b = torch.stack(idx, dim=1)
        return (b, torch.stack(hards), torch.stack(softs)) if soft else (b, None, None)

    def reconstruct(self, b: torch.Tensor) -> torch.Tensor:
        """(n, L) level indices -> (n, D) z_hat = sum_m C_m[b_m]."""
        levels = torch.arange(b.shape[1], device=b.device)
        return self.codebook[levels[None, :], b].sum(1)

    @torch.no_grad()
    def init_codebooks(self, z: torch.Tensor, seed: int) -> None:
        """Plain residual-quantisation init: k-means of z for level 0, of each residual after."""
        r = z
        for m in range(self.cfg.levels):
            self.codebook[m] = torch.from_numpy(_kmeans(r.cpu().numpy(), self.cfg.codebook_size, seed + m)).to(r.device)
            cb = self.codebook[m]
            r = r - cb[(2 * r @ cb.T - (cb * cb).sum(1)).argmax(1)]  # nearest codeword, as k-means assigns
