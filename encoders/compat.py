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

`compat_matrix` measures M(old,old), M(new,new) and M(new query, old gallery) (mAP@all and top-1,
both tie-aware) on float features, `code_compat_matrix` the same on a coder's codes, the update gain and the negative-flip rate; `CompatReport.gate()` is the ship
rule. Pure torch/numpy, no I/O.

mAP and top-1 come from `encoders/metrics.py` (tie-aware: the exact expected value over orders of
tied scores), per query, because the negative-flip rate needs per-query top-1.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from encoders import metrics
from encoders.backbones import embed_pixels, grey_preprocess
from encoders.training import TrainReport, train_classifier

LOG = logging.getLogger(__name__)

METHODS = ("independent", "bct", "dual-tuning")

# Default bound on the negative-flip rate (NFR: the fraction of ALL queries that are right at top-1
# under M(old,old) and wrong under M(new,old), the definition of Yan et al., "Positive-congruent
# training", CVPR 2021). A model that raises mAP while breaking more than a quarter of the answers
# users had is refused. The measured figures (BENCHMARKS.md section 7: Dual-Tuning ~0.20, BCT ~0.24-0.27,
# independent ~0.76 on the 5 -> 10 class Fashion-MNIST update) are far above the 2-5 % the
# literature reports for same-class ImageNet updates; a tighter bound refuses every method here.
DEFAULT_MAX_FLIP_RATE = 0.25


# --------------------------------------------------------------------------------------------
# losses

def old_prototypes(old_features: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor,
                   num_classes: int) -> torch.Tensor:
    """Per-class mean of the OLD model's features over the NEW training set: (num_classes, D).

    Classes the old model never saw get their prototype from old features too (that is the
    point: it fixes where those classes live in the old space). Raises if a class in
    0..num_classes-1 has no row. Cost O(n D).
    """
    f = torch.as_tensor(np.asarray(old_features) if not torch.is_tensor(old_features)
                        else old_features).float()
    y = torch.as_tensor(np.asarray(labels) if not torch.is_tensor(labels) else labels).long()
    if f.ndim != 2 or len(f) != len(y):
        raise ValueError(f"old_features {tuple(f.shape)} and labels {tuple(y.shape)} do not match")
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"labels must be in 0..{num_classes - 1}")
    counts = torch.bincount(y, minlength=num_classes)
    if (counts == 0).any():
        missing = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(f"classes {missing} have no rows in the new training set; "
                         f"their prototypes would be undefined")
    sums = torch.zeros(num_classes, f.shape[1]).index_add_(0, y, f)
    return sums / counts[:, None].float()


def prototype_loss(new_feats: torch.Tensor, labels: torch.Tensor, prototypes: torch.Tensor,
                   margin: float = 0.2, temperature: float = 0.1,
                   normalize: bool = True) -> torch.Tensor:
    """Hinged prototype loss, mean over the batch.

    For feature x with label y and Euclidean distances d_c = ||x - p_c||:
        loss = max(0, d_y - sum_{c != y} w_c d_c + margin),  w = softmax_{c != y}(-d_c / temperature)
    so the nearest wrong prototypes weigh most. The weights are detached (they choose which
    negatives count; the gradient goes through the distances), prototypes are constants.
    Zero when every feature is at least `margin` closer to its own prototype than to the
    weighted others. normalize=True (default) measures distances between L2-normalised
    features and prototypes (range 0..2), matching cosine retrieval and making `margin` and
    `temperature` independent of the old features' scale. Cost O(n C D).
    """
    protos = prototypes.detach().to(new_feats.dtype)
    if normalize:
        new_feats, protos = F.normalize(new_feats, dim=1), F.normalize(protos, dim=1)
    d = torch.cdist(new_feats, protos)  # (n, C)
    own = d.gather(1, labels[:, None]).squeeze(1)
    others = d.masked_fill(F.one_hot(labels, protos.shape[0]).bool(), float("inf"))
    w = torch.softmax(-others.detach() / temperature, dim=1)  # inf -> weight 0 on own class
    neg = (w * others.masked_fill(torch.isinf(others), 0.0)).sum(1)
    return F.relu(own - neg + margin).mean()


