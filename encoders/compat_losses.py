"""Dual-Tuning and BCT losses (METHODS.md, "Dual-Tuning"), computed in the old feature space, and the
projected new model (`ProjectedBackbone`: a wider new embedding mapped to the old dimension).
Pure torch, no I/O."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call


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


def single_linear(module: nn.Module) -> nn.Linear | None:
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
