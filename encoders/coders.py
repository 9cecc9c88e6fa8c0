"""The Coder interface every compact-code method implements, and the registry of methods.

A coder turns float features (n, D) into packed codes (n, B) uint8 in faiss's layout (bit i of a
binary code is bit i%8 of byte i//8, LSB first, as `faiss.pack_bits`/`IndexBinaryFlat` expect).
Multi-length coders (DRQ) produce their longest code; the code of L bits is its first L bits
(`prefix_codes`). Single-length coders (ITQ, PQ, ...) have `lengths == (bits,)`.

Protocol (METHODS.md): `fit` sees only `train` (with labels) and `val`; it never receives the
query split. Nothing here does I/O: `state()` returns plain tensors/numbers that infra saves with
`torch.save` and loads with `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import numpy as np

if TYPE_CHECKING:
    import faiss


@dataclass(frozen=True)
class FitReport:
    """What `Coder.fit` measured: seconds spent and any validation metrics (never query metrics)."""

    fit_s: float
    val_metrics: dict[str, float] = field(default_factory=dict)


class Coder(ABC):
    """A trained (or training-free) compact-code method.

    Subclasses set `method` (registry name), `symmetric` (True: codes vs codes by Hamming distance;
    False: asymmetric, float query vs stored codes) and implement the abstract methods.
    """

    method: ClassVar[str]
    symmetric: ClassVar[bool]
    train_device: str = "cpu"  # where the next `fit` runs (`train_on`)

    def train_on(self, device: str) -> bool:
        """Run the next `fit` on `device` ('cpu', 'cuda', 'cuda:N'), already resolved by the caller
        (the GPU is present). Returns False when this coder has no path for it and fits on the CPU
        (the default for every coder but DRQ, torch, and pq/opq, faiss k-means); results do not
        depend on the device beyond float rounding."""
        return device == "cpu"

    @property
    @abstractmethod
    def lengths(self) -> tuple[int, ...]:
        """Code lengths in bits this coder can produce, ascending."""

    @property
    def full_bits(self) -> int:
        return self.lengths[-1]

    def additive_codebooks(self, bits: int) -> "tuple[np.ndarray, int, str] | None":
        """((levels, K, d) float32 codebooks, bits per level, 'ip' | 'l2') when codes at `bits` are
        additive: score(q, code) = <embed(q), z_hat> (or -||embed(q) - z_hat||^2) with
        z_hat = sum_m codebooks[m][b_m]. None (the default) for any other coder: indexes then fall
        back to the coder's own scan."""
        return None

    # -- optional capabilities, declared here so callers never probe for them -------------------
    def product_quantizer(self) -> "faiss.ProductQuantizer | None":
        """The trained faiss ProductQuantizer whose codes this coder stores (pq, opq): indexes then
        score them with faiss IndexPQ, queries mapped by `query_space`. None (the default) otherwise."""
        return None

    def query_space(self, queries: np.ndarray) -> np.ndarray:
        """Float queries (nq, D) -> float32 vectors in the space the codes' quantizer lives in: the
        PQ's space (OPQ rotation / zero padding) for `product_quantizer` coders, the embedding for
        `additive_codebooks` coders. Default: the features unchanged. Cost: one projection."""
        return np.ascontiguousarray(queries, dtype=np.float32)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """Codes -> (n, D) float32 feature vectors, for coders whose codes are vectors (float).
        Default: NotImplementedError (the index plan never asks it of other coders)."""
        raise NotImplementedError(f"{self.method}: codes do not decode to feature vectors")

    def class_columns(self, x: np.ndarray) -> "tuple[np.ndarray, np.ndarray] | None":
        """Per row of features `x`: the decoded class (int32) and the out-of-distribution flag (bool)
        stored beside the code, for coders with class codes (LLC). None (the default) otherwise."""
        return None

    @abstractmethod
    def fit(self, train: np.ndarray, labels: np.ndarray,
            val: tuple[np.ndarray, np.ndarray] | None = None) -> FitReport:
        """Fit on `train` (n, D) float32 with int labels; `val` (features, labels) for selection only."""

    @abstractmethod
    def encode(self, x: np.ndarray) -> np.ndarray:
        """(n, D) float32 -> (n, bytes_per_item(full_bits)) uint8 codes at full length."""

    @abstractmethod
    def scores(self, queries: np.ndarray, codes: np.ndarray, bits: int | None = None) -> np.ndarray:
        """Similarity of each float query to each stored code at `bits` (default full): (nq, n) float32,
        higher is more similar. `codes` are full-length (as stored); the coder takes the prefix.
        Symmetric coders return minus the Hamming distance (exact ties kept)."""

    @abstractmethod
    def state(self) -> dict[str, Any]:
        """Everything needed to rebuild the trained coder: tensors, numpy arrays, numbers, strings."""

    @classmethod
    @abstractmethod
    def from_state(cls, state: dict[str, Any]) -> "Coder":
        """Inverse of `state()`; the rebuilt coder encodes bit-identically."""

    def bytes_per_item(self, bits: int | None = None) -> int:
        """Stored bytes per item at `bits` (default full length)."""
        return ((bits or self.full_bits) + 7) // 8

    def prefix_codes(self, codes: np.ndarray, bits: int) -> np.ndarray:
        """Codes at `bits` from full-length codes (first `bits` bits). Costs one slice + copy."""
        if bits not in self.lengths:
            raise ValueError(f"{self.method}: {bits} bits not in this coder's lengths {self.lengths}")
        if bits % 8:
            raise ValueError(f"{self.method}: prefix lengths must be whole bytes, got {bits} bits")
        return np.ascontiguousarray(codes[:, : bits // 8])

    def search(self, queries: np.ndarray, codes: np.ndarray, k: int,
               bits: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, positions) per query, best first. Default: full score matrix + partial sort,
        O(nq * n) memory; indexes (infra/indexes.py) provide the scalable path."""
        s = self.scores(queries, codes, bits)
        k = min(k, s.shape[1])
        part = np.argpartition(-s, k - 1, axis=1)[:, :k]
        ps = np.take_along_axis(s, part, axis=1)
        order = np.argsort(-ps, axis=1, kind="stable")
        return np.take_along_axis(ps, order, axis=1), np.take_along_axis(part, order, axis=1).astype(np.int64)

    def config_dict(self) -> dict[str, Any]:
        cfg = getattr(self, "config", None)
        return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else {}


CODERS: dict[str, Callable[..., Coder]] = {}


def require_classes(labels: np.ndarray, method: str) -> None:
    """Supervised coders (DRQ, LLC, GSL) learn from class labels: with fewer than two classes their
    losses are constant and training silently returns a random embedding, so refuse up front."""
    n = len(np.unique(np.asarray(labels)))
    if n < 2:
        raise ValueError(f"{method} is supervised and needs at least 2 classes in the train labels, got {n} "
                         f"(an unlabelled dataset such as glove: use lsh, pca-rr, itq, pq, opq or float)")


def register(method: str) -> Callable[[type[Coder]], type[Coder]]:
    """Class decorator: make `make_coder(method, ...)` build this class."""

    def deco(cls: type[Coder]) -> type[Coder]:
        cls.method = method
        CODERS[method] = cls
        return cls

    return deco


def make_coder(method: str, **kwargs: Any) -> Coder:
    """Build an unfitted coder by registry name, e.g. make_coder('itq', bits=32)."""
    _import_all()
    if method not in CODERS:
        raise ValueError(f"unknown coder method {method!r}; known: {sorted(CODERS)}")
    return CODERS[method](**kwargs)


def coder_from_state(state: dict[str, Any]) -> Coder:
    """Rebuild any coder from `state()` output (which stores its method under 'method')."""
    _import_all()
    return CODERS[state["method"]].from_state(state)


def _import_all() -> None:
    # Registration happens on import; import lazily so encoders.coders stays dependency-light.
    import importlib

    for mod in ("baselines", "drq", "llc", "gsl"):
        try:
            importlib.import_module(f"encoders.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"encoders.{mod}":
                raise
