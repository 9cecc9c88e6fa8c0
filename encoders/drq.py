"""Deep Recurrent Quantization (DRQ): one trained model, codes of every length (METHODS.md, DRQ).

An embedding MLP maps a feature to a unit vector z (dim D). One shared codebook C (K x D) and scalars
s_1..s_{M-1} quantize z recurrently: r_0 = z; b_m = nearest codeword of s_m*C to r_m (s_0 = 1);
r_{m+1} = r_m - s_m*C[b_m]. Each level adds log2(K) bits, so the first L bits of the longest code are
the code of length L. Search is asymmetric: T = C q (one table per query serves every level) and
<q, z_hat> = sum_m s_m T[b_m]; the default score is -||q - z_hat||^2 with ||z_hat||^2 from the codes.

Choices (similarity loss and its temperature, shared with GSL and LLC; assignment; score; prefix
loss) are selected on val queries against the train gallery by bench/select_on_val.py; the candidates
and their val scores are in BENCHMARKS.md ("Selection on val") and in every coder card
(encoders/selection.py). Earlier figures measured on the query split were withdrawn.

Pure torch/numpy; faiss for the k-means initialisation (and encoders.metrics for val mAP); no I/O.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from encoders.coders import Coder, FitReport, register, require_classes
from encoders.metrics import mean_average_precision
from encoders.selection import PROXY_TEMPERATURE

LOG = logging.getLogger(__name__)

ENCODE_BATCH = 8192        # rows per encode/embed step: memory ~ ENCODE_BATCH * (D_in + 2K) floats
LUT_QUERY_BATCH = 16       # queries per table-lookup step: keeps the accumulator block in cache
RECON_BATCH = 65536        # items reconstructed per scoring step: memory RECON_BATCH * dim floats


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
        return torch.cat([torch.ones(1, dtype=self.codebook.dtype), self.level_scales[: levels - 1]])

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

    @torch.no_grad()
    def init_codebooks(self, z: torch.Tensor, seed: int) -> None:
        """k-means of the embeddings z (n, D) for C; scales by greedy least squares."""
        self.codebook.copy_(torch.from_numpy(_kmeans(z.numpy(), self.cfg.codebook_size, seed)))
        _init_scales(self, z)


def make_net(d_in: int, cfg: DRQConfig) -> DRQNet:
    """The network for `cfg.codebooks`: DRQ's shared codebook, or the per-level ablation."""
    if cfg.codebooks == "per-level":
        from encoders.drq_levels import PerLevelDRQNet  # the ablation subclasses DRQNet

        return PerLevelDRQNet(d_in, cfg)
    return DRQNet(d_in, cfg)


def _similarity_loss(cfg: DRQConfig, z: torch.Tensor, y: torch.Tensor, proxies: torch.Tensor) -> torch.Tensor:
    if cfg.similarity_loss == "proxy":
        logits = z @ F.normalize(proxies, dim=1).T / cfg.proxy_temperature
        return F.cross_entropy(logits, y)
    # batch-hard triplet on unit vectors
    d = (2 - 2 * z @ z.T).clamp_min(0)
    same = y[:, None] == y[None, :]
    pos = torch.where(same, d, torch.zeros_like(d)).max(1).values
    neg = torch.where(same, torch.full_like(d, 1e9), d).min(1).values
    return F.relu(pos - neg + cfg.triplet_margin).mean()


def _quant_losses(cfg: DRQConfig, z: torch.Tensor, hards: torch.Tensor, softs: torch.Tensor) -> torch.Tensor:
    """||z - sum soft||^2 + ||z - sum hard||^2 + 0.1 ||sum soft - sum hard||^2, per row, averaged;
    with `prefix_loss` averaged over every prefix length too (every prefix is a code we serve)."""
    if cfg.prefix_loss:
        hs, ss = hards.cumsum(0), softs.cumsum(0)     # (L, n, D): reconstruction at each prefix
    else:
        hs, ss = hards.sum(0, keepdim=True), softs.sum(0, keepdim=True)
    l_soft = (z - ss).pow(2).sum(-1).mean()
    l_hard = (z - hs).pow(2).sum(-1).mean()
    l_joint = (ss - hs).pow(2).sum(-1).mean()
    return l_soft + l_hard + 0.1 * l_joint


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    """Run with n torch and faiss threads, then restore. Fit steps are small GEMMs (256 x 512), where
    extra OpenMP threads on busy cores wait at barriers (BENCHMARKS.md)."""
    if n <= 0:
        yield
        return
    import faiss

    old_t, old_f = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(n)
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old_t)
        faiss.omp_set_num_threads(old_f)


