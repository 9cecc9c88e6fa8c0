"""LLC: learnt low-dimensional binary class codes and instance codes (METHODS.md, "LLC").

Phase 1 learns a class codebook B in {-1,+1}^(C x k): feature -> trunk (MLP) -> k real values z
-> bias-free layer whose weights are sign-binarised in the forward pass (straight-through in the
backward pass); logits = z @ B^T, cross-entropy with label smoothing. Phase 2 trains a head (warm
started from the phase-1 trunk) to predict the bits of its class code, BCE toward (B_y + 1) / 2;
the instance code is sign(head(x)), stored packed in faiss's layout (LSB first).

Uses: Hamming retrieval on instance codes (`LLCCoder.scores`), classification by nearest class
code (`predict_class`), threshold-free OOD flag by the codebook's decoding radius (`ood_flag`),
and the max-softmax baseline score from the phase-1 classifier (`msp_score`).
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from encoders.coders import Coder, FitReport, register, require_classes
from encoders.metrics import hamming_scores, hamming_topk
from encoders.selection import PROXY_TEMPERATURE

LOG = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Binarisation and bit packing
# --------------------------------------------------------------------------------------------
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
    under ~2e9 multiply-adds (1000 classes x 20 bits: 100 draws, ~1 s)."""
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


# --------------------------------------------------------------------------------------------
# Training (pure functions on modules and arrays)
# --------------------------------------------------------------------------------------------
def _batches(n: int, batch_size: int, gen: torch.Generator) -> list[torch.Tensor]:
    return list(torch.randperm(n, generator=gen).split(batch_size))


@torch.no_grad()
def _forward_np(net: nn.Module, x: np.ndarray, batch: int = 8192) -> np.ndarray:
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
        z = torch.from_numpy(_forward_np(trunk, sel_x))
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
        logits = _forward_np(head, sel_x)
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


# --------------------------------------------------------------------------------------------
# Coder
# --------------------------------------------------------------------------------------------
@dataclass
class LLCConfig:
    """LLC coder settings.

    bytes per item: ceil(bits / 8) (16 bits -> 2 B); plus one shared class codebook of
    classes x bits bits and two small MLPs (~2 x (D*hidden + hidden*bits) floats).
    fit cost: at most (epochs_class + epochs_instance) passes over train, each about
    3 x n x (D*hidden + hidden*bits) multiply-adds (forward + backward), early-stopped on val;
    measured 2-10 s in total for 10k x 128-d features, hidden=256, one thread on a shared 2-core
    machine. Encode ~0.4-1M items/s. Search: symmetric Hamming, O(nq * n * bytes).

    bits: code length k (classes need at least ceil(log2 classes); LLC uses that + a few).
    hidden: trunk hidden width (0 = linear feature -> k map, as in the paper's head).
    patience: epochs without val improvement before early stopping (val only, never query).
    """

    bits: int = 16
    hidden: int = 256
    epochs_class: int = 30
    epochs_instance: int = 15
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-5
    label_smoothing: float = 0.1
    patience: int = 5
    seed: int = 0
    proxy_temperature: float = PROXY_TEMPERATURE  # phase-1 logits cos(z, B_c) / T, the shared loss; 0: z . B_c (paper)


