"""Training-free baseline coders (METHODS.md, "Baselines and ceilings"), all built on faiss.

Binary codes, searched by symmetric Hamming distance (`encoders.metrics.hamming_scores`):
- `lsh`    centre on the train mean, random orthogonal projection to `bits` dims, sign.
- `pca-rr` PCA to `bits` dims, random rotation, sign.
- `itq`    faiss ITQTransform: centre, L2-normalise, PCA to `bits` dims, ITQ rotation, sign.

Vector-quantisation codes, searched by asymmetric distance (ADC: float query vs stored code):
- `pq`     faiss ProductQuantizer, M = bits / 8 sub-quantizers of 256 centroids (8 bits each).
- `opq`    faiss OPQMatrix rotation, then the same PQ.
- `float`  the raw float32 features as bytes (the accuracy ceiling).

Similarity for `pq`, `opq` and `float` is minus the squared L2 distance on the features as given;
callers who want cosine similarity L2-normalise the features before `fit`/`encode`/`scores`.
`pq`/`opq` scores are exact ADC: -sum_m T[q, m, code_m] with T the per-sub-space squared distance
tables of `ProductQuantizer.compute_distance_tables` (computed here in float64, see
`_AdcCoder.distance_tables`), i.e. -||q' - decode(code)||² where q' is the query in the quantizer's
space (after the OPQ rotation / zero padding).

Binary layout: bit j of a code is `projection_j > 0`, stored in byte j // 8 at bit j % 8 (LSB first),
the layout of `faiss.IndexLSH` and `faiss.IndexBinaryFlat`.

Every config requires `bits` to be a positive multiple of 8 (the shortest length in the reports is 8).
`state()` holds faiss objects serialised to uint8 torch tensors, so `torch.save` +
`torch.load(weights_only=True)` round-trips it (numpy arrays are refused by weights_only loading).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import faiss
import numpy as np
import torch

from encoders.coders import Coder, FitReport, register
from encoders.metrics import hamming_scores, hamming_topk

LOG = logging.getLogger(__name__)
# PQ/OPQ encode block: faiss assigns 1024-row blocks 3-4x faster than one large call (bench/encode.py).
ENCODE_BLOCK_ROWS = 1024

__all__ = [
    "LshConfig", "PcaRrConfig", "ItqConfig", "PqConfig", "OpqConfig", "FloatConfig",
    "LshCoder", "PcaRrCoder", "ItqCoder", "PqCoder", "OpqCoder", "FloatCoder",
    "pack_signs", "adc_scores", "hamming_scores",
]


# --------------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------------

def _features(x: np.ndarray, dim: int | None, what: str) -> np.ndarray:
    """Validate (n, D) features; return them as C-contiguous float32 (copy only if needed)."""
    a = np.asarray(x)
    if a.ndim != 2 or a.shape[1] == 0:
        raise ValueError(f"{what}: expected (n, D) features, got shape {a.shape}")
    if dim is not None and a.shape[1] != dim:
        raise ValueError(f"{what}: features have D={a.shape[1]}, but this coder was fitted on D={dim}")
    if not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"{what}: features must be floating point, got {a.dtype}")
    return np.ascontiguousarray(a, dtype=np.float32)


def _check_codes(codes: np.ndarray, nbytes: int, what: str) -> np.ndarray:
    c = np.asarray(codes)
    if c.ndim != 2 or c.dtype != np.uint8 or c.shape[1] != nbytes:
        raise ValueError(f"{what}: expected (n, {nbytes}) uint8 codes, got {c.shape} {c.dtype}")
    return np.ascontiguousarray(c)


def _check_bits(method: str, bits: int) -> None:
    if not isinstance(bits, int) or bits <= 0 or bits % 8:
        raise ValueError(f"{method}: bits must be a positive multiple of 8, got {bits!r}")


def _vt_to_tensor(vt: faiss.VectorTransform) -> torch.Tensor:
    writer = faiss.VectorIOWriter()
    faiss.write_VectorTransform(vt, writer)
    return torch.from_numpy(faiss.vector_to_array(writer.data).copy())


def _vt_from_tensor(t: torch.Tensor) -> faiss.VectorTransform:
    reader = faiss.VectorIOReader()
    faiss.copy_array_to_vector(np.ascontiguousarray(t.numpy(), dtype=np.uint8), reader.data)
    return faiss.read_VectorTransform(reader)


def _index_to_tensor(index: faiss.Index) -> torch.Tensor:
    return torch.from_numpy(faiss.serialize_index(index).copy())


def _index_from_tensor(t: torch.Tensor) -> faiss.Index:
    return faiss.deserialize_index(np.ascontiguousarray(t.numpy(), dtype=np.uint8))


def pack_signs(projected: np.ndarray) -> np.ndarray:
    """(n, bits) float -> (n, ceil(bits/8)) uint8: bit j = projected[:, j] > 0, faiss layout
    (byte j // 8, bit j % 8, LSB first; same bytes as faiss.IndexLSH). O(n · bits)."""
    return np.packbits(np.asarray(projected) > 0, axis=1, bitorder="little")


def adc_scores(tables: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Exact asymmetric-distance scores from per-query lookup tables.

    Args:
        tables: (nq, M, K) float32, tables[q, m, k] = distance contribution of code value k in
            sub-space m for query q (for PQ: squared L2 between query sub-vector and centroid).
        codes: (n, M) uint8 (K <= 256), one byte per sub-quantizer.

    Returns:
        (nq, n) float32, -sum_m tables[q, m, codes[i, m]], summed in order m = 0..M-1 in float32.

    Cost: nq · n · M table lookups (a gather from an L1-resident table row); ~0.5 s for
    1000 × 70000 × M=8 on one core. Output memory 4 · nq · n bytes.
    """
    t = np.asarray(tables, dtype=np.float32)
    c = np.asarray(codes)
    if t.ndim != 3 or c.ndim != 2 or c.shape[1] != t.shape[1]:
        raise ValueError(f"adc_scores: need tables (nq, M, K) and codes (n, M), got {t.shape} and "
                         f"{c.shape}")
    nq, M, _ = t.shape
    idx = [np.ascontiguousarray(c[:, m], dtype=np.intp) for m in range(M)]
    out = np.empty((nq, c.shape[0]), dtype=np.float32)
    step = 64  # rows per block: keeps the accumulator block in cache while we sweep the M columns
    for i in range(0, nq, step):
        tc = t[i:i + step]
        acc = np.take(tc[:, 0, :], idx[0], axis=1)
        for m in range(1, M):
            acc += np.take(tc[:, m, :], idx[m], axis=1)
        np.negative(acc, out=out[i:i + step])
    return out


# --------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LshConfig:
    """LSH: subtract the train mean, project with a random orthogonal matrix, keep the signs.

    The projection is faiss `RandomRotationMatrix(D, bits)` (orthonormal rows when bits <= D,
    orthonormal columns otherwise): the orthogonal variant of sign random projection. Centring makes
    the hyperplanes pass through the data (features after a ReLU would otherwise share most bits).

    Bytes per item: bits / 8. Fit cost: one pass over train for the mean, O(n · D); parameters
    4 · D · (bits + 1) bytes. Encode: O(D · bits) per item.
    """

    bits: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        _check_bits("lsh", self.bits)


@dataclass(frozen=True)
class PcaRrConfig:
    """PCA + random rotation: faiss `PCAMatrix(D, bits)` (centred, no whitening), then a random
    `bits`×`bits` rotation (`RandomRotationMatrix`, seeded; what `PCAMatrix(random_rotation=True)`
    does with a fixed seed) to balance variance across bits, then sign. Needs bits <= D.

    Bytes per item: bits / 8. Fit cost: covariance O(n' · D²) with n' <= 1000 · D sampled train
    rows, plus a D×D eigendecomposition O(D³). Encode: O(D · bits) per item.
    """

    bits: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        _check_bits("pca-rr", self.bits)


@dataclass(frozen=True)
class ItqConfig:
    """ITQ (Gong & Lazebnik 2011) via faiss `ITQTransform(D, bits, do_pca=True)`: centre, L2-normalise,
    PCA to `bits` dims, then `iters` alternating steps (binarise, orthogonal Procrustes) from a random
    rotation drawn with `seed`; sign. Needs bits <= D.

    Bytes per item: bits / 8. Fit cost: PCA as pca-rr on n' = max(10 · D, 32768) sampled train rows,
    plus iters · (O(n' · bits²) + a bits×bits SVD). Encode: O(D · bits) per item.
    """

    bits: int = 64
    seed: int = 0
    iters: int = 50

    def __post_init__(self) -> None:
        _check_bits("itq", self.bits)
        if self.iters < 1:
            raise ValueError(f"itq: iters must be >= 1, got {self.iters}")


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
        _check_bits("pq", self.bits)


@dataclass(frozen=True)
class OpqConfig:
    """OPQ (Ge et al. 2013): faiss `OPQMatrix(D, M, D')` rotation learnt jointly with a PQ for
    `opq_iters` rounds (faiss's own initial rotation seed), then a fresh PQ (as `PqConfig`, seeded by
    `seed`) trained on the rotated train set. D' = M · ceil(min(D, max_dim) / M): OPQ pads small D
    and, past `max_dim`, also reduces the dimension (faiss's `OPQ{M}_{D'}`), which keeps wide
    features (EfficientNet's 1280-d) affordable: the rotation is learnt on <= `rotation_rows` rows.

    Bytes per item: bits / 8. Fit cost: opq_iters × (4-iteration PQ training + a D'×D SVD and an
    (rotation_rows × D) @ (D × D') product), plus the final PQ's cost on <= 65536 rotated rows
    (measured at D=1280, D'=256, 1 core: ~1.4 s per round); parameters 4 · D · D' bytes more than PQ.
    Encode: O(D · D' + 256 · D') per item. Search: rotate the query, then as PQ.
    """

    bits: int = 64
    niter: int = 25
    opq_iters: int = 50
    max_dim: int = 256
    rotation_rows: int = 16384
    seed: int = 1234

    def __post_init__(self) -> None:
        _check_bits("opq", self.bits)


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


# --------------------------------------------------------------------------------------------------
# Binary coders
# --------------------------------------------------------------------------------------------------

class _SignCoder(Coder):
    """Shared mechanics: a chain of faiss VectorTransforms to `bits` dims, then sign; Hamming search.

    Subclasses set `Config` and implement `_fit_transforms`.
    """

    symmetric = True
    Config: ClassVar[type]

    def __init__(self, **config: Any) -> None:
        self.config = self.Config(**config)
        self._dim: int | None = None
        self._transforms: list[faiss.VectorTransform] = []

    @property
    def lengths(self) -> tuple[int, ...]:
        return (self.config.bits,)

    def _fitted_dim(self) -> int:
        if self._dim is None:
            raise RuntimeError(f"{self.method}: call fit() (or from_state()) before encoding")
        return self._dim

    def _fit_transforms(self, x: np.ndarray) -> list[faiss.VectorTransform]:
        raise NotImplementedError

    def fit(self, train: np.ndarray, labels: np.ndarray,
            val: tuple[np.ndarray, np.ndarray] | None = None) -> FitReport:
        """Fit on `train` (n, D); `labels` and `val` are ignored (unsupervised, no selection)."""
        x = _features(train, None, f"{self.method}.fit")
        t0 = time.perf_counter()
        self._transforms = self._fit_transforms(x)
        self._dim = x.shape[1]
        return FitReport(fit_s=time.perf_counter() - t0)

    def project(self, x: np.ndarray) -> np.ndarray:
        """(n, D) float -> (n, bits) float32 real-valued projections (the code is their sign)."""
        y = _features(x, self._fitted_dim(), f"{self.method}.project")
        for vt in self._transforms:
            y = vt.apply(y)
        return y

    def encode(self, x: np.ndarray) -> np.ndarray:
        """(n, D) float -> (n, bits / 8) uint8 packed sign bits. O(n · D · bits)."""
        return pack_signs(self.project(x))

    def scores(self, queries: np.ndarray, codes: np.ndarray, bits: int | None = None) -> np.ndarray:
        """Encode the queries, return -Hamming distance to `codes`: (nq, n) float32 (integers)."""
        b = bits or self.full_bits
        c = self.prefix_codes(_check_codes(codes, self.bytes_per_item(), f"{self.method}.scores"), b)
        return hamming_scores(self.encode(queries), c)

    def search(self, queries: np.ndarray, codes: np.ndarray, k: int,
               bits: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by Hamming distance through faiss's heap kernel (no full score matrix)."""
        b = bits or self.full_bits
        c = self.prefix_codes(_check_codes(codes, self.bytes_per_item(), f"{self.method}.search"), b)
        return hamming_topk(self.prefix_codes(self.encode(queries), b), c, k)

    def state(self) -> dict[str, Any]:
        return {"method": self.method, "config": dataclasses.asdict(self.config),
                "dim": self._fitted_dim(), "transforms": [_vt_to_tensor(t) for t in self._transforms]}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "_SignCoder":
        if state.get("method") != cls.method:
            raise ValueError(f"{cls.method}.from_state: state is for method {state.get('method')!r}")
        coder = cls(**state["config"])
        coder._dim = int(state["dim"])
        coder._transforms = [_vt_from_tensor(t) for t in state["transforms"]]
        return coder


@register("lsh")
class LshCoder(_SignCoder):
    """Random-projection LSH (see `LshConfig`)."""

    Config = LshConfig
    config: LshConfig

    def _fit_transforms(self, x: np.ndarray) -> list[faiss.VectorTransform]:
        d = x.shape[1]
        centre = faiss.CenteringTransform(d)
        centre.train(x)
        proj = faiss.RandomRotationMatrix(d, self.config.bits)
        proj.init(self.config.seed)
        return [centre, proj]


@register("pca-rr")
class PcaRrCoder(_SignCoder):
    """PCA + random rotation + sign (see `PcaRrConfig`)."""

    Config = PcaRrConfig
    config: PcaRrConfig

    def _fit_transforms(self, x: np.ndarray) -> list[faiss.VectorTransform]:
        d, bits = x.shape[1], self.config.bits
        if bits > d:
            raise ValueError(f"pca-rr: bits={bits} exceeds the feature dimension D={d}; use lsh for "
                             f"codes longer than D")
        pca = faiss.PCAMatrix(d, bits, 0.0, False)
        pca.train(x)
        rot = faiss.RandomRotationMatrix(bits, bits)
        rot.init(self.config.seed)
        return [pca, rot]


@register("itq")
class ItqCoder(_SignCoder):
    """Iterative quantisation (see `ItqConfig`)."""

    Config = ItqConfig
    config: ItqConfig

    def _fit_transforms(self, x: np.ndarray) -> list[faiss.VectorTransform]:
        d, bits = x.shape[1], self.config.bits
        if bits > d:
            raise ValueError(f"itq: bits={bits} exceeds the feature dimension D={d}; use lsh for "
                             f"codes longer than D")
        itq = faiss.ITQTransform(d, bits, True)
        itq.itq.seed = self.config.seed
        itq.itq.max_iter = self.config.iters
        itq.train(x)
        return [itq]


# --------------------------------------------------------------------------------------------------
# Vector-quantisation coders (asymmetric distance)
# --------------------------------------------------------------------------------------------------

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

    def fit(self, train: np.ndarray, labels: np.ndarray,
            val: tuple[np.ndarray, np.ndarray] | None = None) -> FitReport:
        """Train the quantizer on `train` (n, D); `labels` and `val` are ignored.

        Needs n >= 256 (faiss k-means); faiss warns below 9984 (39 points per centroid)."""
        x = _features(train, None, f"{self.method}.fit")
        if x.shape[0] < 256:
            raise ValueError(f"{self.method}: need at least 256 training vectors for 256 centroids "
                             f"per sub-quantizer, got {x.shape[0]}")
        t0 = time.perf_counter()
        index = self._build_index(x.shape[1])
        index.train(x)
        self._index, self._dim = index, x.shape[1]
        return FitReport(fit_s=time.perf_counter() - t0)

    @property
    def pq(self) -> faiss.ProductQuantizer:
        """The trained ProductQuantizer (in the transformed space for OPQ / padding)."""
        index = self._fitted()
        inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexPreTransform) else index
        return inner.pq

    def to_pq_space(self, x: np.ndarray) -> np.ndarray:
        """(n, D) features -> (n, D') float32 in the PQ's space (OPQ rotation / zero padding)."""
        index = self._fitted()
        y = _features(x, self._dim, f"{self.method}.to_pq_space")
        if isinstance(index, faiss.IndexPreTransform):
            for i in range(index.chain.size()):
                y = index.chain.at(i).apply(y)
        return y

    def encode(self, x: np.ndarray) -> np.ndarray:
        """(n, D) float -> (n, bits / 8) uint8, byte m = centroid index of sub-space m.

        Encodes in blocks of ENCODE_BLOCK_ROWS rows: faiss's assignment of one large call is 3-4x
        slower than the same rows in 1024-row blocks (BENCHMARKS.md section 3), same codes."""
        index = self._fitted()
        y = _features(x, self._dim, f"{self.method}.encode")
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
        c = self.prefix_codes(_check_codes(codes, self.bytes_per_item(), f"{self.method}.scores"), b)
        return adc_scores(self.distance_tables(queries), c)

    def state(self) -> dict[str, Any]:
        return {"method": self.method, "config": dataclasses.asdict(self.config),
                "dim": int(self._dim or 0), "index": _index_to_tensor(self._fitted())}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "_AdcCoder":
        if state.get("method") != cls.method:
            raise ValueError(f"{cls.method}.from_state: state is for method {state.get('method')!r}")
        coder = cls(**state["config"])
        coder._dim = int(state["dim"])
        coder._index = _index_from_tensor(state["index"])
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
# The ceiling
# --------------------------------------------------------------------------------------------------

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
        x = _features(train, None, "float.fit")
        self._dim = x.shape[1]
        self._mean = x.mean(axis=0, dtype=np.float64).astype(np.float32)
        return FitReport(fit_s=time.perf_counter() - t0)

    def encode(self, x: np.ndarray) -> np.ndarray:
        """(n, D) float -> (n, 4 · D) uint8: the float32 bytes (native byte order)."""
        # Copy: a float32 input would otherwise be aliased by its "codes".
        return _features(x, self._fitted_dim(), "float.encode").view(np.uint8).copy()

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """(n, 4 · D) uint8 -> (n, D) float32, bit-exact inverse of `encode`."""
        return _check_codes(codes, self.bytes_per_item(), "float.decode").view(np.float32)

    def scores(self, queries: np.ndarray, codes: np.ndarray, bits: int | None = None) -> np.ndarray:
        """(nq, n) float32 = -||q - x||² (faiss.pairwise_distances, BLAS, both sides shifted by the
        train mean). O(nq · n · D) flops; copies the database once (4 · n · D bytes)."""
        b = bits or self.full_bits
        c = self.prefix_codes(_check_codes(codes, self.bytes_per_item(), "float.scores"), b)
        q = _features(queries, self._fitted_dim(), "float.scores")
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
