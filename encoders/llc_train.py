"""LLC training (METHODS.md, "LLC"): phase 1 (class codes by cross-entropy) and phase 2 (instance
codes by BCE toward the class code), each early-stopped on val. Pure functions on modules and arrays."""
from __future__ import annotations

import copy
import logging

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from encoders.llc_model import ClassCodeLayer, Trunk, nearest_class

LOG = logging.getLogger(__name__)


def _batches(n: int, batch_size: int, gen: torch.Generator) -> list[torch.Tensor]:
    return list(torch.randperm(n, generator=gen).split(batch_size))


@torch.no_grad()
def forward_np(net: nn.Module, x: np.ndarray, batch: int = 8192) -> np.ndarray:
    net.eval()
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    return torch.cat([net(xt[i:i + batch]) for i in range(0, len(xt), batch)]).numpy()


def train_class_codes(trunk: Trunk, layer: ClassCodeLayer, x: np.ndarray, y: np.ndarray,
                      val: tuple[np.ndarray, np.ndarray] | None, *, epochs: int, batch_size: int,
                      lr: float, weight_decay: float, label_smoothing: float, patience: int,
                      seed: int) -> dict[str, float]:
    """Phase 1. Trains trunk + class-code layer with CE (label smoothing); keeps the epoch with
    the best val accuracy (train accuracy if no val). y: contiguous class indices. In place."""
    gen = torch.Generator().manual_seed(seed)
    params = list(trunk.parameters()) + list(layer.parameters())
    opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    sel_x, sel_y = val if val is not None else (x, y)
    best, best_state, bad = -1.0, None, 0
    for ep in range(epochs):
        trunk.train()
        for idx in _batches(len(xt), batch_size, gen):
            loss = F.cross_entropy(layer(trunk(xt[idx])), yt[idx], label_smoothing=label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        z = torch.from_numpy(forward_np(trunk, sel_x))
        with torch.no_grad():
            acc = float((layer(z).argmax(1).numpy() == sel_y).mean())
        LOG.debug("llc phase 1 epoch %d: selection accuracy %.4f", ep, acc)
        if acc > best:
            best, bad = acc, 0
            best_state = (copy.deepcopy(trunk.state_dict()), copy.deepcopy(layer.state_dict()))
        else:
            bad += 1
            if bad >= patience:
                break
    assert best_state is not None
    trunk.load_state_dict(best_state[0])
    layer.load_state_dict(best_state[1])
    return {"phase1_select_acc": best, "phase1_epochs": float(ep + 1)}


def train_instance_codes(head: Trunk, codebook: torch.Tensor | np.ndarray | None, x: np.ndarray,
                         y: np.ndarray, val: tuple[np.ndarray, np.ndarray] | None, *, epochs: int,
                         batch_size: int, lr: float, weight_decay: float, patience: int,
                         seed: int) -> dict[str, float]:
    """Phase 2. Trains `head` (k logits) with BCE toward (B_y + 1) / 2. Refuses to run without
    phase 1's codebook: a random codebook would silently give meaningless codes. Keeps the epoch
    with the best val nearest-class-code accuracy (ties: val bit accuracy). In place."""
    if codebook is None:
        raise RuntimeError("LLC phase 2 needs the class codebook from phase 1; run phase 1 "
                           "(LLCCoder.fit_class_codes or train_class_codes) first")
    cb = torch.as_tensor(np.asarray(codebook), dtype=torch.float32)
    if cb.ndim != 2 or not bool(((cb == 1) | (cb == -1)).all()):
        raise ValueError("codebook must be a (classes, k) matrix of -1/+1 from phase 1")
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=weight_decay)
    xt = torch.from_numpy(x)
    target = (cb[torch.from_numpy(y)] + 1) / 2
    sel_x, sel_y = val if val is not None else (x, y)
    sel_t = cb.numpy()[sel_y] > 0
    best, best_state, bad, metrics = (-1.0, -1.0), None, 0, {}
    for ep in range(epochs):
        head.train()
        for idx in _batches(len(xt), batch_size, gen):
            loss = F.binary_cross_entropy_with_logits(head(xt[idx]), target[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        logits = forward_np(head, sel_x)
        pm = np.where(logits >= 0, 1.0, -1.0)
        cls, _ = nearest_class(pm, cb.numpy(), soft=logits)
        score = (float((cls == sel_y).mean()), float(((logits >= 0) == sel_t).mean()))
        LOG.debug("llc phase 2 epoch %d: selection code acc %.4f bit acc %.4f", ep, *score)
        if score > best:
            best, bad = score, 0
            best_state = copy.deepcopy(head.state_dict())
        else:
            bad += 1
            if bad >= patience:
                break
    assert best_state is not None
    head.load_state_dict(best_state)
    metrics.update({"phase2_select_code_acc": best[0], "phase2_select_bit_acc": best[1],
                    "phase2_epochs": float(ep + 1)})
    return metrics
