"""The seeded synthetic data every test draws from (as faiss's contrib/datasets.py SyntheticDataset):
clustered float features with class labels. Same arguments, same arrays."""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class SyntheticDataset:
    """Clustered features: class centres in a random `rank`-dim subspace of R^d plus noise, offset
    from the origin (like post-ReLU features). Splits train / database / query, with labels."""

    d: int = 64
    nt: int = 4000
    nb: int = 2000
    nq: int = 100
    classes: int = 10
    rank: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.seed)
        basis = np.linalg.qr(rng.standard_normal((self.d, self.rank)))[0]
        centres = 2.0 * rng.standard_normal((self.classes, self.rank)) @ basis.T + 3.0
        n = self.nt + self.nb + self.nq
        labels = rng.integers(0, self.classes, n)
        x = (centres[labels] + rng.standard_normal((n, self.rank)) @ basis.T
             + 0.3 * rng.standard_normal((n, self.d))).astype(np.float32)
        object.__setattr__(self, "x", x)
        object.__setattr__(self, "labels", labels)

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        bounds = {"train": (0, self.nt), "database": (self.nt, self.nt + self.nb),
                  "query": (self.nt + self.nb, self.nt + self.nb + self.nq)}
        a, b = bounds[name]
        return self.x[a:b], self.labels[a:b]  # type: ignore[attr-defined]


def blob_centres(n_classes: int, d: int, scale: float, seed: int = 123) -> np.ndarray:
    """(n_classes, d) class centres drawn N(0, scale²)."""
    return np.random.default_rng(seed).normal(scale=scale, size=(n_classes, d))


def blobs(centres: np.ndarray, n_per: int, seed: int = 0, shuffle: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """`n_per` rows per centre, each its centre plus N(0, 1) noise: (x float32 (n, d), labels int64
    (n,), the centre's index), in class order or shuffled."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(len(centres)), n_per)
    x = centres[y] + rng.normal(size=(len(y), centres.shape[1]))
    if shuffle:
        perm = rng.permutation(len(y))
        x, y = x[perm], y[perm]
    return x.astype(np.float32), y.astype(np.int64)