def _kmeans(z: np.ndarray, k: int, seed: int) -> np.ndarray:
    import faiss  # local import: only fit needs it

    z = np.ascontiguousarray(z, dtype=np.float32)
    if len(z) < k:
        raise ValueError(f"drq: need at least codebook_size={k} training rows for k-means, got {len(z)}")
    km = faiss.Kmeans(z.shape[1], k, niter=20, seed=seed, verbose=False, min_points_per_centroid=1)
    km.train(z)
    return km.centroids.copy()


@torch.no_grad()
def _init_scales(net: DRQNet, z: torch.Tensor) -> None:
    """Greedy least-squares scale per level: s_m = sum <r, C_b> / sum ||C_b||^2, re-assigning twice."""
    r = z - net.codebook[net.quantize(z, 1)[0][:, 0]]
    for m in range(1, net.cfg.levels):
        s = r.norm(dim=1).mean() / net.codebook.norm(dim=1).mean()
        for _ in range(3):
            net.level_scales[m - 1] = s
            cnorm2 = (net.codebook * net.codebook).sum(1)
            b = net.level_logits(r, s, cnorm2).argmax(1)
            cb = net.codebook[b]
            s = (r * cb).sum() / (cb * cb).sum().clamp_min(1e-12)
        net.level_scales[m - 1] = s
        r = r - s * net.codebook[net.level_logits(r, s, (net.codebook ** 2).sum(1)).argmax(1)]


# ---------------------------------------------------------------------------------------------
# the coder


