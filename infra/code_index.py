"""faiss indexes over stored codes: the coder -> index mapping, empty / trained indexes, adding stored
codes (never re-encoded), merging, removing, and (de)serialisation, memory-mapped or not.

A `CodeIndex` is a faiss index in position order (labels 0..N-1) with the stable id and source part
of every position. Search and evaluation are in `infra.code_search`; the plan in `infra.index_plan`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import faiss
import numpy as np

from encoders.coders import Coder
from infra.index_files import ids_from_bytes, index_from_bytes, index_from_file, index_to_bytes
from infra.index_plan import (BINARY_FLAT, BINARY_IVF, BINARY_STORAGE, CODER_LUT, FLAT, HNSW,
                              HNSW_EF_SEARCH, HNSW_M, IVF_FLAT, IVF_PQ, IVF_RQ, IVF_TRAIN_NITER, IVF_TYPES, PQ_LUT,
                              REMOVABLE, ROUTE_HNSW_EF, ROUTE_HNSW_M, RQ_LUT, IndexBuildError, IndexPlan)

# ---------------------------------------------------------------------------------------------
# Coders -> index kinds, engines and spaces
# ---------------------------------------------------------------------------------------------
def index_kind(coder: Coder) -> str:
    """'binary' for symmetric (Hamming) coders, 'float' for the float ceiling, else 'adc'."""
    if coder.symmetric:
        return "binary"
    return "float" if coder.method == "float" else "adc"


def adc_engine_for(coder: Coder, bits: int) -> str:
    """The exact ADC type for an asymmetric coder: faiss IndexPQ when it exposes its PQ (pq, opq),
    faiss IndexResidualQuantizer when it declares additive codebooks (`Coder.additive_codebooks`:
    DRQ scoring by 'ip' / 'l2'), else the generic coder-lut scan."""
    if coder.product_quantizer() is not None:
        return PQ_LUT
    if coder.additive_codebooks(bits) is not None:
        return RQ_LUT
    return CODER_LUT


def codec_of(coder: Coder, bits: int) -> str:
    """The stored codes' faiss codec, for factory strings: 'PQ{M}x{nbits}', 'RQ{levels}x{nb}', ''."""
    engine = adc_engine_for(coder, bits) if index_kind(coder) == "adc" else ""
    if engine == PQ_LUT:
        pq = coder.product_quantizer()
        return f"PQ{pq.M}x{pq.nbits}"
    if engine == RQ_LUT:
        cbs, nb, _ = coder.additive_codebooks(bits)
        return f"RQ{len(cbs)}x{nb}"
    return ""