@register("llc")
class LLCCoder(Coder):
    """LLC instance codes with symmetric Hamming search; class codes for classification/OOD."""

    symmetric = True

    def __init__(self, config: LLCConfig | None = None, **kwargs: Any) -> None:
        self.config = config if config is not None else LLCConfig(**kwargs)
        if config is not None and kwargs:
            raise ValueError("pass either an LLCConfig or keyword settings, not both")
        if self.config.bits < 1:
            raise ValueError(f"bits must be >= 1, got {self.config.bits}")
        self.classes: np.ndarray | None = None  # original label of each class index
        self.trunk: Trunk | None = None  # phase 1 feature -> k
        self.class_layer: ClassCodeLayer | None = None
        self.head: Trunk | None = None  # phase 2 feature -> k logits
        self.codebook: np.ndarray | None = None  # (C, k) int8 in {-1, +1}

    # ---- Coder interface --------------------------------------------------------------------
    @property
    def lengths(self) -> tuple[int, ...]:
        return (self.config.bits,)

    def fit(self, train: np.ndarray, labels: np.ndarray,
            val: tuple[np.ndarray, np.ndarray] | None = None) -> FitReport:
        """Phase 1 then phase 2. train (n, D) float32, labels (n,) int; val for early stopping."""
        require_classes(labels, "llc")
        t0 = time.perf_counter()
        m1 = self.fit_class_codes(train, labels, val)
        m2 = self.fit_instance_codes(train, labels, val)
        metrics = {**m1, **m2, "d_min": float(self.d_min), "decoding_radius": float(self.radius)}
        return FitReport(fit_s=time.perf_counter() - t0, val_metrics=metrics)

    def encode(self, x: np.ndarray) -> np.ndarray:
        return pack_signs(self._instance_logits(x))

    def scores(self, queries: np.ndarray, codes: np.ndarray, bits: int | None = None) -> np.ndarray:
        if bits not in (None, self.config.bits):
            raise ValueError(f"llc: only {self.config.bits}-bit codes, got bits={bits}")
        return hamming_scores(self.encode(queries), codes)

    def search(self, queries: np.ndarray, codes: np.ndarray, k: int,
               bits: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by Hamming distance through faiss's heap kernel (no full score matrix)."""
        if bits not in (None, self.config.bits):
            raise ValueError(f"llc: only {self.config.bits}-bit codes, got bits={bits}")
        return hamming_topk(self.encode(queries), codes, k)

    def state(self) -> dict[str, Any]:
        self._require_fitted()
        assert self.trunk and self.class_layer and self.head and self.classes is not None
        return {
            "method": self.method,
            "config": dataclasses.asdict(self.config),
            "d_in": int(self.trunk.mean.shape[0]),
            "classes": torch.from_numpy(self.classes.astype(np.int64)),
            "codebook": torch.from_numpy(self.codebook.astype(np.int8)),
            "trunk": {k: v.clone() for k, v in self.trunk.state_dict().items()},
            "class_layer": {k: v.clone() for k, v in self.class_layer.state_dict().items()},
            "head": {k: v.clone() for k, v in self.head.state_dict().items()},
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "LLCCoder":
        coder = cls(LLCConfig(**state["config"]))
        k, d_in = coder.config.bits, int(state["d_in"])
        coder.classes = state["classes"].numpy().astype(np.int64)
        coder.trunk = Trunk(d_in, coder.config.hidden, k)
        coder.trunk.load_state_dict(state["trunk"])
        coder.class_layer = ClassCodeLayer(k, len(coder.classes), temperature=coder.config.proxy_temperature)
        coder.class_layer.load_state_dict(state["class_layer"])
        coder.head = Trunk(d_in, coder.config.hidden, k)
        coder.head.load_state_dict(state["head"])
        coder.codebook = state["codebook"].numpy().astype(np.int8)
        return coder

    # ---- the two phases -----------------------------------------------------------------------
    def fit_class_codes(self, train: np.ndarray, labels: np.ndarray,
                        val: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, float]:
        """Phase 1: learn the trunk and the class codebook B."""
        cfg = self.config
        x, y, v = self._prepare(train, labels, val, new_classes=True)
        n_classes = len(self.classes)
        if cfg.bits < math.ceil(math.log2(max(n_classes, 2))):
            raise ValueError(f"{cfg.bits} bits cannot give {n_classes} classes distinct codes; "
                             f"use at least ceil(log2 {n_classes}) = {math.ceil(math.log2(n_classes))}")
        torch.manual_seed(cfg.seed)
        self.trunk = Trunk(x.shape[1], cfg.hidden, cfg.bits)
        self.trunk.set_standardisation(x)
        self.class_layer = ClassCodeLayer(cfg.bits, n_classes, torch.Generator().manual_seed(cfg.seed),
                                          temperature=cfg.proxy_temperature)
        self.head, self.codebook = None, None
        m = train_class_codes(self.trunk, self.class_layer, x, y, v, epochs=cfg.epochs_class,
                              batch_size=cfg.batch_size, lr=cfg.lr, weight_decay=cfg.weight_decay,
                              label_smoothing=cfg.label_smoothing, patience=cfg.patience, seed=cfg.seed)
        self.codebook = self.class_layer.codebook().numpy()
        if self.d_min == 0:
            LOG.warning("llc: two classes share a class code (d_min = 0); classification between "
                        "them is a coin flip, consider more bits")
        return m

    def fit_instance_codes(self, train: np.ndarray, labels: np.ndarray,
                           val: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, float]:
        """Phase 2: learn the instance-code head toward phase 1's class codes."""
        if self.codebook is None or self.trunk is None:
            raise RuntimeError("LLC phase 2 needs the class codebook from phase 1; call "
                               "fit_class_codes first (or fit, which runs both phases)")
        cfg = self.config
        x, y, v = self._prepare(train, labels, val, new_classes=False)
        self.head = copy.deepcopy(self.trunk)  # warm start: z already correlates with B_y
        return train_instance_codes(self.head, self.codebook, x, y, v, epochs=cfg.epochs_instance,
                                    batch_size=cfg.batch_size, lr=cfg.lr,
                                    weight_decay=cfg.weight_decay, patience=cfg.patience,
                                    seed=cfg.seed + 1)

    # ---- class codes: classification, OOD -----------------------------------------------------
    @property
    def d_min(self) -> int:
        self._require_codebook()
        return min_pairwise_hamming(self.codebook)

    @property
    def radius(self) -> int:
        """Decoding radius floor((d_min - 1)/2); 0 = exact-match variant (d_min <= 2)."""
        return decoding_radius(self.d_min)

    def class_distances(self, x: np.ndarray) -> np.ndarray:
        """(n, C) Hamming distance of each instance code to each class code."""
        self._require_fitted()
        pm = np.where(self._instance_logits(x) >= 0, 1.0, -1.0)
        k = self.config.bits
        return ((k - pm @ self.codebook.T.astype(np.float64)) / 2).round().astype(np.int32)

    def predict_class(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(label, Hamming distance to the nearest class code) per row. Ties in distance are
        broken by the head's soft logits correlated with the tied class codes."""
        self._require_fitted()
        logits = self._instance_logits(x)
        idx, dist = nearest_class(np.where(logits >= 0, 1.0, -1.0), self.codebook, soft=logits)
        return self.classes[idx], dist

    def ood_flag(self, x: np.ndarray) -> np.ndarray:
        """True where the instance code is farther than the decoding radius from every class
        code (radius 0 = matches no class code). No threshold is fitted on any data."""
        return self.class_distances(x).min(1) > self.radius

    def predict_class_phase1(self, x: np.ndarray) -> np.ndarray:
        """Label by the phase-1 classifier: argmax of z @ B^T (real z, binary class codes)."""
        return self.classes[self._phase1_logits(x).argmax(1)]

    def msp_score(self, x: np.ndarray) -> np.ndarray:
        """Max-softmax probability of the phase-1 classifier (baseline OOD score; higher =
        more in-distribution). Needs a threshold to become a flag; ours does not."""
        return torch.softmax(torch.from_numpy(self._phase1_logits(x)), 1).max(1).values.numpy()

    # ---- internals ----------------------------------------------------------------------------
    def _prepare(self, train: np.ndarray, labels: np.ndarray, val: tuple[np.ndarray, np.ndarray] | None,
                 new_classes: bool) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray] | None]:
        x = np.ascontiguousarray(train, dtype=np.float32)
        lab = np.asarray(labels)
        if x.ndim != 2 or len(x) != len(lab):
            raise ValueError(f"train must be (n, D) with n labels, got {x.shape} and {lab.shape}")
        if new_classes:
            self.classes = np.unique(lab).astype(np.int64)
        y = self._class_index(lab, "train")
        v = None
        if val is not None:
            vx, vl = np.ascontiguousarray(val[0], dtype=np.float32), np.asarray(val[1])
            seen = np.isin(vl, self.classes)
            if not seen.all():  # a class with val rows but no train rows cannot be selected on: leave those rows out
                LOG.warning("llc: %d val rows of %d classes without train rows are left out of selection",
                            int((~seen).sum()), len(np.unique(vl[~seen])))
                vx, vl = vx[seen], vl[seen]
            v = (vx, self._class_index(vl, "val")) if len(vl) else None
        return x, y, v

    def _class_index(self, lab: np.ndarray, what: str) -> np.ndarray:
        assert self.classes is not None
        idx = np.searchsorted(self.classes, lab)
        idx = np.clip(idx, 0, len(self.classes) - 1)
        if not (self.classes[idx] == lab).all():
            raise ValueError(f"{what} labels contain classes unseen in phase 1 training")
        return idx.astype(np.int64)

    def _instance_logits(self, x: np.ndarray) -> np.ndarray:
        self._require_fitted()
        return _forward_np(self.head, x)

    def _phase1_logits(self, x: np.ndarray) -> np.ndarray:
        self._require_codebook()
        z = torch.from_numpy(_forward_np(self.trunk, x))
        return (z @ torch.from_numpy(self.codebook.astype(np.float32)).t()).numpy()

    def _require_codebook(self) -> None:
        if self.codebook is None:
            raise RuntimeError("llc: not fitted (no class codebook); call fit first")

    def _require_fitted(self) -> None:
        self._require_codebook()
        if self.head is None:
            raise RuntimeError("llc: phase 2 (instance codes) not fitted; call fit or fit_instance_codes")