def _frozen_call(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """module(x) with its parameters detached: gradients reach x, never the module."""
    params = {k: v.detach() for k, v in module.named_parameters()}
    return functional_call(module, params, (x,))


def _known_rows(labels: torch.Tensor, classifier_out: int) -> torch.Tensor:
    return labels < classifier_out


def _masked_ce(logits: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    # Mean over the kept rows, scaled by their fraction so batches with few known rows weigh less.
    if not keep.any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits[keep], labels[keep]) * keep.float().mean()


def influence_loss(new_feats: torch.Tensor, labels: torch.Tensor,
                   old_classifier: nn.Module) -> torch.Tensor:
    """BCT's influence loss: cross-entropy of new features through the frozen old classifier.

    Rows whose class the old classifier does not have (label >= its output size) are left out;
    pass `synthesize_classifier(...)` as old_classifier to cover them as BCT does.
    Gradients flow to `new_feats` only.
    """
    out = _frozen_call(old_classifier, new_feats)
    return _masked_ce(out, labels, _known_rows(labels, out.shape[1]))


def mutual_structural_loss(new_feats: torch.Tensor, old_feats: torch.Tensor, labels: torch.Tensor,
                           old_classifier: nn.Module, new_classifier: nn.Module) -> torch.Tensor:
    """CE(old_classifier(new_feats)) + CE(new_classifier(old_feats)).

    The old classifier is frozen (gradients reach new_feats only; rows of classes it lacks are
    left out of that term); old_feats are constants, so the second term trains the new
    classifier to read the old space too. Both feature sets are in the old dimension.
    """
    old_out = _frozen_call(old_classifier, new_feats)
    a = _masked_ce(old_out, labels, _known_rows(labels, old_out.shape[1]))
    b = F.cross_entropy(new_classifier(old_feats.detach()), labels)
    return a + b


def synthesize_classifier(old_classifier: nn.Linear, prototypes: torch.Tensor) -> nn.Linear:
    """The old classifier extended to every class of the new training set (BCT's synthesised
    classifier): rows of classes the old model knew are copied; a new class c gets the direction
    of its old-feature prototype p_c scaled to the mean norm of the old rows, and the mean old
    bias. Returns a frozen nn.Linear(D_old, len(prototypes)). Cost O(C D).
    """
    w, b = old_classifier.weight.detach(), old_classifier.bias
    k, c = w.shape[0], prototypes.shape[0]
    if prototypes.shape[1] != w.shape[1] or c < k:
        raise ValueError(f"prototypes {tuple(prototypes.shape)} do not extend a classifier {tuple(w.shape)}")
    out = nn.Linear(w.shape[1], c, bias=b is not None)
    with torch.no_grad():
        out.weight[:k] = w
        out.weight[k:] = F.normalize(prototypes[k:].float(), dim=1) * w.norm(dim=1).mean()
        if b is not None:
            out.bias[:k] = b.detach()
            out.bias[k:] = b.detach().mean()
    return out.requires_grad_(False)


def _single_linear(module: nn.Module) -> nn.Linear | None:
    """The module's only nn.Linear when that is all it is (nn.Linear, ClassifierHead), else None."""
    lin = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if len(lin) != 1 or sum(p.numel() for p in module.parameters()) != sum(p.numel() for p in lin[0].parameters()):
        return None
    return lin[0]


class Projection(nn.Module):
    """Linear map from a wider new embedding (in_dim) to the old feature space (out_dim)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class ProjectedBackbone(nn.Module):
    """backbone followed by a Projection: the new model as deployed (its output is in the old space)."""

    def __init__(self, backbone: nn.Module, in_dim: int, out_dim: int):
        super().__init__()
        self.backbone = backbone
        self.projection = Projection(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(self.backbone(x))


# --------------------------------------------------------------------------------------------
# evaluation

def cosine_scores(q: np.ndarray, g: np.ndarray) -> np.ndarray:
    """(nq, ng) cosine similarity, higher is closer."""
    qn = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    gn = g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)
    return (qn @ gn.T).astype(np.float32)


def average_precision_from_scores(scores: np.ndarray, q_labels: np.ndarray,
                                  g_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Tie-aware AP@all and top-1 of each query from a (nq, ng) score matrix (higher = closer),
    relevance = same label, via `encoders.metrics` (exact expectation over orders of tied
    scores; top-1 = expected P@1). Returns (ap (nq,), top1 (nq,)) float64; a query with no
    relevant item scores 0. Cost O(nq ng log ng); ~32 B of temporaries per (query, item).
    """
    scores = np.asarray(scores)
    rel = np.asarray(q_labels).reshape(-1, 1) == np.asarray(g_labels).reshape(1, -1)
    blocks = metrics.tie_blocks(scores, rel)
    return metrics.ap_from_blocks(blocks), metrics.hits_from_blocks(blocks, 1)


CELLS = (("old", "old"), ("new", "new"), ("new", "old"))


def _cell(q: str, g: str) -> str:
    return f"M({q},{g})"


@dataclass
class CompatReport:
    """Compatibility matrix of one model update, on one query set and gallery.

    map / top1: {"M(old,old)": ..., "M(new,new)": ..., "M(new,old)": ...} (query model, gallery
    model). update_gain (mAP) = [M(new,old) - M(old,old)] / [M(new,new) - M(old,old)], nan when
    the denominator is 0. negative_flip_rate: fraction of queries right at top-1 under old/old
    and wrong under new/old (tie-aware: mean of p_old_old * (1 - p_new_old)).
    max_negative_flip_rate: the gate also refuses a model whose negative flip rate is above it
    (mAP can rise while single queries users relied on break); DEFAULT_MAX_FLIP_RATE unless set,
    None switches the bound off.
    """

    map: dict[str, float]
    top1: dict[str, float]
    negative_flip_rate: float
    n_queries: int
    n_gallery: int
    extra: dict[str, float] = field(default_factory=dict)
    max_negative_flip_rate: float | None = DEFAULT_MAX_FLIP_RATE

    @staticmethod
    def _gain(m: dict[str, float]) -> float:
        den = m["M(new,new)"] - m["M(old,old)"]
        return float("nan") if den == 0 else (m["M(new,old)"] - m["M(old,old)"]) / den

    @property
    def update_gain(self) -> float:
        return self._gain(self.map)

    @property
    def update_gain_top1(self) -> float:
        return self._gain(self.top1)

    def gate(self) -> tuple[bool, str]:
        """Ship rule on mAP: M(new,old) > M(old,old) and M(new,new) > M(old,old), and, when
        `max_negative_flip_rate` is set, negative flips <= it. Returns (passed, reason); the
        reason names every failing condition with its numbers."""
        m = self.map
        oo = m["M(old,old)"]
        fails, oks = [], []
        for cell in ("M(new,old)", "M(new,new)"):
            (oks if m[cell] > oo else fails).append(
                f"{cell}={m[cell]:.4f} {'>' if m[cell] > oo else '<='} M(old,old)={oo:.4f}")
        bound = self.max_negative_flip_rate
        if bound is not None:
            ok = self.negative_flip_rate <= bound
            (oks if ok else fails).append(
                f"negative flips {self.negative_flip_rate:.4f} {'<=' if ok else '>'} {bound:.4f}")
        if fails:
            return False, "gate failed: " + "; ".join(fails)
        return True, "gate passed: " + "; ".join(oks)

    def as_dict(self) -> dict:
        passed, reason = self.gate()
        return {"map": dict(self.map), "top1": dict(self.top1), "update_gain": self.update_gain,
                "update_gain_top1": self.update_gain_top1,
                "negative_flip_rate": self.negative_flip_rate,
                "max_negative_flip_rate": self.max_negative_flip_rate, "gate_passed": passed,
                "gate_reason": reason, "n_queries": self.n_queries, "n_gallery": self.n_gallery,
                **self.extra}

    def table(self) -> str:
        rows = [f"{'cell':<12}{'mAP':>8}{'top-1':>8}"]
        for q, g in CELLS:
            c = _cell(q, g)
            rows.append(f"{c:<12}{self.map[c]:>8.4f}{self.top1[c]:>8.4f}")
        rows.append(f"update gain {self.update_gain:.3f} (top-1 {self.update_gain_top1:.3f}), "
                    f"negative flips {self.negative_flip_rate:.4f}")
        return "\n".join(rows)


@dataclass(frozen=True)
class GateDecision:
    """The decision record of one model update: decided on `split` (val), never on query.

    passed / reason: `CompatReport.gate()` of the val matrix; map / negative_flip_rate /
    max_negative_flip_rate: the numbers it decided on; n_queries / n_gallery: the val sizes."""

    passed: bool
    reason: str
    split: str
    map: dict[str, float]
    top1: dict[str, float]
    negative_flip_rate: float
    max_negative_flip_rate: float | None
    update_gain: float
    n_queries: int
    n_gallery: int

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def decide_gate(report: CompatReport, split: str, max_negative_flip_rate: float | None = DEFAULT_MAX_FLIP_RATE
                ) -> GateDecision:
    """Apply the ship rule to a matrix measured on `split`; refuses to decide on 'query'."""
    if split == "query":
        raise ValueError("the gate decides on val (train/val rows only), never on the query split")
    report.max_negative_flip_rate = max_negative_flip_rate
    passed, reason = report.gate()
    return GateDecision(passed, reason, split, dict(report.map), dict(report.top1), report.negative_flip_rate,
                        max_negative_flip_rate, report.update_gain, report.n_queries, report.n_gallery)


def compat_matrix(query_feats: dict[str, np.ndarray], gallery_feats: dict[str, np.ndarray],
                  q_labels: np.ndarray, g_labels: np.ndarray,
                  score_fn: Callable[[np.ndarray, np.ndarray], np.ndarray] = cosine_scores,
                  chunk: int = 64) -> CompatReport:
    """Fill M(old,old), M(new,new), M(new,old) for mAP@all and top-1.

    query_feats / gallery_feats: {"old": (n, D_old), "new": (n, D_new)} features of the same
    query rows / gallery rows by each model; "new" query features used against the old gallery
    must be in the old space (project first). score_fn(q, g) -> (nq, ng), higher = closer; it is
    called on `chunk` queries at a time. Cost: 3 x O(nq ng (D + log ng)); memory ~32 B x chunk
    x ng; ~10-20 s for 1,000 x 69,000 on 2 shared cores.
    """
    _check_cells(query_feats, gallery_feats)
    if query_feats["new"].shape[1] != gallery_feats["old"].shape[1]:
        raise ValueError(f"new query dim {query_feats['new'].shape[1]} != old gallery dim "
                         f"{gallery_feats['old'].shape[1]}: project the new features first")
    return _fill_matrix(query_feats, gallery_feats, q_labels, g_labels, score_fn, chunk)


def code_compat_matrix(coder, bits: int, query_feats: dict[str, np.ndarray],
                       gallery_codes: dict[str, np.ndarray], q_labels: np.ndarray,
                       g_labels: np.ndarray, chunk: int = 64) -> CompatReport:
    """The same matrix on compact codes (METHODS.md: "report the same matrix on codes").

    coder: a fitted `encoders.coders.Coder`, trained on OLD features (the stored codes' coder).
    query_feats: {"old", "new"} float query features (the new ones in the old space);
    gallery_codes: {"old", "new"} full-length codes of the gallery made by `coder.encode` from
    old / new gallery features. Scores are `coder.scores(queries, codes, bits)` (Hamming for
    symmetric coders, asymmetric tables otherwise), so ties are scored tie-aware.
    `extra` carries {"bits": bits}. Cost: 3 x (encode/score nq x ng at `bits`).
    """
    _check_cells(query_feats, gallery_codes)
    if bits not in coder.lengths:
        raise ValueError(f"{bits} bits not in the coder's lengths {coder.lengths}")
    rep = _fill_matrix(query_feats, gallery_codes, q_labels, g_labels,
                       lambda q, g: coder.scores(q, g, bits), chunk)
    rep.extra["bits"] = bits
    return rep


def _check_cells(query: dict, gallery: dict) -> None:
    for name, d in (("query", query), ("gallery", gallery)):
        if not {"old", "new"} <= set(d):
            raise ValueError(f"{name} needs keys 'old' and 'new', got {sorted(d)}")


def _fill_matrix(query: dict[str, np.ndarray], gallery: dict[str, np.ndarray],
                 q_labels: np.ndarray, g_labels: np.ndarray,
                 score_fn: Callable[[np.ndarray, np.ndarray], np.ndarray], chunk: int) -> CompatReport:
    maps, top1s, per_q = {}, {}, {}
    q_labels, g_labels = np.asarray(q_labels), np.asarray(g_labels)
    for q, g in CELLS:
        aps, t1s = [], []
        for s in range(0, len(q_labels), chunk):  # bounded memory: chunk x ng scores at a time
            ap, t1 = average_precision_from_scores(
                score_fn(query[q][s:s + chunk], gallery[g]), q_labels[s:s + chunk], g_labels)
            aps.append(ap)
            t1s.append(t1)
        ap, t1 = np.concatenate(aps), np.concatenate(t1s)
        maps[_cell(q, g)], top1s[_cell(q, g)], per_q[(q, g)] = float(ap.mean()), float(t1.mean()), t1
    nfr = float(np.mean(per_q[("old", "old")] * (1.0 - per_q[("new", "old")])))
    return CompatReport(maps, top1s, nfr, len(q_labels), len(g_labels))


# --------------------------------------------------------------------------------------------
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
    linear = _single_linear(old_classifier)
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

    val_fn = None
    if method != "independent" and val_old_features is not None:
        half = len(val_images) // 2
        vq_lab, vg_lab = np.asarray(val_labels[:half]), np.asarray(val_labels[half:])
        vg_old = np.asarray(val_old_features[half:], dtype=np.float32)

        def val_fn(m, h):
            qf = embed_pixels(m, preprocess, val_images[:half])
            ap, _ = average_precision_from_scores(cosine_scores(qf, vg_old), vq_lab, vg_lab)
            return float(ap.mean())

    report = train_classifier(model, head, images, labels, val_images, val_labels,
                              epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                              seed=cfg.seed, preprocess=preprocess,
                              extra_loss=None if method == "independent" else extra,
                              val_fn=val_fn)
    return model, head, report