def code_bits(coder: Coder, codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes cut to `bits` from full-length stored codes (no copy at full length)."""
    if bits == coder.full_bits:
        return np.ascontiguousarray(codes)
    return coder.prefix_codes(codes, bits)


def as_full_length(coder: Coder, codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes kept at `bits` -> full-length codes for `coder.scores` (whose contract takes stored,
    full-length codes and cuts the prefix itself): zero bytes appended, which the prefix drops.
    A view when already full; else one (n, full bytes) copy."""
    full = coder.bytes_per_item()
    if codes.shape[1] == full:
        return codes
    out = np.zeros((len(codes), full), dtype=np.uint8)
    out[:, :codes.shape[1]] = codes
    return out


def prepare_queries(plan: IndexPlan, coder: Coder, bits: int, queries: np.ndarray) -> np.ndarray:
    """Float query features (nq, D) -> queries in the index's space: packed codes (binary), the PQ's
    space (pq-lut), DRQ embeddings (rq-lut), or the features themselves. Cost: one coder encode."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    if q.ndim == 1:
        q = q[None, :]
    t = plan.index_type
    if t in (BINARY_FLAT, BINARY_IVF):
        return code_bits(coder, coder.encode(q), bits)
    if t in (PQ_LUT, IVF_PQ):
        return np.ascontiguousarray(coder.query_space(q), dtype=np.float32)
    if t in (RQ_LUT, IVF_RQ):
        return np.ascontiguousarray(coder.query_space(q), dtype=np.float32)
    return q


# =============================================================================================
# Building: empty / trained indexes, adding stored codes, merging, removing
# =============================================================================================
@dataclass
class CodeIndex:
    """An index in position order with the stable id and source part of every position.

    Memory: the faiss index (see IndexPlan) + 12 bytes per item; `codes()` of a coder-lut index is
    a view of the faiss storage, cached."""

    plan: IndexPlan
    bits: int
    index: Any  # faiss.Index or faiss.IndexBinary
    ids: np.ndarray
    parts: np.ndarray
    _codes: np.ndarray | None = field(default=None, repr=False)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def codes(self) -> np.ndarray:
        """(N, B) uint8 stored codes of a flat code index (binary-flat, coder-lut, pq-lut, rq-lut)."""
        if self._codes is None:
            t = self.plan.index_type
            if t in (BINARY_FLAT, CODER_LUT):
                raw = faiss.vector_to_array(self.index.xb)
                self._codes = raw.reshape(self.ntotal, self.index.code_size)
            elif t in (PQ_LUT, RQ_LUT):
                raw = faiss.vector_to_array(self.index.codes).reshape(self.ntotal, self.index.code_size)
                self._codes = _strip_norms(self.index, raw, self.plan.bytes_per_item)
            elif t == FLAT:
                self._codes = self.index.reconstruct_n(0, self.ntotal).view(np.uint8)
            else:
                raise ValueError(f"{t} indexes keep no flat code array")
        return self._codes


def new_index(plan: IndexPlan, coder: Coder, bits: int, trained: bytes | None = None,
              final: bool = False) -> Any:
    """An empty index ready for `add_codes`: flat types from the coder's codebooks, IVF types from
    the `trained` bytes (`train_ivf`). hnsw partials are flat; `final=True` gives the HNSW graph."""
    t, b = plan.index_type, plan.bytes_per_item
    if t in (BINARY_FLAT, CODER_LUT):
        return faiss.IndexBinaryFlat(8 * b)
    if t in IVF_TYPES:
        if trained is None:
            raise IndexBuildError(f"{t} needs its trained coarse quantizer")
        return index_from_bytes(trained, t in BINARY_STORAGE)
    if t == PQ_LUT:
        pq = coder.product_quantizer()
        idx = faiss.IndexPQ(pq.d, pq.M, pq.nbits)
        _copy_pq(coder, idx.pq, b)
        idx.is_trained = True
        return idx
    if t == RQ_LUT:
        levels, nb, d, metric, st, cbs = _rq_params(coder, bits, b)
        idx = faiss.IndexResidualQuantizer(d, levels, nb, metric, st)
        faiss.copy_array_to_vector(np.ascontiguousarray(cbs.reshape(-1)), idx.rq.codebooks)
        idx.rq.is_trained = True
        idx.is_trained = True
        return idx
    d = b // 4
    if t == HNSW and final:
        idx = faiss.IndexHNSWFlat(d, plan.hnsw_m or HNSW_M)
        idx.hnsw.efSearch = plan.ef_search or HNSW_EF_SEARCH
        return idx
    return faiss.IndexFlatL2(d)


def _copy_pq(coder: Coder, pq_: Any, nbytes: int) -> None:
    """The coder's PQ centroids into a faiss ProductQuantizer (IndexPQ's or IndexIVFPQ's)."""
    faiss.copy_array_to_vector(faiss.vector_to_array(coder.product_quantizer().centroids), pq_.centroids)
    pq_.is_trained = True
    if pq_.code_size != nbytes:
        raise IndexBuildError(f"pq: PQ code size {pq_.code_size} != stored {nbytes} bytes")


def _rq_params(coder: Coder, bits: int, nbytes: int) -> tuple[int, int, int, int, int, np.ndarray]:
    """(levels, bits per level, d, metric, search type, codebooks) of the coder's additive codes:
    'ip' scores sum the LUTs; 'l2' adds the stored float32 norm of z_hat (ST_norm_float)."""
    got = coder.additive_codebooks(bits)
    if got is None:
        raise IndexBuildError(f"rq: coder {coder.method} declares no additive codebooks")
    cbs, nb, score = got
    levels, _, d = cbs.shape
    if (levels * nb + 7) // 8 != nbytes:
        raise IndexBuildError(f"rq: {levels} levels of {nb} bits != stored {nbytes} bytes")
    aq = faiss.AdditiveQuantizer
    metric, st = ((faiss.METRIC_INNER_PRODUCT, aq.ST_LUT_nonorm) if score == "ip"
                  else (faiss.METRIC_L2, aq.ST_norm_float))
    return levels, nb, d, metric, st, cbs


def decode_codes(plan: IndexPlan, coder: Coder, bits: int, codes: np.ndarray) -> np.ndarray:
    """Stored codes at `bits` -> float32 vectors in the index's space (PQ space, DRQ embedding
    space, feature space): what the coarse quantizer routes by. Cost: n·d floats."""
    t = plan.index_type
    if t in (PQ_LUT, IVF_PQ):
        return coder.product_quantizer().decode(np.ascontiguousarray(codes))
    if t in (RQ_LUT, IVF_RQ):
        cbs, nb, _ = coder.additive_codebooks(bits)
        lv = _unpack_levels(codes, len(cbs), nb)
        z = np.zeros((len(codes), cbs.shape[2]), dtype=np.float32)
        for m in range(len(cbs)):
            z += cbs[m][lv[:, m]]
        return z
    return np.ascontiguousarray(coder.decode(codes), dtype=np.float32)


def train_ivf(plan: IndexPlan, coder: Coder, bits: int, sample_codes: np.ndarray,
              niter: int = IVF_TRAIN_NITER) -> bytes:
    """Train the coarse quantizer of an IVF type on full-length sample codes; returns the empty
    trained index's bytes. IVF-PQ / IVF-RQ keep the coder's own codebooks (by_residual=False: the
    lists hold the stored codes), only the nlist centroids are learnt, by k-means on the decoded
    sample (`niter` iterations; binary IVF: faiss's own). Cost: niter · len(sample) · nlist · d flops
    (faiss, OpenMP; GPU when `device` asks)."""
    t = plan.index_type
    codes = code_bits(coder, sample_codes, bits)
    if t == BINARY_IVF:
        d = 8 * plan.bytes_per_item
        idx = faiss.IndexBinaryIVF(faiss.IndexBinaryFlat(d), d, plan.nlist)
        idx.cp.niter = niter
        idx.train(codes)
        idx.nprobe = plan.nprobe
        return index_to_bytes(idx)
    x = decode_codes(plan, coder, bits, codes)
    d = x.shape[1]
    if t == IVF_FLAT:
        idx = faiss.IndexIVFFlat(faiss.IndexFlatL2(d), d, plan.nlist, faiss.METRIC_L2)
    elif t == IVF_PQ:
        pq = coder.product_quantizer()
        idx = faiss.IndexIVFPQ(faiss.IndexFlatL2(d), d, plan.nlist, pq.M, pq.nbits)
        idx.by_residual = False
        _copy_pq(coder, idx.pq, plan.bytes_per_item)
    elif t == IVF_RQ:
        levels, nb, d, metric, st, cbs = _rq_params(coder, bits, plan.bytes_per_item)
        quantizer = faiss.IndexFlatIP(d) if metric == faiss.METRIC_INNER_PRODUCT else faiss.IndexFlatL2(d)
        idx = faiss.IndexIVFResidualQuantizer(quantizer, d, plan.nlist, levels, nb, metric, st)
        idx.by_residual = False
        faiss.copy_array_to_vector(np.ascontiguousarray(cbs.reshape(-1)), idx.rq.codebooks)
        idx.rq.is_trained = True
    else:
        raise ValueError(f"{t} needs no training")
    from infra.devices import kmeans_centroids  # the GPU path lives with the device choice

    cents = kmeans_centroids(x, plan.nlist, spherical=idx.metric_type == faiss.METRIC_INNER_PRODUCT, niter=niter)
    idx.quantizer.add(cents)
    idx.is_trained = True
    idx.nprobe = plan.nprobe
    return index_to_bytes(idx)


def listno_bytes(index: Any, lists: np.ndarray) -> np.ndarray:
    """(n, coarse_code_size) uint8: faiss's encoding of list numbers (little-endian), the prefix
    add_sa_codes reads before each code."""
    size = index.coarse_code_size()
    lists = np.asarray(lists, dtype=np.int64)
    return np.stack([(lists >> (8 * i)) & 0xFF for i in range(size)], axis=1).astype(np.uint8)


def add_codes(index: Any, plan: IndexPlan, coder: Coder, bits: int, full_codes: np.ndarray,
              route: Any = None) -> None:
    """Append stored full-length codes (n, B_full) uint8 in order; positions continue from ntotal.
    `route`: the IVF-PQ / IVF-RQ `router` to reuse across calls on one index (built here when None).
    Cost: a copy of the codes (float kinds: decoded to vectors; IVF: one coarse assignment each)."""
    codes = code_bits(coder, full_codes, bits)
    t = plan.index_type
    if t in (IVF_PQ, IVF_RQ):
        _add_ivf_codes(index, plan, coder, bits, codes, route if route is not None else router(index, plan))
    elif t == RQ_LUT and index.rq.search_type != faiss.AdditiveQuantizer.ST_LUT_nonorm:
        index.add_sa_codes(_rq_codes_with_norms(index.rq, codes))
    elif t in (PQ_LUT, RQ_LUT):
        index.add_sa_codes(np.ascontiguousarray(codes))
    elif t in BINARY_STORAGE:
        index.add(np.ascontiguousarray(codes))
    else:
        index.add(np.ascontiguousarray(coder.decode(codes), dtype=np.float32))


def _add_ivf_codes(index: Any, plan: IndexPlan, coder: Coder, bits: int, codes: np.ndarray, route: Any,
                   chunk: int = 262_144) -> None:
    """Stored codes into an IVF-PQ / IVF-RQ with by_residual=False: route each decoded code to its
    coarse centroid (`router`) and append the code itself (add_sa_codes: list number + code), in
    order, labels continuing from ntotal. Nothing is encoded again. Cost per chunk: n·d floats
    decoded and one coarse assignment (exact: n·nlist·d flops; hnsw: ~n·efSearch·M·d)."""
    for i in range(0, len(codes), chunk):
        c = codes[i:i + chunk]
        _, lists = route.search(decode_codes(plan, coder, bits, c), 1)
        body = _rq_codes_with_norms(index.rq, c) if plan.index_type == IVF_RQ and \
            index.rq.search_type != faiss.AdditiveQuantizer.ST_LUT_nonorm else c
        sa = np.ascontiguousarray(np.concatenate([listno_bytes(index, lists[:, 0]), body], axis=1))
        index.add_sa_codes(sa, np.arange(index.ntotal, index.ntotal + len(c), dtype=np.int64))


def router(index: Any, plan: IndexPlan) -> Any:
    """What finds an added code's list: the IVF's own quantizer (exact), or for `plan.routing ==
    'hnsw'` an HNSW graph over its centroids, built on one thread so that the same centroids always
    give the same graph (and the same lists). Cost (hnsw): building the graph, ~1 s per 16k
    centroids: build it once per index (`add_codes(route=...)`). None for non-IVF indexes."""
    if not hasattr(index, "quantizer"):
        return None
    if plan.routing != "hnsw":
        return index.quantizer
    from infra.devices import omp_threads

    q = index.quantizer
    graph = faiss.IndexHNSWFlat(q.d, ROUTE_HNSW_M, q.metric_type)
    with omp_threads(1):
        graph.add(q.reconstruct_n(0, q.ntotal))
    graph.hnsw.efSearch = ROUTE_HNSW_EF
    return graph


def _unpack_levels(codes: np.ndarray, levels: int, nb: int) -> np.ndarray:
    """(n, B) packed codes (level m in bits [m·nb, (m+1)·nb), LSB first, faiss's layout) ->
    (n, levels) int32 level indices."""
    if nb == 8:
        return np.ascontiguousarray(codes[:, :levels], dtype=np.int32)
    bitstream = np.unpackbits(codes, axis=1, bitorder="little")[:, : levels * nb]
    weights = (1 << np.arange(nb, dtype=np.int64))
    return (bitstream.reshape(len(codes), levels, nb).astype(np.int64) @ weights).astype(np.int32)


def _rq_codes_with_norms(rq: Any, codes: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """Stored level codes -> faiss codes that also carry ||z_hat||^2 (ST_norm_float): decode z_hat
    = sum_m codebook_m[b_m] in float32 (n·levels·d flops, chunked) and let faiss pack codes + norm."""
    levels, nb, d = rq.M, rq.nbits.at(0), rq.d
    cbs = faiss.vector_to_array(rq.codebooks).reshape(levels, -1, d)
    out = np.empty((len(codes), rq.code_size), dtype=np.uint8)
    for i in range(0, len(codes), chunk):
        lv = _unpack_levels(codes[i:i + chunk], levels, nb)
        z = np.zeros((len(lv), d), dtype=np.float32)
        for m in range(levels):
            z += cbs[m][lv[:, m]]
        norms = np.ascontiguousarray(np.einsum("nd,nd->n", z, z), dtype=np.float32)
        part = np.empty((len(lv), rq.code_size), dtype=np.uint8)
        rq.pack_codes(len(lv), faiss.swig_ptr(np.ascontiguousarray(lv)), faiss.swig_ptr(part), -1,
                      faiss.swig_ptr(norms), None)
        out[i:i + chunk] = part
    return out


def _strip_norms(index: Any, raw: np.ndarray, nbytes: int) -> np.ndarray:
    """faiss flat codes -> the stored codes (first `nbytes` bytes; the bits after the last level,
    where rq-lut keeps its norm, cleared)."""
    out = raw[:, :nbytes]
    rq = index.rq if isinstance(index, (faiss.IndexResidualQuantizer, faiss.IndexIVFResidualQuantizer)) else None
    if rq is None or rq.search_type == faiss.AdditiveQuantizer.ST_LUT_nonorm:
        return out
    used = rq.M * rq.nbits.at(0) - 8 * (nbytes - 1)
    if used < 8:
        out = out.copy()
        out[:, -1] &= np.uint8((1 << used) - 1)
    return out


def merge_into(dst: CodeIndex, src: CodeIndex) -> None:
    """Append `src` after `dst` (positions of src shift by dst.ntotal). faiss merge_from where it
    exists (flat codes, IVF: moves the codes, src is emptied), else copy (binary flat, HNSW)."""
    t = dst.plan.index_type
    if t in (BINARY_FLAT, CODER_LUT):
        dst.index.add(src.codes())
    elif t in IVF_TYPES:
        dst.index.merge_from(src.index, dst.ntotal)
    elif t == HNSW:
        n = src.ntotal
        for i in range(0, n, 65536):
            dst.index.add(src.index.reconstruct_n(i, min(65536, n - i)))
    else:
        dst.index.merge_from(src.index, 0)
    dst.ids = np.concatenate([dst.ids, src.ids])
    dst.parts = np.concatenate([dst.parts, src.parts])
    dst._codes = None


def remove_parts(ci: CodeIndex, parts: Sequence[int]) -> int:
    """Remove every position that came from `parts`, in place, keeping the others' order
    (faiss remove_ids compacts flat code indexes). Returns the count removed. IVF and HNSW types
    cannot do this here (their labels would stop being positions): refresh rebuilds them instead."""
    if ci.plan.index_type not in REMOVABLE:
        raise IndexBuildError(f"{ci.plan.index_type} indexes do not support removal; rebuild instead")
    mask = np.isin(ci.parts, np.asarray(list(parts), dtype=np.int32))
    if not mask.any():
        return 0
    positions = np.flatnonzero(mask).astype(np.int64)
    removed = int(ci.index.remove_ids(faiss.IDSelectorBatch(positions)))
    if removed != len(positions):
        raise IndexBuildError(f"remove_ids removed {removed} of {len(positions)} positions")
    ci.ids, ci.parts, ci._codes = ci.ids[~mask], ci.parts[~mask], None
    return removed


def configure_search(ci: CodeIndex) -> None:
    """Search-time parameters from the plan (nprobe, efSearch)."""
    if ci.plan.index_type in IVF_TYPES:
        ci.index.nprobe = ci.plan.nprobe
    elif ci.plan.index_type == HNSW and isinstance(ci.index, faiss.IndexHNSW):  # hnsw partials are flat
        ci.index.hnsw.efSearch = ci.plan.ef_search or HNSW_EF_SEARCH



# ---------------------------------------------------------------------------------------------
# Serialisation
# ---------------------------------------------------------------------------------------------
def code_index_from_bytes(plan: IndexPlan, bits: int, index_data: bytes, ids_data: bytes) -> CodeIndex:
    ids, parts = ids_from_bytes(ids_data)
    ci = CodeIndex(plan, bits, index_from_bytes(index_data, plan.binary_storage), ids, parts)
    if ci.ntotal != len(ids):
        raise IndexBuildError(f"index holds {ci.ntotal} items but ids.parquet {len(ids)}")
    configure_search(ci)
    return ci



def code_index_from_file(plan: IndexPlan, bits: int, index_path: str, ids_data: bytes,
                         mmap: bool = True) -> CodeIndex:
    """A CodeIndex over a local index file (memory-mapped by default; an on-disk plan's lists from the
    .ivfdata file beside it) and ids.parquet bytes."""
    ids, parts = ids_from_bytes(ids_data)
    ci = CodeIndex(plan, bits, index_from_file(index_path, plan.binary_storage, mmap, plan.ondisk), ids, parts)
    if ci.ntotal != len(ids):
        raise IndexBuildError(f"index {index_path} holds {ci.ntotal} items but ids.parquet {len(ids)}")
    configure_search(ci)
    return ci
