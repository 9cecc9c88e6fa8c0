"""GSL: gradient snapping layer for quantization-friendly embeddings (METHODS.md, "GSL").

An embedding network (MLP on input features, L2-normalised output) is trained with a proxy
similarity loss on labels. In `mode="gsl"` a `GradientSnap` layer sits on the embedding: identity
forward; backward g' = g + lam * P_g(x - q(x)), where q(x) is the current PQ reconstruction and
P_g removes the component along g, so the snap leaves the first-order change of the similarity
loss untouched while pulling x toward its codeword. The PQ (or OPQ + PQ) codebooks are refit by
faiss k-means on current embeddings every `refit_every` steps.

Comparison modes on the same schedule: `mode="none"` (no quantization term, PQ fit afterwards)
and `mode="qloss"` (similarity loss + qloss_weight * ||x - q(x)||^2, the biased baseline).
Codes: M = bits / 8 sub-quantizers of 256 codewords (one byte each); search is asymmetric
(minus the squared L2 distance via per-query lookup tables).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from encoders.coders import Coder, FitReport, register, require_classes
from encoders.metrics import mean_average_precision
from encoders.selection import PROXY_TEMPERATURE

LOG = logging.getLogger(__name__)

KSUB = 256  # codewords per sub-quantizer: 8 bits, one byte per sub-code
MODES = ("none", "qloss", "gsl")


# --------------------------------------------------------------------------------------------
# The layer
# --------------------------------------------------------------------------------------------
def project_out(v: torch.Tensor, g: torch.Tensor, eps: float = 1e-30) -> torch.Tensor:
    """Per row: v - (<v, g> / ||g||^2) g, i.e. v without its component along g. Rows with
    g = 0 have no direction to remove and return v unchanged."""
    gg = (g * g).sum(-1, keepdim=True)
    vg = (v * g).sum(-1, keepdim=True)
    coef = torch.where(gg > eps, vg / gg.clamp_min(eps), torch.zeros_like(gg))
    return v - coef * g


class GradientSnap(torch.autograd.Function):
    """Identity forward. Backward: g -> g + lam * project_out(x - q, g).

    Sign: gradient descent moves x by -lr * g', so the added term -lr * lam * P(x - q) moves x
    toward q; <P(x - q), x - q> = ||x - q||^2 - <x - q, g>^2/||g||^2 >= 0 (Cauchy-Schwarz), so a
    small step never increases ||x - q|| to first order, and <P(x - q), g> = 0.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, q: torch.Tensor, lam: float) -> torch.Tensor:
        ctx.save_for_backward((x - q).detach())
        ctx.lam = float(lam)
        return x.clone()

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (v,) = ctx.saved_tensors
        return g + ctx.lam * project_out(v, g), None, None


def gradient_snap(x: torch.Tensor, q: torch.Tensor, lam: float) -> torch.Tensor:
    return GradientSnap.apply(x, q.detach(), lam)


