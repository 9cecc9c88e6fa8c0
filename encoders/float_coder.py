"""The accuracy ceiling `float`: the raw float32 features as bytes, exact squared-L2 search."""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np
import torch

from encoders.coders import Coder, FitReport, register
from encoders.faiss_codes import check_codes, check_features


@dataclass(frozen=True)
class FloatConfig:
    """The ceiling: codes are the raw float32 features (bytes per item 4 · D, `lengths == (32 · D,)`),
    scores are minus the squared L2 distance (float32 BLAS after shifting by the train mean).

    `bits` and `seed` are accepted and ignored so that every coder can be built with the same
    keywords (`make_coder(m, bits=L, seed=s)`); the code length is always 32 · D. Fit cost: O(n · D) (records D and
    the train mean).
    Search: O(D) per pair (BLAS via `faiss.pairwise_distances`).
    """

    bits: int | None = None
    seed: int = 0


@register("float")
class FloatCoder(Coder):
    """Raw float32 features as the code; exact squared-L2 search (see `FloatConfig`)."""

    symmetric = False
    Config = FloatConfig
    config: FloatConfig

    def __init__(self, **config: Any) -> None:
        self.config = FloatConfig(**config)
        self._dim: int | None = None
        self._mean: np.ndarray | None = None  # train mean: a shift that keeps the expansion accurate

    def _fitted_dim(self) -> int:
        if self._dim is None:
            raise RuntimeError("float: call fit() (or from_state()) first; the code length is 32 · D")
        return self._dim

    @property
    def lengths(self) -> tuple[int, ...]:
        return (32 * self._fitted_dim(),)

    def fit(self, train: np.ndarray, labels: np.ndarray,
            val: tuple[np.ndarray, np.ndarray] | None = None) -> FitReport:
        """Record D and the train mean (used only to shift both sides before distance computation,
        which leaves distances unchanged but avoids float32 cancellation). O(n · D)."""
        t0 = time.perf_counter()
        x = check_features(train, None, "float.fit")
        self._dim = x.shape[1]
        self._mean = x.mean(axis=0, dtype=np.float64).astype(np.float32)
        return FitReport(fit_s=time.perf_counter() - t0)

    def encode(self, x: np.ndarray) -> np.ndarray:
        """(n, D) float -> (n, 4 · D) uint8: the float32 bytes (native byte order)."""
        # Copy: a float32 input would otherwise be aliased by its "codes".
        return check_features(x, self._fitted_dim(), "float.encode").view(np.uint8).copy()

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """(n, 4 · D) uint8 -> (n, D) float32, bit-exact inverse of `encode`."""
        return check_codes(codes, self.bytes_per_item(), "float.decode").view(np.float32)

    def scores(self, queries: np.ndarray, codes: np.ndarray, bits: int | None = None) -> np.ndarray:
        """(nq, n) float32 = -||q - x||² (faiss.pairwise_distances, BLAS, both sides shifted by the
        train mean). O(nq · n · D) flops; copies the database once (4 · n · D bytes)."""
        b = bits or self.full_bits
        c = self.prefix_codes(check_codes(codes, self.bytes_per_item(), "float.scores"), b)
        q = check_features(queries, self._fitted_dim(), "float.scores")
        assert self._mean is not None
        return -faiss.pairwise_distances(q - self._mean, self.decode(c) - self._mean)

    def state(self) -> dict[str, Any]:
        assert self._mean is not None
        return {"method": self.method, "config": dataclasses.asdict(self.config),
                "dim": self._fitted_dim(), "mean": torch.from_numpy(self._mean.copy())}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "FloatCoder":
        if state.get("method") != cls.method:
            raise ValueError(f"float.from_state: state is for method {state.get('method')!r}")
        coder = cls(**state["config"])
        coder._dim = int(state["dim"])
        coder._mean = state["mean"].numpy().astype(np.float32)
        return coder
