"""Shared mechanics of the faiss baseline coders (`encoders/baselines.py`): input checks, faiss
object <-> uint8 tensor serialisation (so `torch.load(weights_only=True)` round-trips a coder's
state), sign packing and exact ADC table-lookup scores. Pure: no I/O."""
from __future__ import annotations

import faiss
import numpy as np
import torch


def check_features(x: np.ndarray, dim: int | None, what: str) -> np.ndarray:
    """Validate (n, D) features; return them as C-contiguous float32 (copy only if needed)."""
    a = np.asarray(x)
    if a.ndim != 2 or a.shape[1] == 0:
        raise ValueError(f"{what}: expected (n, D) features, got shape {a.shape}")
    if dim is not None and a.shape[1] != dim:
        raise ValueError(f"{what}: features have D={a.shape[1]}, but this coder was fitted on D={dim}")
    if not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"{what}: features must be floating point, got {a.dtype}")
    return np.ascontiguousarray(a, dtype=np.float32)


def check_codes(codes: np.ndarray, nbytes: int, what: str) -> np.ndarray:
    c = np.asarray(codes)
    if c.ndim != 2 or c.dtype != np.uint8 or c.shape[1] != nbytes:
        raise ValueError(f"{what}: expected (n, {nbytes}) uint8 codes, got {c.shape} {c.dtype}")
    return np.ascontiguousarray(c)


def check_bits(method: str, bits: int) -> None:
    if not isinstance(bits, int) or bits <= 0 or bits % 8:
        raise ValueError(f"{method}: bits must be a positive multiple of 8, got {bits!r}")


def vt_to_tensor(vt: faiss.VectorTransform) -> torch.Tensor:
    writer = faiss.VectorIOWriter()
    faiss.write_VectorTransform(vt, writer)
    return torch.from_numpy(faiss.vector_to_array(writer.data).copy())


def vt_from_tensor(t: torch.Tensor) -> faiss.VectorTransform:
    reader = faiss.VectorIOReader()
    faiss.copy_array_to_vector(np.ascontiguousarray(t.numpy(), dtype=np.uint8), reader.data)
    return faiss.read_VectorTransform(reader)


def index_to_tensor(index: faiss.Index) -> torch.Tensor:
    return torch.from_numpy(faiss.serialize_index(index).copy())


def index_from_tensor(t: torch.Tensor) -> faiss.Index:
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

    Cost: nq · n · M table lookups (a gather from an L1-resident table row). Output memory
    4 · nq · n bytes.
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

