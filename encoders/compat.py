"""Compatible model updates: Dual-Tuning losses, the BCT baseline, the compatibility matrix and gate.

METHODS.md, "Dual-Tuning". The stored gallery holds features of the old model phi_old. A new model
phi_new (wider backbone, more classes) is trained so that its features of new queries can be
searched against the old gallery. Losses for phi_new, all computed in the old feature space
(a `Projection` maps a wider new embedding to the old dimension first):

- its own classification loss (cross-entropy through its own head, `train_classifier`),
- `prototype_loss`: pull each new feature to its class's old prototype, push it from the others,
- `mutual_structural_loss`: new features through the frozen old classifier + old features
  through the new classifier, both cross-entropy,
- (baseline) `influence_loss`: BCT, new features through the frozen old classifier only.

`compat_matrix` measures M(old,old), M(new,new) and M(new query, old gallery) (mAP@all and top-1,both tie-aware) on float features, `code_compat_matrix` the same on a coder's codes, the update gain
and the negative-flip rate; `CompatReport.gate()` is the ship rule.

The losses and the projected model live in `encoders/compat_losses.py`, the matrix and the gate in
`encoders/compat_matrix.py`; this module trains a compatible model (`train_compatible`) and gathers
the public names. Pure torch/numpy, no I/O.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from encoders.backbones import embed_pixels, grey_preprocess
from encoders.compat_losses import (Projection, ProjectedBackbone, influence_loss, mutual_structural_loss,
                                    old_prototypes, prototype_loss, single_linear, synthesize_classifier)
from encoders.compat_matrix import (CELLS, DEFAULT_MAX_FLIP_RATE, CompatReport, GateDecision,
                                    average_precision_from_scores, code_compat_matrix, compat_matrix,
                                    cosine_scores, decide_gate)
from encoders.training import TrainReport, train_classifier

__all__ = [
    "METHODS", "CompatConfig", "train_compatible",
    "Projection", "ProjectedBackbone", "influence_loss", "mutual_structural_loss", "old_prototypes",
    "prototype_loss", "single_linear", "synthesize_classifier",
    "CELLS", "DEFAULT_MAX_FLIP_RATE", "CompatReport", "GateDecision", "average_precision_from_scores",
    "code_compat_matrix", "compat_matrix", "cosine_scores", "decide_gate",
]

LOG = logging.getLogger(__name__)

METHODS = ("independent", "bct", "dual-tuning")


# training a compatible new model

@dataclass
class CompatConfig:
    """Loss weights and hyperparameters for `train_compatible` (choose them on val, never query).

    proto_weight / mutual_weight: Dual-Tuning's prototype and mutual-structural terms;
    influence_weight: BCT's term. margin / temperature: `prototype_loss`.
    synthesize_new_classes: extend the frozen old classifier to the classes it never saw with
    `synthesize_classifier` (used by both BCT's influence loss and Dual-Tuning's mutual term);
    False leaves those rows out of both terms.
    """

    epochs: int = 6
    batch_size: int = 128
    lr: float = 2e-3
    seed: int = 0
    proto_weight: float = 1.0
    mutual_weight: float = 1.0
    influence_weight: float = 1.0
    margin: float = 0.2
    temperature: float = 0.1
    synthesize_new_classes: bool = True


def train_compatible(new_backbone: nn.Module, new_dim: int, old_features: np.ndarray,
                     old_classifier: nn.Module, images: np.ndarray, labels: np.ndarray,
                     val_images: np.ndarray, val_labels: np.ndarray, num_classes: int,
                     method: str = "dual-tuning", config: CompatConfig | None = None,
                     val_old_features: np.ndarray | None = None,
                     preprocess: Callable[[np.ndarray], torch.Tensor] = grey_preprocess,
                     ) -> tuple[ProjectedBackbone, nn.Module, TrainReport]:
    """Train a new model whose output lives in the old feature space.

    new_backbone: pixels -> (n, new_dim) embedding (e.g. WideCNN). old_features: (n, D_old) old
    model features of the same training `images` (rows aligned); old_classifier: the old head
    (D_old -> old classes), kept frozen (extended to the new classes by `synthesize_classifier`
    when cfg.synthesize_new_classes and it is a single linear layer). The new model is
    ProjectedBackbone(new_backbone -> D_old) with a fresh linear head (D_old -> num_classes);
    every method uses this same
    architecture, only the loss differs:
      independent: CE only;  bct: CE + influence_weight * influence_loss;
      dual-tuning: CE + proto_weight * prototype_loss(old prototypes of the new training set)
                   + mutual_weight * mutual_structural_loss.
    Epoch selection (val split only): val top-1 for "independent"; for bct / dual-tuning, when
    val_old_features (old features of val_images) is given, the val cross-model mAP
    M(new,old) with the first half of val as queries and the second half's old features as
    gallery, else val top-1. Returns (model, head, TrainReport). Cost: `train_classifier` with
    the new backbone plus O(batch C D) per step for the losses.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    cfg = config or CompatConfig()
    old_dim = old_features.shape[1]
    if len(old_features) != len(images):
        raise ValueError(f"{len(old_features)} old feature rows for {len(images)} images")
    torch.manual_seed(cfg.seed)
    model = ProjectedBackbone(new_backbone, new_dim, old_dim)
    head = nn.Linear(old_dim, num_classes)
    old_classifier = old_classifier.eval().requires_grad_(False)
    old_t = torch.as_tensor(old_features, dtype=torch.float32)
    protos = old_prototypes(old_t, labels, num_classes)
    linear = single_linear(old_classifier)
    if cfg.synthesize_new_classes and linear is not None and linear.out_features < num_classes:
        old_classifier = synthesize_classifier(linear, protos)

    def extra(rows, emb, logits, y):
        if method == "bct":
            return cfg.influence_weight * influence_loss(emb, y, old_classifier)
        if method == "dual-tuning":
            return (cfg.proto_weight * prototype_loss(emb, y, protos, cfg.margin, cfg.temperature)
                    + cfg.mutual_weight * mutual_structural_loss(emb, old_t[rows], y,
                                                                 old_classifier, head))
        return emb.sum() * 0.0

    half = len(val_images) // 2
    vq_lab, vg_lab = np.asarray(val_labels[:half]), np.asarray(val_labels[half:])

    def val_map_new_vs_old(m, h) -> float:
        """Val mAP of the new model's queries against the old val gallery (early stop)."""
        vg_old = np.asarray(val_old_features[half:], dtype=np.float32)
        qf = embed_pixels(m, preprocess, val_images[:half])
        ap, _ = average_precision_from_scores(cosine_scores(qf, vg_old), vq_lab, vg_lab)
        return float(ap.mean())

    val_fn = val_map_new_vs_old if method != "independent" and val_old_features is not None else None

    report = train_classifier(model, head, images, labels, val_images, val_labels,
                              epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                              seed=cfg.seed, preprocess=preprocess,
                              extra_loss=None if method == "independent" else extra,
                              val_fn=val_fn)
    return model, head, report
