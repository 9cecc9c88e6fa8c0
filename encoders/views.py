"""Ceiling and isolation rows (issue #16): coders built on another coder's float space.

- `CosineView(float_coder)`: exact cosine on L2-normalised features (the fair float ceiling; the
  "float" row is L2 on raw ReLU features, while ITQ normalises inside).
- `EmbeddingCoder(learned)`: a learned coder's own float embedding, exact cosine (its ceiling).
- `quantised_embedding(learned, "pq" | "rq", bits)`: plain faiss PQ, or plain residual quantisation
  with per-level k-means codebooks, of the SAME supervised embedding: what DRQ's recurrent
  quantiser (one shared codebook + scalars, trained jointly) adds over a plain quantiser.

All are `Coder`s (float codes or uint8 codes, asymmetric scores); no I/O.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np

from encoders.coders import Coder, FitReport, make_coder


class _FloatView(Coder):
    """Float32 vectors (transform(x)) as codes; cosine scores (inputs are unit vectors)."""

    symmetric = False
    method = "float-view"

    def __init__(self) -> None:
        self._dim: int | None = None

    def transform(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    @property
    def lengths(self) -> tuple[int, ...]:
        return (32 * (self._dim or 0),)

    def fit(self, train, labels, val=None) -> FitReport:
        self._dim = self.transform(train[:1]).shape[1]
        return FitReport(fit_s=0.0)

    def encode(self, x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(self.transform(x), dtype=np.float32).view(np.uint8)

    def embed(self, x: np.ndarray) -> np.ndarray:
        return self.transform(x)

    def scores(self, queries, codes, bits=None) -> np.ndarray:
        g = np.ascontiguousarray(codes).view(np.float32)
        return self.transform(queries) @ g.T

    def state(self) -> dict[str, Any]:
        raise NotImplementedError("evaluation-only view: not registered")

    @classmethod
    def from_state(cls, state):
        raise NotImplementedError("evaluation-only view")


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class CosineView(_FloatView):
    """Exact cosine on the raw features (`base` is the fitted float coder; only its D is used)."""

    def __init__(self, base: Coder | None = None) -> None:
        super().__init__()

    def transform(self, x: np.ndarray) -> np.ndarray:
        return _unit(x)


class EmbeddingCoder(_FloatView):
    """A learned coder's float embedding (`base.embed`), unit-normalised, exact cosine."""

    def __init__(self, base: Any) -> None:
        super().__init__()
        if not hasattr(base, "embed"):
            raise ValueError(f"{base.method} has no float embedding to evaluate")
        self.base = base

    def transform(self, x: np.ndarray) -> np.ndarray:
        return _unit(self.base.embed(x))


class RQCoder(Coder):
    """Plain residual quantisation (faiss ResidualQuantizer, beam 1: greedy, per-level k-means
    codebooks, 256 words per level) of unit vectors; score -||q - x_hat||^2. bits = 8 x levels."""

    symmetric = False
    method = "rq"

    def __init__(self, bits: int = 64, seed: int = 0) -> None:
        if bits % 8 or bits <= 0:
            raise ValueError(f"rq: bits must be a positive multiple of 8, got {bits}")
        self.bits, self.seed, self.rq = bits, seed, None

    @property
    def lengths(self) -> tuple[int, ...]:
        return (self.bits,)

    def fit(self, train, labels=None, val=None) -> FitReport:
        import faiss

        t0 = time.perf_counter()
        x = np.ascontiguousarray(train, dtype=np.float32)
        self.rq = faiss.ResidualQuantizer(x.shape[1], self.bits // 8, 8)
        self.rq.max_beam_size = 1
        self.rq.train(x)
        return FitReport(fit_s=time.perf_counter() - t0)

    def encode(self, x: np.ndarray) -> np.ndarray:
        return self.rq.compute_codes(np.ascontiguousarray(x, dtype=np.float32))

    def scores(self, queries, codes, bits=None) -> np.ndarray:
        xh = self.rq.decode(np.ascontiguousarray(codes))
        q = np.asarray(queries, dtype=np.float32)
        return 2 * q @ xh.T - (xh * xh).sum(1)[None, :] - (q * q).sum(1)[:, None]

    def state(self) -> dict[str, Any]:
        raise NotImplementedError("evaluation-only coder")

    @classmethod
    def from_state(cls, state):
        raise NotImplementedError("evaluation-only coder")


class QuantisedEmbedding(Coder):
    """`inner` (PQ or RQ) fitted on `base`'s unit embedding; queries embedded, asymmetric scores."""

    symmetric = False

    def __init__(self, base: Any, inner: Coder, name: str) -> None:
        self.base, self.inner, self.method = base, inner, name

    @property
    def lengths(self) -> tuple[int, ...]:
        return self.inner.lengths

    def embed(self, x: np.ndarray) -> np.ndarray:
        return _unit(self.base.embed(x))

    def fit(self, train, labels=None, val=None) -> FitReport:
        return self.inner.fit(self.embed(train), labels)

    def encode(self, x):
        return self.inner.encode(self.embed(x))

    def scores(self, queries, codes, bits=None):
        return self.inner.scores(self.embed(queries), codes, bits)

    def bytes_per_item(self, bits=None):
        return self.inner.bytes_per_item(bits)

    def state(self):
        raise NotImplementedError("evaluation-only coder")

    @classmethod
    def from_state(cls, state):
        raise NotImplementedError("evaluation-only coder")


def quantised_embedding(base: Any, kind: str, bits: int, seed: int = 0) -> QuantisedEmbedding:
    """PQ ('pq') or residual ('rq') quantiser at `bits` over a fitted learned coder's embedding."""
    if kind == "pq":
        inner = make_coder("pq", bits=bits, seed=1234 + seed)
    elif kind == "rq":
        inner = RQCoder(bits=bits, seed=seed)
    else:
        raise ValueError(f"kind must be 'pq' or 'rq', got {kind!r}")
    return QuantisedEmbedding(base, inner, f"{base.method}-emb+{kind}")
