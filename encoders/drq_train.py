"""DRQ training (METHODS.md, DRQ): staged fit of a `DRQNet` (embedding -> level 0 -> all levels) with
the similarity and quantisation losses, the k-means codebook initialisation and the greedy scale
initialisation. Pure torch/numpy (faiss for k-means); no I/O."""
from __future__ import annotations

import contextlib
import time
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from encoders.coders import require_classes
from encoders.drq_model import DRQConfig, DRQNet, make_net


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
def fit_threads(n: int) -> Iterator[None]:
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


def train_net(train: np.ndarray, labels: np.ndarray, cfg: DRQConfig,
              device: str = "cpu") -> tuple[DRQNet, float]:
    """Staged training of a DRQNet on `train` (n, D_in) with its labels, on the torch `device` (the
    arrays are copied there once; batch order is drawn on the CPU, so it does not depend on the
    device), returned on the CPU in eval mode with frozen parameters; also the seconds the embedding
    stage took. Cost: see DRQConfig. Seeds torch's global RNG: callers fork it (`DRQCoder.fit`)."""
    t0 = time.perf_counter()
    x = np.asarray(train, dtype=np.float32)
    if x.ndim != 2 or len(x) != len(labels):
        raise ValueError(f"drq: train must be (n, D) with n labels, got {x.shape} and {len(labels)} labels")
    require_classes(labels, "drq")
    _, y = np.unique(np.asarray(labels), return_inverse=True)
    n_classes = int(y.max()) + 1
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)

    net = make_net(x.shape[1], cfg).to(device)
    xt, yt = torch.from_numpy(x).to(device), torch.from_numpy(y.astype(np.int64)).to(device)
    net.mean.copy_(xt.mean(0))
    net.inv_std.copy_(1.0 / xt.std(0).clamp_min(1e-6))
    proxies = nn.Parameter(torch.randn(n_classes, cfg.dim, generator=gen).to(device))

    def batches():
        perm = torch.randperm(len(xt), generator=gen).to(device)
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

    # codebook init: k-means of the embeddings; scales by greedy least squares
    with torch.no_grad():
        z_all = net.embed(xt)
        if cfg.codebooks == "per-level":
            net.init_codebooks(z_all, cfg.seed)  # plain residual-quantisation init (encoders/drq_levels.py)
        else:
            net.codebook.copy_(torch.from_numpy(_kmeans(z_all.cpu().numpy(), cfg.codebook_size, cfg.seed)))
            _init_scales(net, z_all)

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
    net = net.cpu().eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net, t_embed