@register("drq")
class DRQCoder(Coder):
    """DRQ coder: `encode` gives the longest code (levels * log2(K) bits); any multiple of log2(K)
    bits up to it is a prefix (`prefix_codes`); `scores` is asymmetric (float query vs codes)."""

    method = "drq"
    symmetric = False

    def __init__(self, config: DRQConfig | None = None, *, bits: int | None = None, **overrides: Any):
        """`config` or keyword overrides of DRQConfig fields; `bits` = levels * log2(K) trains a model
        for that single length (the per-length reference the single model is compared against)."""
        cfg = replace(config or DRQConfig(), **overrides)
        if bits is not None:
            nb = cfg.bits_per_level
            if bits <= 0 or bits % nb:
                raise ValueError(f"drq: bits must be a positive multiple of log2(K)={nb}, got {bits}")
            cfg = replace(cfg, levels=bits // nb)
        self.config = cfg
        self.net: DRQNet | None = None

    # -- lengths / validation -----------------------------------------------------------------

    @property
    def lengths(self) -> tuple[int, ...]:
        nb = self.config.bits_per_level
        return tuple(nb * m for m in range(1, self.config.levels + 1))

    def _levels_for(self, bits: int | None) -> int:
        if bits is None:
            return self.config.levels
        nb = self.config.bits_per_level
        if bits % nb or not 0 < bits <= self.full_bits:
            raise ValueError(f"drq: {bits} bits is not a code length of this model; lengths are multiples "
                             f"of log2(K)={nb} up to {self.full_bits}: {self.lengths}")
        return bits // nb

    def _require_fit(self) -> DRQNet:
        if self.net is None:
            raise RuntimeError("drq: coder is not fitted; call fit() or from_state() first")
        return self.net

    def _require_shared(self) -> DRQNet:
        if self.config.codebooks != "shared":
            raise ValueError("drq: one lookup table per query needs the shared codebook (codebooks='shared')")
        return self._require_fit()

    def additive_codebooks(self, bits: int) -> tuple[np.ndarray, int, str] | None:
        """(levels, K, dim) codebooks s_m·C, log2(K) bits per level and the score ('ip' | 'l2') of the
        codes at `bits`: z_hat = sum_m s_m C[b_m]. None when the score is not additive ('cos')."""
        if self.config.score not in ("ip", "l2"):
            return None
        net, levels = self._require_fit(), self._levels_for(bits)
        with torch.no_grad():
            cbs = net.level_codebooks(levels).detach().cpu().numpy().astype(np.float32)
        return cbs, self.config.bits_per_level, self.config.score

    def prefix_codes(self, codes: np.ndarray, bits: int) -> np.ndarray:
        """First `bits` bits of full codes; for K < 256 a length that ends inside a byte keeps that byte
        with its unused high bits cleared, so equal prefixes give equal bytes."""
        levels = self._levels_for(bits)
        nbytes = self.bytes_per_item(bits)
        if codes.ndim != 2 or codes.shape[1] < nbytes:
            raise ValueError(f"drq: codes of shape {codes.shape} are shorter than {bits} bits")
        out = np.array(codes[:, :nbytes], dtype=np.uint8, order="C")  # a copy: the mask below writes
        used = levels * self.config.bits_per_level - 8 * (nbytes - 1)
        if used < 8:
            out[:, -1] &= np.uint8((1 << used) - 1)
        return out

    # -- fit --------------------------------------------------------------------------------------

    def fit(self, train: np.ndarray, labels: np.ndarray,
            val: tuple[np.ndarray, np.ndarray] | None = None) -> FitReport:
        """Staged training (embedding -> level 0 -> all levels) on `train` with its labels; `val` only
        for the reported per-length val mAP (val queries vs the rest of val). Cost: see DRQConfig."""
        with _threads(self.config.train_threads), torch.random.fork_rng(devices=[]):
            return self._fit(train, labels, val)  # fork_rng: seeding here leaves the caller's RNG alone

    def _fit(self, train: np.ndarray, labels: np.ndarray,
             val: tuple[np.ndarray, np.ndarray] | None) -> FitReport:
        cfg = self.config
        t0 = time.perf_counter()
        x = np.asarray(train, dtype=np.float32)
        if x.ndim != 2 or len(x) != len(labels):
            raise ValueError(f"drq: train must be (n, D) with n labels, got {x.shape} and {len(labels)} labels")
        require_classes(labels, "drq")
        _, y = np.unique(np.asarray(labels), return_inverse=True)
        n_classes = int(y.max()) + 1
        torch.manual_seed(cfg.seed)
        gen = torch.Generator().manual_seed(cfg.seed)

        net = make_net(x.shape[1], cfg)
        xt, yt = torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))
        net.mean.copy_(xt.mean(0))
        net.inv_std.copy_(1.0 / xt.std(0).clamp_min(1e-6))
        proxies = nn.Parameter(torch.randn(n_classes, cfg.dim, generator=gen))

        def batches():
            perm = torch.randperm(len(xt), generator=gen)
            for i in range(0, len(perm), cfg.batch_size):
                j = perm[i: i + cfg.batch_size]
                yield xt[j], yt[j]

        # stage 1: embedding alone, by the similarity loss
        opt = torch.optim.AdamW([*net.mlp.parameters(), proxies], lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(cfg.epochs_embed, 1))
        for _ in range(cfg.epochs_embed):
            for xb, yb in batches():
                loss = _similarity_loss(cfg, net.embed(xb), yb, proxies)
                opt.zero_grad()
                loss.backward()
                opt.step()
            sched.step()
        t_embed = time.perf_counter() - t0

        with torch.no_grad():
            net.init_codebooks(net.embed(xt), cfg.seed)

        # stage 2: level 0 of the codebook; stage 3: all levels (+ scales). The embedding keeps
        # training (similarity + quantisation losses) at lr/10 when finetune_embedding.
        head = [proxies] + (list(net.mlp.parameters()) if cfg.finetune_embedding else [])
        for stage_levels, epochs in ((1, cfg.epochs_level0), (cfg.levels, cfg.epochs_all)):
            # the shared codebook IS the level-0 codebook: in the all-levels stage it moves slowly,
            # else serving the residual levels costs the shortest code
            cb_lr = cfg.lr * (cfg.codebook_lr_all if stage_levels > 1 else 1.0)
            groups = [{"params": [net.codebook], "lr": cb_lr, "weight_decay": 0.0},
                      {"params": head, "lr": cfg.lr * 0.1}]
            if stage_levels > 1:
                groups.append({"params": [net.level_scales], "weight_decay": 0.0})
            opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
            for _ in range(epochs):
                for xb, yb in batches():
                    z = net.embed(xb) if cfg.finetune_embedding else net.embed(xb).detach()
                    _, hards, softs = net.quantize(z, stage_levels, soft=True)
                    loss = (_similarity_loss(cfg, z, yb, proxies)
                            + cfg.quant_weight * _quant_losses(cfg, z, hards, softs))
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
        net.eval()
        self.net = net
        for p in net.parameters():
            p.requires_grad_(False)
        fit_s = time.perf_counter() - t0
        metrics = self.val_maps(*val) if val is not None else {}
        LOG.info("drq fit: %.1f s (embedding %.1f s), val %s", fit_s, t_embed, metrics)
        return FitReport(fit_s=fit_s, val_metrics=metrics)

    def val_maps(self, features: np.ndarray, labels: np.ndarray, n_queries: int = 1000) -> dict[str, float]:
        """Per-length mAP@all on a labelled split: its first `n_queries` rows against the rest."""
        labels = np.asarray(labels)
        nq = min(n_queries, len(features) // 2)
        q, d, ql, dl = features[:nq], features[nq:], labels[:nq], labels[nq:]
        codes = self.encode(d)
        out = {f"map@{b}": mean_average_precision(self.scores(q, codes, b), ql, dl)["map"] for b in self.lengths}
        zq, zd = self.embed(q), self.embed(d)
        out["map@float"] = mean_average_precision(zq @ zd.T, ql, dl)["map"]
        return out

    # -- encode / search ------------------------------------------------------------------------

    def _check_features(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        d_in = self._require_fit().mean.shape[0]
        if x.ndim != 2 or x.shape[1] != d_in:
            raise ValueError(f"drq: expected (n, {d_in}) float features, got shape {x.shape}")
        return x

    @torch.no_grad()
    def embed(self, x: np.ndarray) -> np.ndarray:
        """(n, D_in) features -> (n, dim) float32 unit embeddings, batched."""
        net = self._require_fit()
        x = self._check_features(x)
        out = np.empty((len(x), self.config.dim), dtype=np.float32)
        for i in range(0, len(x), ENCODE_BATCH):
            out[i: i + ENCODE_BATCH] = net.embed(torch.from_numpy(x[i: i + ENCODE_BATCH])).numpy()
        return out

    @torch.no_grad()
    def encode(self, x: np.ndarray) -> np.ndarray:
        """(n, D_in) -> (n, levels*log2(K)/8) uint8, deterministic, in batches of ENCODE_BATCH rows."""
        net = self._require_fit()
        x = self._check_features(x)
        b = np.empty((len(x), self.config.levels), dtype=np.int64)
        for i in range(0, len(x), ENCODE_BATCH):
            z = net.embed(torch.from_numpy(x[i: i + ENCODE_BATCH]))
            b[i: i + ENCODE_BATCH] = net.quantize(z, self.config.levels)[0].numpy()
        return pack_levels(b, self.config.bits_per_level)

    def decode_levels(self, codes: np.ndarray, bits: int | None = None) -> np.ndarray:
        """Codes (full or at least `bits` long) -> (n, bits/log2(K)) int64 level indices."""
        return unpack_levels(codes, self.config.bits_per_level, self._levels_for(bits))

    @torch.no_grad()
    def reconstruct(self, codes: np.ndarray, bits: int | None = None) -> np.ndarray:
        """Codes -> (n, dim) float32 z_hat = sum_m s_m C[b_m] over the first bits/log2(K) levels."""
        net = self._require_fit()
        b = self.decode_levels(codes, bits)
        out = np.empty((len(b), self.config.dim), dtype=np.float32)
        for i in range(0, len(b), ENCODE_BATCH):
            out[i: i + ENCODE_BATCH] = net.reconstruct(torch.from_numpy(b[i: i + ENCODE_BATCH])).numpy()
        return out

    @torch.no_grad()
    def lookup_tables(self, queries: np.ndarray) -> np.ndarray:
        """(nq, D_in) -> (nq, K) T[k] = <q_emb, C_k>: one table serves every level (shared codebook)."""
        net = self._require_shared()
        return (torch.from_numpy(self.embed(queries)) @ net.codebook.T).numpy()

    def lut_scores(self, queries: np.ndarray, codes: np.ndarray, bits: int | None = None) -> np.ndarray:
        """<q_emb, z_hat> (nq, n) by table lookups: T = lookup_tables(q) once per query (the codebook
        is shared), then sum_m s_m T[:, b_m]. Cost: nq*K*dim + nq*n*levels gathers."""
        return self._lut_ip(self.embed(queries), codes, bits)

    @torch.no_grad()
    def _lut_ip(self, qe: np.ndarray, codes: np.ndarray, bits: int | None) -> np.ndarray:
        net = self._require_shared()
        b = self.decode_levels(codes, bits)
        s = net.scales(b.shape[1]).numpy()
        tables = (torch.from_numpy(qe) @ net.codebook.T).numpy()
        out = np.empty((len(tables), len(b)), dtype=np.float32)
        cols = [np.ascontiguousarray(b[:, m], dtype=np.intp) for m in range(b.shape[1])]
        for i in range(0, len(tables), LUT_QUERY_BATCH):
            t = tables[i: i + LUT_QUERY_BATCH]
            acc = np.take(t, cols[0], axis=1)
            for m in range(1, len(cols)):
                acc += np.take(t * s[m], cols[m], axis=1)  # scale the small table, not the gathered block
            out[i: i + LUT_QUERY_BATCH] = acc
        return out

    def _recon_norms_and_ip(self, qe: np.ndarray, codes: np.ndarray, bits: int | None,
                            with_ip: bool) -> tuple[np.ndarray | None, np.ndarray]:
        """(<qe, z_hat> (nq, n) or None, ||z_hat||^2 (n,)), reconstructing RECON_BATCH items at a
        time: the inner products are one GEMM per chunk."""
        n = len(codes)
        out = np.empty((len(qe), n), dtype=np.float32) if with_ip else None
        norms = np.empty(n, dtype=np.float32)
        for i in range(0, n, RECON_BATCH):
            z = self.reconstruct(codes[i: i + RECON_BATCH], bits)
            if out is not None:
                np.matmul(qe, z.T, out=out[:, i: i + RECON_BATCH])
            norms[i: i + RECON_BATCH] = np.einsum("nd,nd->n", z, z)
        return out, norms

    def scores(self, queries: np.ndarray, codes: np.ndarray, bits: int | None = None) -> np.ndarray:
        """Asymmetric similarity (nq, n) float32 at `bits` (default full; codes may be full-length or
        already cut to `bits`), per `config.score`: ip <q, z_hat>; l2 -||q - z_hat||^2; cos
        <q, z_hat>/||z_hat||, where q is the embedded query (unit norm) and z_hat = sum_m s_m C[b_m].

        <q, z_hat> equals the ADC sum_m s_m T[b_m] (`lut_scores`); it is computed as one GEMM against
        the reconstructed items when dim <= 64 * levels, else by the tables (the crossover was
        measured: BENCHMARKS.md, "DRQ timings moved from docstrings").
        Cost: nq*n*dim flops (or nq*n*levels gathers) + n*levels*dim for the reconstructions;
        memory: the output + RECON_BATCH*dim floats.
        """
        levels = self._levels_for(bits)
        qe = self.embed(queries)
        score = self.config.score
        use_gemm = self.config.dim <= 64 * levels or self.config.codebooks != "shared"  # tables: shared C only
        if score == "l2":
            qe *= 2  # -||q - z||^2 = 2<q, z> - ||z||^2 - 1 for unit q: one GEMM, one subtraction
        if use_gemm or score != "ip":
            out, norms = self._recon_norms_and_ip(qe, codes, bits, with_ip=use_gemm)
        if not use_gemm:
            out = self._lut_ip(qe, codes, bits)
        if score == "l2":
            out -= (norms + 1.0)[None, :]
        elif score == "cos":
            out /= np.sqrt(norms).clip(1e-12)[None, :]
        return out

    # -- persistence ----------------------------------------------------------------------------

    def truncated(self, levels: int) -> "DRQCoder":
        """The same model keeping only its first `levels` levels (encodes the prefix of every code)."""
        if not 1 <= levels <= self.config.levels:
            raise ValueError(f"drq: levels must be in [1, {self.config.levels}], got {levels}")
        st = self.state()
        st["config"]["levels"] = levels
        st["level_scales"] = st["level_scales"][: levels - 1].clone()
        if self.config.codebooks == "per-level":
            st["codebook"] = st["codebook"][:levels].clone()
        return DRQCoder.from_state(st)

    def state(self) -> dict[str, Any]:
        net = self._require_fit()
        return {
            "method": self.method,
            "config": asdict(self.config),
            "d_in": int(net.mean.shape[0]),
            **{k: v.detach().clone() for k, v in net.state_dict().items()},
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "DRQCoder":
        if state.get("method") != "drq":
            raise ValueError(f"drq: state is for method {state.get('method')!r}")
        coder = cls(DRQConfig(**state["config"]))
        net = make_net(int(state["d_in"]), coder.config)
        keys = set(net.state_dict())
        net.load_state_dict({k: state[k] for k in keys})
        net.eval()
        for p in net.parameters():
            p.requires_grad_(False)
        coder.net = net
        return coder
