"""Binary baseline coders, searched by symmetric Hamming distance (`encoders.metrics.hamming_scores`):
- `lsh`    centre on the train mean, random orthogonal projection to `bits` dims, sign.
- `pca-rr` PCA to `bits` dims, random rotation, sign.
- `itq`    faiss ITQTransform: centre, L2-normalise, PCA to `bits` dims, ITQ rotation, sign.

Binary layout: bit j of a code is `projection_j > 0`, stored in byte j // 8 at bit j % 8 (LSB first),
the layout of `faiss.IndexLSH` and `faiss.IndexBinaryFlat`.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import faiss
import numpy as np

from encoders.coders import Coder, FitReport, register
from encoders.faiss_codes import (check_bits, check_codes, check_features, pack_signs, vt_from_tensor,
                                  vt_to_tensor)
from encoders.metrics import hamming_scores, hamming_topk


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
        check_bits("lsh", self.bits)


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
        check_bits("pca-rr", self.bits)


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
        check_bits("itq", self.bits)
        if self.iters < 1:
            raise ValueError(f"itq: iters must be >= 1, got {self.iters}")


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

    def _bits_within(self, d: int) -> int:
        """`bits`, refused when above the feature dimension (PCA-based coders project to <= D dims)."""
        bits = self.config.bits
        if bits > d:
            raise ValueError(f"{self.method}: bits={bits} exceeds the feature dimension D={d}; use lsh for "
                             f"codes longer than D")
        return bits

    def fit(self, train: np.ndarray, labels: np.ndarray,
            val: tuple[np.ndarray, np.ndarray] | None = None) -> FitReport:
        """Fit on `train` (n, D); `labels` and `val` are ignored (unsupervised, no selection)."""
        x = check_features(train, None, f"{self.method}.fit")
        t0 = time.perf_counter()
        self._transforms = self._fit_transforms(x)
        self._dim = x.shape[1]
        return FitReport(fit_s=time.perf_counter() - t0)

    def project(self, x: np.ndarray) -> np.ndarray:
        """(n, D) float -> (n, bits) float32 real-valued projections (the code is their sign)."""
        y = check_features(x, self._fitted_dim(), f"{self.method}.project")
        for vt in self._transforms:
            y = vt.apply(y)
        return y

    def encode(self, x: np.ndarray) -> np.ndarray:
        """(n, D) float -> (n, bits / 8) uint8 packed sign bits. O(n · D · bits)."""
        return pack_signs(self.project(x))

    def scores(self, queries: np.ndarray, codes: np.ndarray, bits: int | None = None) -> np.ndarray:
        """Encode the queries, return -Hamming distance to `codes`: (nq, n) float32 (integers)."""
        b = bits or self.full_bits
        c = self.prefix_codes(check_codes(codes, self.bytes_per_item(), f"{self.method}.scores"), b)
        return hamming_scores(self.encode(queries), c)

    def search(self, queries: np.ndarray, codes: np.ndarray, k: int,
               bits: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by Hamming distance through faiss's heap kernel (no full score matrix)."""
        b = bits or self.full_bits
        c = self.prefix_codes(check_codes(codes, self.bytes_per_item(), f"{self.method}.search"), b)
        return hamming_topk(self.prefix_codes(self.encode(queries), b), c, k)

    def state(self) -> dict[str, Any]:
        return {"method": self.method, "config": dataclasses.asdict(self.config),
                "dim": self._fitted_dim(), "transforms": [vt_to_tensor(t) for t in self._transforms]}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "_SignCoder":
        if state.get("method") != cls.method:
            raise ValueError(f"{cls.method}.from_state: state is for method {state.get('method')!r}")
        coder = cls(**state["config"])
        coder._dim = int(state["dim"])
        coder._transforms = [vt_from_tensor(t) for t in state["transforms"]]
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
        d, bits = x.shape[1], self._bits_within(x.shape[1])
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
        d, bits = x.shape[1], self._bits_within(x.shape[1])
        itq = faiss.ITQTransform(d, bits, True)
        itq.itq.seed = self.config.seed
        itq.itq.max_iter = self.config.iters
        itq.train(x)
        return [itq]


