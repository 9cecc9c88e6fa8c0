"""Vector-quantisation baseline coders, searched by asymmetric distance (ADC: float query vs code):
- `pq`     faiss ProductQuantizer, M = bits / 8 sub-quantizers of 256 centroids (8 bits each).
- `opq`    faiss OPQMatrix rotation, then the same PQ.

Scores are exact ADC: -sum_m T[q, m, code_m] with T the per-sub-space squared distance tables of
`ProductQuantizer.compute_distance_tables` (computed here in float64, see
`_AdcCoder.distance_tables`), i.e. -||q' - decode(code)||² where q' is the query in the quantizer's
space (after the OPQ rotation / zero padding).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import faiss
import numpy as np

from encoders.coders import Coder, FitReport, register
from encoders.faiss_codes import (adc_scores, check_bits, check_codes, check_features, index_from_tensor,
                                  index_to_tensor)

# PQ/OPQ encode block: faiss assigns 1024-row blocks 3-4x faster than one large call (bench/encode.py).
ENCODE_BLOCK_ROWS = 1024


@dataclass(frozen=True)
class PqConfig:
    """Product quantisation: faiss `ProductQuantizer(D', M = bits / 8, 8)`, features zero-padded to
    D' = M · ceil(D / M) when M does not divide D (exact: padded dims are 0 in queries and centroids).

    Bytes per item: bits / 8 (one byte per sub-quantizer). Fit cost: M k-means with 256 centroids,
    `niter` iterations on <= 65536 sampled train rows: O(niter · 65536 · 256 · D'); centroids take
    4 · 256 · D' bytes. Encode: O(256 · D') per item. Search: one (M, 256) table per query, then M
    lookups per item (`adc_scores`).
    """

    bits: int = 64
    niter: int = 25
    seed: int = 1234

    def __post_init__(self) -> None:
        check_bits("pq", self.bits)


@dataclass(frozen=True)
class OpqConfig:
    """OPQ (Ge et al. 2013): faiss `OPQMatrix(D, M, D')` rotation learnt jointly with a PQ for
    `opq_iters` rounds (faiss's own initial rotation seed), then a fresh PQ (as `PqConfig`, seeded by
    `seed`) trained on the rotated train set. D' = M · ceil(min(D, max_dim) / M): OPQ pads small D
    and, past `max_dim`, also reduces the dimension (faiss's `OPQ{M}_{D'}`), which keeps wide
    features (EfficientNet's 1280-d) affordable: the rotation is learnt on <= `rotation_rows` rows.

    Bytes per item: bits / 8. Fit cost: opq_iters × (4-iteration PQ training + a D'×D SVD and an
    (rotation_rows × D) @ (D × D') product), plus the final PQ's cost on <= 65536 rotated rows;
    parameters 4 · D · D' bytes more than PQ.
    Encode: O(D · D' + 256 · D') per item. Search: rotate the query, then as PQ.
    """

    bits: int = 64
    niter: int = 25
    opq_iters: int = 50
    max_dim: int = 256
    rotation_rows: int = 16384
    seed: int = 1234

    def __post_init__(self) -> None:
        check_bits("opq", self.bits)


def _train_with_gpu_assignment(index: faiss.Index, x: np.ndarray, device: str) -> None:  # pragma: no cover
    """`index.train(x)` with the PQ's k-means assigning on GPU `device` ('cuda' or 'cuda:N')."""
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexPreTransform) else index
    res, cfg = faiss.StandardGpuResources(), faiss.GpuIndexFlatConfig()
    cfg.device = int(device.partition(":")[2] or 0)
    assign = faiss.GpuIndexFlatL2(res, inner.pq.dsub, cfg)
    inner.pq.assign_index = assign
    try:
        index.train(x)
    finally:
        inner.pq.assign_index = None  # the GPU index dies with this call; the PQ must not point at it


class _AdcCoder(Coder):
    """Shared mechanics: a faiss IndexPQ (optionally behind an IndexPreTransform) encodes; search is
    exact ADC with the PQ's distance tables. Subclasses set `Config` and implement `_build_index`."""

    symmetric = False
    Config: ClassVar[type]

    def __init__(self, **config: Any) -> None:
        self.config = self.Config(**config)
        self._dim: int | None = None
        self._index: faiss.Index | None = None

    @property
    def lengths(self) -> tuple[int, ...]:
        return (self.config.bits,)

    @property
    def n_subquantizers(self) -> int:
        return self.config.bits // 8

    def _fitted(self) -> faiss.Index:
        if self._index is None:
            raise RuntimeError(f"{self.method}: call fit() (or from_state()) before encoding")
        return self._index

    def _build_index(self, d: int) -> faiss.Index:
        raise NotImplementedError

    def _new_pq_index(self, d_pq: int) -> faiss.IndexPQ:
        index = faiss.IndexPQ(d_pq, self.n_subquantizers, 8)
        index.pq.cp.niter = self.config.niter
        index.pq.cp.seed = self.config.seed
        return index

    def train_on(self, device: str) -> bool:
        """'cuda[:N]' with faiss-gpu: the final PQ's k-means assigns on that GPU (faiss's
        `ProductQuantizer.assign_index`); OPQ's rotation rounds stay on the CPU. False without
        faiss GPU support."""
        if device != "cpu" and not (hasattr(faiss, "GpuIndexFlatL2") and faiss.get_num_gpus() > 0):
            return False
        self.train_device = device
        return True

    def fit(self, train: np.ndarray, labels: np.ndarray,
            val: tuple[np.ndarray, np.ndarray] | None = None) -> FitReport:
        """Train the quantizer on `train` (n, D); `labels` and `val` are ignored.

        Needs n >= 256 (faiss k-means); faiss warns below 9984 (39 points per centroid)."""
        x = check_features(train, None, f"{self.method}.fit")
        if x.shape[0] < 256:
            raise ValueError(f"{self.method}: need at least 256 training vectors for 256 centroids "
                             f"per sub-quantizer, got {x.shape[0]}")
        t0 = time.perf_counter()
        index = self._build_index(x.shape[1])
        if self.train_device.startswith("cuda"):  # pragma: no cover - needs a GPU
            _train_with_gpu_assignment(index, x, self.train_device)
        else:
            index.train(x)
        self._index, self._dim = index, x.shape[1]
        return FitReport(fit_s=time.perf_counter() - t0)

    @property
    def pq(self) -> faiss.ProductQuantizer:
        """The trained ProductQuantizer (in the transformed space for OPQ / padding)."""
        index = self._fitted()
        inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexPreTransform) else index
        return inner.pq

    def product_quantizer(self) -> faiss.ProductQuantizer:
        """The trained ProductQuantizer (the `Coder` capability indexes use)."""
        return self.pq

    def query_space(self, queries: np.ndarray) -> np.ndarray:
        """Queries in the PQ's space (`to_pq_space`)."""
        return self.to_pq_space(queries)

    def to_pq_space(self, x: np.ndarray) -> np.ndarray:
        """(n, D) features -> (n, D') float32 in the PQ's space (OPQ rotation / zero padding)."""
        index = self._fitted()
        y = check_features(x, self._dim, f"{self.method}.to_pq_space")
        if isinstance(index, faiss.IndexPreTransform):
            for i in range(index.chain.size()):
                y = index.chain.at(i).apply(y)
        return y

    def encode(self, x: np.ndarray) -> np.ndarray:
        """(n, D) float -> (n, bits / 8) uint8, byte m = centroid index of sub-space m.

        Encodes in blocks of ENCODE_BLOCK_ROWS rows: faiss's assignment of one large call is 3-4x
        slower than the same rows in 1024-row blocks (BENCHMARKS.md section 3), same codes."""
        index = self._fitted()
        y = check_features(x, self._dim, f"{self.method}.encode")
        out = np.empty((len(y), index.sa_code_size()), dtype=np.uint8)
        for s in range(0, len(y), ENCODE_BLOCK_ROWS):
            out[s:s + ENCODE_BLOCK_ROWS] = index.sa_encode(y[s:s + ENCODE_BLOCK_ROWS])
        return out

    def centroids(self) -> np.ndarray:
        """(M, 256, D / M) float32 copy of the PQ centroids (in the PQ's space)."""
        pq = self.pq
        return faiss.vector_to_array(pq.centroids).reshape(pq.M, pq.ksub, pq.dsub)

    def distance_tables(self, queries: np.ndarray) -> np.ndarray:
        """(nq, D) queries -> (nq, M, 256) float32 squared L2 from each query sub-vector to each
        centroid, i.e. `ProductQuantizer.compute_distance_tables` computed in float64: faiss's
        float32 expansion |q|² + |c|² - 2 q·c loses ~1e-5 relative accuracy on features far from
        the origin (measured), which would blur near-ties. O(nq · 256 · D') flops, BLAS."""
        q = self.to_pq_space(queries).astype(np.float64)
        cents = self.centroids().astype(np.float64)
        M, ksub, dsub = cents.shape
        tables = np.empty((q.shape[0], M, ksub), dtype=np.float32)
        for m in range(M):
            qm = q[:, m * dsub:(m + 1) * dsub]
            cm = cents[m]
            d2 = (qm * qm).sum(1)[:, None] + (cm * cm).sum(1)[None, :] - 2.0 * (qm @ cm.T)
            tables[:, m, :] = np.maximum(d2, 0.0)
        return tables

    def scores(self, queries: np.ndarray, codes: np.ndarray, bits: int | None = None) -> np.ndarray:
        """Exact ADC: (nq, n) float32 = -||q' - decode(code)||² via lookup tables (`adc_scores`)."""
        b = bits or self.full_bits
        c = self.prefix_codes(check_codes(codes, self.bytes_per_item(), f"{self.method}.scores"), b)
        return adc_scores(self.distance_tables(queries), c)

    def state(self) -> dict[str, Any]:
        return {"method": self.method, "config": dataclasses.asdict(self.config),
                "dim": int(self._dim or 0), "index": index_to_tensor(self._fitted())}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "_AdcCoder":
        if state.get("method") != cls.method:
            raise ValueError(f"{cls.method}.from_state: state is for method {state.get('method')!r}")
        coder = cls(**state["config"])
        coder._dim = int(state["dim"])
        coder._index = index_from_tensor(state["index"])
        return coder


def _padded_dim(d: int, m: int) -> int:
    return m * -(-d // m)


@register("pq")
class PqCoder(_AdcCoder):
    """Product quantisation with exact ADC search (see `PqConfig`)."""

    Config = PqConfig
    config: PqConfig

    def _build_index(self, d: int) -> faiss.Index:
        d_pq = _padded_dim(d, self.n_subquantizers)
        index = self._new_pq_index(d_pq)
        if d_pq == d:
            return index
        pad = faiss.RemapDimensionsTransform(d, d_pq, False)  # identity on the first d dims, zeros after
        return faiss.IndexPreTransform(pad, index)


@register("opq")
class OpqCoder(_AdcCoder):
    """Optimised product quantisation with exact ADC search (see `OpqConfig`)."""

    Config = OpqConfig
    config: OpqConfig

    def _build_index(self, d: int) -> faiss.Index:
        m = self.n_subquantizers
        d_pq = _padded_dim(min(d, self.config.max_dim), m)
        opq = faiss.OPQMatrix(d, m, d_pq)
        opq.niter = self.config.opq_iters
        opq.max_train_points = self.config.rotation_rows
        return faiss.IndexPreTransform(opq, self._new_pq_index(d_pq))


# --------------------------------------------------------------------------------------------------
