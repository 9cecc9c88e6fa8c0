"""LLC: learnt low-dimensional binary class codes and instance codes (METHODS.md, "LLC").

Phase 1 learns a class codebook B in {-1,+1}^(C x k): feature -> trunk (MLP) -> k real values z
-> bias-free layer whose weights are sign-binarised in the forward pass (straight-through in the
backward pass); logits = z @ B^T, cross-entropy with label smoothing. Phase 2 trains a head (warm
started from the phase-1 trunk) to predict the bits of its class code, BCE toward (B_y + 1) / 2;
the instance code is sign(head(x)), stored packed in faiss's layout (LSB first).

Uses: Hamming retrieval on instance codes (`LLCCoder.scores`), classification by nearest class
code (`predict_class`), threshold-free OOD flag by the codebook's decoding radius (`ood_flag`),
and the max-softmax baseline score from the phase-1 classifier (`msp_score`).
Building blocks: `encoders/llc_model.py`; the two training phases: `encoders/llc_train.py`; this
module is the coder.
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

from encoders.coders import Coder, FitReport, register, require_classes
from encoders.llc_model import (ClassCodeLayer, Trunk, decoding_radius, min_pairwise_hamming, nearest_class,
                                pack_signs)
from encoders.llc_train import forward_np, train_class_codes, train_instance_codes
from encoders.metrics import hamming_scores, hamming_topk
from encoders.selection import PROXY_TEMPERATURE

LOG = logging.getLogger(__name__)


@dataclass
class LLCConfig:
    """LLC coder settings.

    bytes per item: ceil(bits / 8) (16 bits -> 2 B); plus one shared class codebook of
    classes x bits bits and two small MLPs (~2 x (D*hidden + hidden*bits) floats).
    fit cost: at most (epochs_class + epochs_instance) passes over train, each about
    3 x n x (D*hidden + hidden*bits) multiply-adds (forward + backward), early-stopped on val.
    Encode: one MLP forward per item. Search: symmetric Hamming, O(nq * n * bytes).

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

    def class_columns(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The decoded class (int32) and the OOD flag of each row, stored beside its code."""
        cls, _ = self.predict_class(x)
        return cls.astype(np.int32), self.ood_flag(x)

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
        return forward_np(self.head, x)

    def _phase1_logits(self, x: np.ndarray) -> np.ndarray:
        self._require_codebook()
        z = torch.from_numpy(forward_np(self.trunk, x))
        return (z @ torch.from_numpy(self.codebook.astype(np.float32)).t()).numpy()

    def _require_codebook(self) -> None:
        if self.codebook is None:
            raise RuntimeError("llc: not fitted (no class codebook); call fit first")

    def _require_fitted(self) -> None:
        self._require_codebook()
        if self.head is None:
            raise RuntimeError("llc: phase 2 (instance codes) not fitted; call fit or fit_instance_codes")