# --------------------------------------------------------------------------------------------
# Quantizer: PQ (optionally after an OPQ rotation), trained by faiss, applied in torch or faiss
# --------------------------------------------------------------------------------------------
class PQQuantizer:
    """M sub-quantizers x 256 codewords on d dims, optional orthonormal OPQ rotation R (x -> x R^T).

    fit: faiss k-means per sub-space (ProductQuantizer.train), plus OPQMatrix.train if opq.
    Memory: M * 256 * d/M floats (+ d*d for OPQ). Encode: O(n * d * 256) flops.
    """

    def __init__(self, d: int, m: int, opq: bool = False, seed: int = 1234) -> None:
        if d % m:
            raise ValueError(f"embedding dim {d} must be divisible by the number of sub-quantizers {m}")
        self.d, self.m, self.opq, self.seed = d, m, opq, seed
        self.centroids: np.ndarray | None = None  # (M, 256, d/M) float32
        self.rotation: np.ndarray | None = None  # (d, d) float32, rows orthonormal
        self._pq: faiss.ProductQuantizer | None = None

    def fit(self, x: np.ndarray) -> "PQQuantizer":
        x = np.ascontiguousarray(x, dtype=np.float32)
        if len(x) < KSUB:
            raise ValueError(f"need at least {KSUB} points to train 256 codewords, got {len(x)}")
        if self.opq:
            opq = faiss.OPQMatrix(self.d, self.m)
            opq.niter = 25
            opq.verbose = False
            opq.train(x)
            self.rotation = faiss.vector_to_array(opq.A).reshape(self.d, self.d).astype(np.float32)
            x = x @ self.rotation.T
        pq = faiss.ProductQuantizer(self.d, self.m, 8)
        pq.cp.seed = self.seed
        pq.cp.min_points_per_centroid = 1  # small refit samples are fine; silences faiss's warning
        pq.train(x)
        self.centroids = faiss.vector_to_array(pq.centroids).reshape(self.m, KSUB, self.d // self.m)
        self._pq = pq
        return self

    @classmethod
    def from_arrays(cls, centroids: np.ndarray, rotation: np.ndarray | None, seed: int = 1234) -> "PQQuantizer":
        m, _, dsub = centroids.shape
        qz = cls(m * dsub, m, opq=rotation is not None, seed=seed)
        qz.centroids = np.ascontiguousarray(centroids, dtype=np.float32)
        qz.rotation = None if rotation is None else np.ascontiguousarray(rotation, dtype=np.float32)
        qz._pq = faiss.ProductQuantizer(qz.d, m, 8)
        faiss.copy_array_to_vector(qz.centroids.ravel(), qz._pq.centroids)
        return qz

    def _rotate(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        return x if self.rotation is None else np.ascontiguousarray(x @ self.rotation.T)

    def encode(self, x: np.ndarray) -> np.ndarray:
        """(n, d) -> (n, M) uint8 codes (faiss ProductQuantizer.compute_codes)."""
        assert self._pq is not None, "quantizer not fitted"
        return self._pq.compute_codes(self._rotate(x))

    def decode(self, codes: np.ndarray) -> np.ndarray:
        assert self._pq is not None, "quantizer not fitted"
        y = self._pq.decode(np.ascontiguousarray(codes, dtype=np.uint8))
        return y if self.rotation is None else y @ self.rotation

    def reconstruct_torch(self, x: torch.Tensor) -> torch.Tensor:
        """q(x): nearest codeword per sub-space, back in the input space. No gradient."""
        assert self.centroids is not None, "quantizer not fitted"
        with torch.no_grad():
            c = torch.from_numpy(self.centroids)  # (M, K, ds)
            xr = x if self.rotation is None else x @ torch.from_numpy(self.rotation).t()
            xs = xr.reshape(len(x), self.m, -1).transpose(0, 1)  # (M, n, ds)
            dist = (xs * xs).sum(-1, keepdim=True) - 2 * xs @ c.transpose(1, 2) + (c * c).sum(-1)[:, None, :]
            idx = dist.argmin(-1)  # (M, n)
            q = torch.stack([c[j, idx[j]] for j in range(self.m)], 1).reshape(len(x), -1)
            return q if self.rotation is None else q @ torch.from_numpy(self.rotation)

    def adc_scores(self, queries: np.ndarray, codes: np.ndarray, chunk: int = 256) -> np.ndarray:
        """Minus squared L2 between each float query and each code's reconstruction via per-query
        lookup tables: (nq, M, 256) tables, then M gathers per (query, item). O(nq*n*M)."""
        assert self.centroids is not None, "quantizer not fitted"
        q = self._rotate(queries).reshape(len(queries), self.m, -1)
        codes = np.asarray(codes)
        if codes.ndim != 2 or codes.shape[1] != self.m:
            raise ValueError(f"codes must be (n, {self.m}) uint8, got {codes.shape}")
        c = self.centroids
        cn = (c * c).sum(-1)  # (M, K)
        out = np.empty((len(q), len(codes)), dtype=np.float32)
        for i in range(0, len(q), chunk):
            qi = q[i:i + chunk]
            tables = (qi * qi).sum(-1)[:, :, None] - 2 * np.einsum("nmd,mkd->nmk", qi, c) + cn[None]
            acc = np.zeros((len(qi), len(codes)), dtype=np.float32)
            for j in range(self.m):
                acc += tables[:, j, :][:, codes[:, j]]
            out[i:i + chunk] = -acc
        return out


# --------------------------------------------------------------------------------------------
# Coder
# --------------------------------------------------------------------------------------------
@dataclass
class GSLConfig:
    """GSL coder settings.

    bytes per item: bits / 8 (one byte per sub-quantizer; 16/32/64 bits -> 2/4/8 B).
    Model: MLP D -> hidden -> dim (~D*hidden + hidden*dim floats) + M*256*dim/M codebook floats
    (+ dim^2 for OPQ).
    fit cost: epochs passes over train, each ~3 x n x (D*hidden + hidden*dim) multiply-adds, plus
    one quantizer refit (faiss k-means, M x 256 centroids on `refit_sample` points; OPQ adds its
    alternating optimisation) every `refit_every` steps in modes qloss/gsl and one final fit
    (the OPQ refits dominate; mode "none" has none). Fit times: BENCHMARKS.md section 13.
    Search: asymmetric, O(nq * n * M) table lookups.

    mode: "gsl" (gradient snapping), "qloss" (similarity + quantization loss, biased baseline),
      "none" (similarity loss only, PQ afterwards). All share the same schedule.
    lam: snap strength. The layer gets lam / batch_size so that lam is on the per-sample scale of
      a mean quantization loss: lam = 2 * qloss_weight gives the same magnitude as qloss's gradient
      before projection.
    refit_every: T, steps between codebook refits; refit_sample: points embedded per refit.
    scale: inverse temperature of the normalised proxy softmax (the similarity loss).
    Defaults for lam / qloss_weight are selected on val (bench/select_on_val.py: lam 0.5-20 at 32
    bits, qloss_weight = lam / 2, the matched strength); the smallest strength won both grids.
    """

    bits: int = 32
    dim: int = 64
    hidden: int = 512
    mode: str = "gsl"
    opq: bool = False
    lam: float = 0.5             # val-selected (encoders/selection.py SELECTIONS["gsl"])
    qloss_weight: float = 0.25   # matched strength: lam / 2 (val-selected the same way)
    refit_every: int = 50
    refit_sample: int = 10000
    epochs: int = 15
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-5
    scale: float = 1.0 / PROXY_TEMPERATURE  # the shared, val-selected temperature (encoders/selection.py)
    seed: int = 0
    val_queries: int = 1000


class EmbeddingNet(nn.Module):
    """Standardise -> MLP -> L2-normalised `dim`-d embedding."""

    def __init__(self, d_in: int, hidden: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(d_in))
        self.register_buffer("inv_std", torch.ones(d_in))
        self.body = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.body((x - self.mean) * self.inv_std), dim=-1)


@register("gsl")
class GSLCoder(Coder):
    """Embedding MLP trained with a similarity loss + (mode) snapping; PQ/OPQ codes, ADC search."""

    symmetric = False

    def __init__(self, config: GSLConfig | None = None, **kwargs: Any) -> None:
        if config is not None and kwargs:
            raise ValueError("pass either a GSLConfig or keyword settings, not both")
        self.config = config if config is not None else GSLConfig(**kwargs)
        cfg = self.config
        if cfg.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {cfg.mode!r}")
        if cfg.bits % 8 or cfg.bits <= 0:
            raise ValueError(f"bits must be a positive multiple of 8 (8 bits per sub-quantizer), got {cfg.bits}")
        if cfg.dim % (cfg.bits // 8):
            raise ValueError(f"dim {cfg.dim} must be divisible by M = bits/8 = {cfg.bits // 8}")
        self.net: EmbeddingNet | None = None
        self.quantizer: PQQuantizer | None = None

    @property
    def m(self) -> int:
        return self.config.bits // 8

    @property
    def lengths(self) -> tuple[int, ...]:
        return (self.config.bits,)

    # ---- training -----------------------------------------------------------------------------
    def fit(self, train: np.ndarray, labels: np.ndarray,
            val: tuple[np.ndarray, np.ndarray] | None = None) -> FitReport:
        """Train the embedding (mode none/qloss/gsl) then fit the final PQ/OPQ on train
        embeddings. val is used only for the diagnostics in the report."""
        t0 = time.perf_counter()
        cfg = self.config
        x = np.ascontiguousarray(train, dtype=np.float32)
        lab = np.asarray(labels)
        if x.ndim != 2 or len(x) != len(lab):
            raise ValueError(f"train must be (n, D) with n labels, got {x.shape} and {lab.shape}")
        require_classes(lab, "gsl")
        classes, y = np.unique(lab, return_inverse=True)
        torch.manual_seed(cfg.seed)
        gen = torch.Generator().manual_seed(cfg.seed)
        rng = np.random.default_rng(cfg.seed)
        net = EmbeddingNet(x.shape[1], cfg.hidden, cfg.dim)
        net.mean.copy_(torch.from_numpy(x.mean(0)))
        net.inv_std.copy_(torch.from_numpy(1.0 / (x.std(0) + 1e-6)))
        proxies = nn.Parameter(torch.randn(len(classes), cfg.dim))
        opt = torch.optim.Adam(list(net.parameters()) + [proxies], lr=cfg.lr, weight_decay=cfg.weight_decay)
        xt, yt = torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))
        quant = PQQuantizer(cfg.dim, self.m, opq=cfg.opq, seed=1234)
        step, n_refits, epoch_loss = 0, 0, 0.0
        for ep in range(cfg.epochs):
            loss_sum = 0.0
            for idx in torch.randperm(len(xt), generator=gen).split(cfg.batch_size):
                if cfg.mode != "none" and step % cfg.refit_every == 0:
                    sample = rng.choice(len(x), min(cfg.refit_sample, len(x)), replace=False)
                    quant.fit(self._embed_with(net, x[np.sort(sample)]))
                    n_refits += 1
                net.train()
                e = net(xt[idx])
                qloss = torch.zeros(())
                if cfg.mode == "gsl":
                    e = gradient_snap(e, quant.reconstruct_torch(e.detach()), cfg.lam / len(idx))
                elif cfg.mode == "qloss":
                    qloss = ((e - quant.reconstruct_torch(e.detach())) ** 2).sum(1).mean()
                logits = cfg.scale * e @ F.normalize(proxies, dim=-1).t()
                sim = F.cross_entropy(logits, yt[idx])
                loss = sim + cfg.qloss_weight * qloss if cfg.mode == "qloss" else sim
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                loss_sum += float(sim.detach()) * len(idx)
            epoch_loss = loss_sum / len(x)
            LOG.debug("gsl %s epoch %d: similarity loss %.4f", cfg.mode, ep, epoch_loss)
        net.eval()
        self.net = net
        emb = self._embed_with(net, x)
        self.quantizer = PQQuantizer(cfg.dim, self.m, opq=cfg.opq, seed=1234).fit(emb)
        metrics: dict[str, float] = {"train_sim_loss_last_epoch": epoch_loss, "steps": float(step),
                                     "refits": float(n_refits), "train_quant_mse": self._quant_mse(emb)}
        if val is not None:
            metrics.update(self._val_metrics(val))
        return FitReport(fit_s=time.perf_counter() - t0, val_metrics=metrics)

    # ---- Coder interface ----------------------------------------------------------------------
    def embed(self, x: np.ndarray) -> np.ndarray:
        """(n, D) features -> (n, dim) float32 L2-normalised embeddings (the float ceiling)."""
        if self.net is None:
            raise RuntimeError("gsl: not fitted; call fit first")
        return self._embed_with(self.net, x)

    def encode(self, x: np.ndarray) -> np.ndarray:
        self._require_fitted()
        return self.quantizer.encode(self.embed(x))

    def scores(self, queries: np.ndarray, codes: np.ndarray, bits: int | None = None) -> np.ndarray:
        if bits not in (None, self.config.bits):
            raise ValueError(f"gsl: only {self.config.bits}-bit codes, got bits={bits}")
        self._require_fitted()
        return self.quantizer.adc_scores(self.embed(queries), codes)

    def state(self) -> dict[str, Any]:
        self._require_fitted()
        st: dict[str, Any] = {
            "method": self.method,
            "config": dataclasses.asdict(self.config),
            "d_in": int(self.net.mean.shape[0]),
            "net": {k: v.clone() for k, v in self.net.state_dict().items()},
            "centroids": torch.from_numpy(self.quantizer.centroids.copy()),
        }
        if self.quantizer.rotation is not None:
            st["rotation"] = torch.from_numpy(self.quantizer.rotation.copy())
        return st

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "GSLCoder":
        coder = cls(GSLConfig(**state["config"]))
        cfg = coder.config
        coder.net = EmbeddingNet(int(state["d_in"]), cfg.hidden, cfg.dim)
        coder.net.load_state_dict(state["net"])
        coder.net.eval()
        rot = state.get("rotation")
        coder.quantizer = PQQuantizer.from_arrays(state["centroids"].numpy(),
                                                  None if rot is None else rot.numpy())
        return coder

    # ---- internals ----------------------------------------------------------------------------
    @staticmethod
    @torch.no_grad()
    def _embed_with(net: EmbeddingNet, x: np.ndarray, batch: int = 8192) -> np.ndarray:
        was_training = net.training
        net.eval()
        xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        out = torch.cat([net(xt[i:i + batch]) for i in range(0, len(xt), batch)]).numpy()
        net.train(was_training)
        return out

    def _quant_mse(self, emb: np.ndarray) -> float:
        rec = self.quantizer.decode(self.quantizer.encode(emb))
        return float(((emb - rec) ** 2).sum(1).mean())

    def _val_metrics(self, val: tuple[np.ndarray, np.ndarray]) -> dict[str, float]:
        vx = np.ascontiguousarray(val[0], dtype=np.float32)
        vy = np.asarray(val[1])
        emb = self.embed(vx)
        # val queries against the rest of val (no self-matches); a diagnostic, never query data
        nq = min(self.config.val_queries, len(vx) // 2)
        perm = np.random.default_rng(self.config.seed).permutation(len(vx))
        qi, di = perm[:nq], perm[nq:]
        codes = self.quantizer.encode(emb[di])
        s = self.quantizer.adc_scores(emb[qi], codes)
        s_float = emb[qi] @ emb[di].T
        return {"val_quant_mse": self._quant_mse(emb),
                "val_map_adc": mean_average_precision(s, vy[qi], vy[di])["map"],
                "val_map_float": mean_average_precision(s_float, vy[qi], vy[di])["map"]}

    def _require_fitted(self) -> None:
        if self.net is None or self.quantizer is None:
            raise RuntimeError("gsl: not fitted; call fit first")
