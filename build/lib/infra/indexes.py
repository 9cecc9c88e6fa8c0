"""faiss index I/O for code indexes: the index-choice rule, indexes built from stored codes (never
re-encoded), search in each index's own space, evaluation against the coder's exact ranking,
serialisation, and versioned publication under `indexes/<name>/` with a conditional `CURRENT` move.

Store layout of one index (prefixes from infra.layout; file names here):
    indexes/<name>/v000007/_claim.json   conditional create (If-None-Match): one writer per version
    indexes/<name>/v000007/index.faiss   faiss.serialize_index / serialize_index_binary bytes
    indexes/<name>/v000007/ids.parquet   position -> id int64, part int32 (the code shard it came from)
    indexes/<name>/v000007/trained.faiss IVF kinds only: the empty trained index refreshes add into
    indexes/<name>/v000007/build.json    written last: a version directory with build.json is complete
    indexes/<name>/CURRENT               {"version": 7, ...}; replaced only by put_if(if_match=etag read)
    indexes/<name>/_staging/<digest>/    one batch's partial index (index.faiss, ids.parquet, stats.json
                                         last), content-addressed so a rerun after a kill reuses it

Readers follow CURRENT only, so a version being written (or abandoned by a killed run, or by the loser
of a race) is never seen. faiss labels are positions 0..N-1; ids.parquet maps them to stable ids.

The index-choice rule (`choose_index`), in words:
  * Every option keeps all N codes in memory (N x bytes) plus 12 bytes per item for the position ->
    (id, part) arrays; the smallest option is always the flat one. If even that exceeds the memory
    budget, nothing fits: `IndexBudgetError` says by how much and what to change.
  * binary codes (symmetric coders: lsh, pca-rr, itq, llc): `IndexBinaryFlat` (exact Hamming) up to
    5M items, else `IndexBinaryIVF` (nlist ~ 4 sqrt(N), nprobe nlist/16, at least 16) when it fits.
  * ADC codes (asymmetric coders with codebooks): always an exact flat lookup-table scan over the
    stored codes. An IVF-PQ would need codes of residuals to coarse centroids, i.e. re-encoding,
    which this pipeline never does. Engine by coder: pq/opq -> faiss `IndexPQ` with the coder's PQ
    (`pq-lut`); DRQ scoring by inner product or by -L2 -> faiss `IndexResidualQuantizer` with
    codebooks s_m C and LUT search (`rq-lut`; for -L2 it stores ||z_hat||^2 as a float32 per item,
    +4 bytes, computed once at add time); anything else (DRQ 'cos', GSL, future coders) -> our chunked
    scan with `coder.scores` (`coder-lut`). Measured on 69,000 x 64-bit codes, one query at a time,
    one thread, shared machine: IndexPQ 0.85 ms vs OPQ coder.scores 1.85 ms; IndexResidualQuantizer
    1.7 ms (l2, ST_norm_float) vs ~760 ms for DRQ coder.scores (it reconstructs every item per call:
    built for query batches); top-10 equal to the coder's own up to ties in every case.
  * float features (the `float` coder): `IndexFlatL2` (exact) up to 1M items, else `IndexIVFFlat`
    (same nlist rule, nprobe nlist/16, at least 16) when it fits, else flat; `hnsw` (IndexHNSWFlat,
    M=32) only when asked for. IVF and HNSW cut search time, not memory: they hold every vector too.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import math
import re
import resource
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Sequence

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from infra import layout
from infra.store import PreconditionFailed, Store, StoreError

LOG = logging.getLogger(__name__)

FORMAT = 1  # of build.json / partial stats; bump when the partial format changes (it keys staging)

INDEX_FILE = "index.faiss"
IDS_FILE = "ids.parquet"
BUILD_FILE = "build.json"
TRAINED_FILE = "trained.faiss"
CLAIM_FILE = "_claim.json"
STATS_FILE = "stats.json"

KINDS = ("binary", "adc", "float")
BINARY_FLAT, BINARY_IVF = "binary-flat", "binary-ivf"
PQ_LUT, RQ_LUT, CODER_LUT = "pq-lut", "rq-lut", "coder-lut"
FLAT, IVF_FLAT, HNSW = "flat", "ivf-flat", "hnsw"
TYPES_BY_KIND = {"binary": (BINARY_FLAT, BINARY_IVF), "adc": (PQ_LUT, RQ_LUT, CODER_LUT),
                 "float": (FLAT, IVF_FLAT, HNSW)}
EXACT_TYPES = (BINARY_FLAT, PQ_LUT, RQ_LUT, CODER_LUT, FLAT)
IVF_TYPES = (BINARY_IVF, IVF_FLAT)
BINARY_STORAGE = (BINARY_FLAT, BINARY_IVF, CODER_LUT)  # faiss IndexBinary objects
REMOVABLE = (BINARY_FLAT, PQ_LUT, RQ_LUT, CODER_LUT, FLAT)  # remove_ids compacts, order kept

FLAT_MAX_ITEMS = {"binary": 5_000_000, "adc": 2**62, "float": 1_000_000}
ID_BYTES = 12  # int64 id + int32 part per item, held by every searcher
EXTRA_BYTES = {RQ_LUT: 4}  # rq-lut keeps a float32 norm per item when the coder scores by -L2
HNSW_M = 32
HNSW_EF_SEARCH = 128
EXACT_RECALL_GATE = 0.99  # an exact index that disagrees with its coder more than this is not published
CODER_LUT_CHUNK_BYTES = 64 * 2**20  # score-matrix chunk of the coder-lut scan


class IndexBudgetError(ValueError):
    """No index type fits the memory budget; the message says what is needed."""


class IndexBuildError(RuntimeError):
    """An index could not be built or failed its validation; nothing was published."""


# =============================================================================================
# The rule
# =============================================================================================
@dataclass(frozen=True)
class IndexPlan:
    """How one code index is built and searched, and what it costs in memory.

    Resident memory of a loaded index (`memory_bytes`), N = `n`, B = `bytes_per_item`:
      flat types (binary-flat, pq-lut, rq-lut, coder-lut, flat): N·B + 12·N (ids and parts),
          plus codebooks (< 1 MB); rq-lut 4 bytes more per item (a float32 norm, for -L2 scores).
          The final index is N·B whatever the build does.
      binary-ivf / ivf-flat: N·(B + 8) + 12·N + nlist·B (inverted lists store an 8-byte label).
      hnsw: N·(B + 8.5·M + 8) + 12·N (level-0 links are 2·M int32, upper levels ~6% more).
    Build: each batch task holds one batch of codes and its partial index (~3 × batch bytes); the
    merge holds the final index, one partial and the serialised bytes (~2 × memory_bytes).
    Search: flat types scan N·B bytes per query; IVF types nprobe/nlist of it; hnsw ~ef_search·M·B.
    """

    kind: str              # binary | adc | float
    index_type: str        # one of TYPES_BY_KIND[kind]
    n: int
    bytes_per_item: int
    memory_bytes: int
    exact: bool            # a flat scan: results equal the coder's own ranking (up to ties)
    nlist: int = 0
    nprobe: int = 0
    hnsw_m: int = 0
    ef_search: int = 0
    reason: str = ""

    @property
    def needs_training(self) -> bool:
        return self.index_type in IVF_TYPES

    @property
    def binary_storage(self) -> bool:
        return self.index_type in BINARY_STORAGE

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "IndexPlan":
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


def ivf_nlist(n: int) -> int:
    """Coarse centroids for N items: the power of two nearest 4·sqrt(N), within [16, 65536], halved
    until every centroid has >= 39 training points (faiss's k-means minimum)."""
    nlist = 2 ** int(round(math.log2(max(4 * math.sqrt(max(n, 1)), 1))))
    nlist = min(max(nlist, 16), 65536)
    while nlist > 1 and nlist * 39 > n:
        nlist //= 2
    return max(nlist, 1)


def ivf_nprobe(nlist: int) -> int:
    """Lists visited per query: nlist/16, at least 16 (capped at nlist)."""
    return min(nlist, max(16, nlist // 16))


def index_memory_bytes(index_type: str, n: int, bytes_per_item: int, nlist: int = 0,
                       hnsw_m: int = HNSW_M) -> int:
    """Resident bytes of a loaded index of this type (see `IndexPlan`)."""
    b = bytes_per_item + EXTRA_BYTES.get(index_type, 0)
    if index_type in IVF_TYPES:
        return n * (b + 8 + ID_BYTES) + nlist * b
    if index_type == HNSW:
        return int(n * (b + 8.5 * hnsw_m + 8 + ID_BYTES))
    return n * (b + ID_BYTES)


def choose_index(n: int, bytes_per_item: int, kind: str, memory_budget_bytes: int, *,
                 adc_engine: str = CODER_LUT, index_type: str | None = None,
                 flat_max_items: int | None = None) -> IndexPlan:
    """The written rule (module docstring): which index for N codes of `bytes_per_item` bytes.

    Args:
        n: items to index (> 0). bytes_per_item: stored bytes per item at the chosen length.
        kind: 'binary' (Hamming), 'adc' (asymmetric lookup tables) or 'float' (raw vectors).
        memory_budget_bytes: resident bytes the loaded index may take.
        adc_engine: the ADC type for this coder (`adc_engine_for`).
        index_type: force a type of this kind (still budget-checked).
        flat_max_items: above this N the approximate type is preferred (default FLAT_MAX_ITEMS).

    Raises IndexBudgetError when nothing fits. Pure and O(1).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if n <= 0:
        raise ValueError(f"nothing to index (n={n})")
    if bytes_per_item <= 0:
        raise ValueError(f"bytes_per_item must be positive, got {bytes_per_item}")
    flat = {"binary": BINARY_FLAT, "adc": adc_engine, "float": FLAT}[kind]
    approx = {"binary": BINARY_IVF, "adc": None, "float": IVF_FLAT}[kind]
    limit = flat_max_items if flat_max_items is not None else FLAT_MAX_ITEMS[kind]
    if index_type is not None:
        if index_type not in TYPES_BY_KIND[kind]:
            raise ValueError(f"index type {index_type!r} does not serve {kind} codes; "
                             f"choose one of {TYPES_BY_KIND[kind]}")
        candidates = [(index_type, "asked for")]
    elif approx is None:
        candidates = [(flat, "ADC codes are searched by an exact flat LUT scan")]
    elif n <= limit:
        candidates = [(flat, f"N={n:,} <= {limit:,}: exact flat scan")]
    else:
        candidates = [(approx, f"N={n:,} > {limit:,}: approximate search"),
                      (flat, f"N={n:,} > {limit:,} but {approx} exceeds the budget: exact flat scan")]
    plans = [_plan(t, n, bytes_per_item, kind, why) for t, why in candidates]
    for p in plans:
        if p.memory_bytes <= memory_budget_bytes:
            return p
    need = min(p.memory_bytes for p in plans)
    raise IndexBudgetError(
        f"N={n:,} {kind} codes of {bytes_per_item} bytes needs >= {need:,} bytes ({human_bytes(need)}) "
        f"for {plans[-1].index_type}, budget {memory_budget_bytes:,} ({human_bytes(memory_budget_bytes)}); "
        f"raise --memory-budget or use a shorter code")


def _plan(index_type: str, n: int, b: int, kind: str, reason: str) -> IndexPlan:
    nlist = ivf_nlist(n) if index_type in IVF_TYPES else 0
    return IndexPlan(
        kind=kind, index_type=index_type, n=n, bytes_per_item=b,
        memory_bytes=index_memory_bytes(index_type, n, b, nlist, HNSW_M), exact=index_type in EXACT_TYPES,
        nlist=nlist, nprobe=ivf_nprobe(nlist) if nlist else 0,
        hnsw_m=HNSW_M if index_type == HNSW else 0, ef_search=HNSW_EF_SEARCH if index_type == HNSW else 0,
        reason=reason)


def shards_per_task(mean_rows: float, bytes_per_item: int, memory_budget_bytes: int, max_workers: int,
                    n_shards: int) -> int:
    """Shards per batch task: a batch's codes (~3 copies while it is built) times `max_workers`
    concurrent tasks stays within a quarter of the budget (the rest is the merge's), and there are at
    least `max_workers` tasks when there are that many shards. Pure."""
    row_bytes = max(1, bytes_per_item + ID_BYTES)
    per_task_budget = memory_budget_bytes / (4 * 3 * max(1, max_workers))
    per = max(1, int(per_task_budget // max(1.0, mean_rows * row_bytes)))
    return max(1, min(per, -(-n_shards // max(1, max_workers))))


_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20, "mib": 2**20,
          "g": 2**30, "gb": 2**30, "gib": 2**30, "t": 2**40, "tb": 2**40, "tib": 2**40}


def parse_bytes(value: str | int) -> int:
    """'2GB' / '512MiB' / '300m' / 1000 -> bytes. Units are powers of 1024 (GB = GiB)."""
    if isinstance(value, (int, np.integer)):
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read a size from {value!r}: use e.g. 2GB, 512MB, 1500000")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


# =============================================================================================
# Coders -> index kinds and spaces
# =============================================================================================
def index_kind(coder: Any) -> str:
    """'binary' for symmetric (Hamming) coders, 'float' for the float ceiling, else 'adc'."""
    if coder.symmetric:
        return "binary"
    return "float" if coder.method == "float" else "adc"


def adc_engine_for(coder: Any, bits: int) -> str:
    """The ADC type for an asymmetric coder: faiss IndexPQ when it exposes its PQ (pq, opq),
    faiss IndexResidualQuantizer when it scores an embedded query against sum_m s_m C[b_m] by inner
    product or -L2 (DRQ, score 'ip' / 'l2'), else the generic coder-lut scan."""
    if coder.method in ("pq", "opq") and hasattr(coder, "pq") and hasattr(coder, "to_pq_space"):
        return PQ_LUT
    if additive_codebooks(coder, bits) is not None:
        return RQ_LUT
    return CODER_LUT


def additive_codebooks(coder: Any, bits: int) -> tuple[np.ndarray, int, str] | None:
    """((levels, K, d) float32 codebooks s_m·C, bits per level, 'ip' | 'l2') when `coder` is a DRQ
    coder whose score is <embed(q), z_hat> or -||embed(q) - z_hat||^2 with z_hat = sum_m s_m C[b_m];
    None otherwise (another score, or a coder that does not expose these)."""
    if getattr(coder, "method", None) != "drq":
        return None
    cfg = getattr(coder, "config", None)
    score = getattr(cfg, "score", None)
    if score not in ("ip", "l2"):
        return None
    try:
        nb = int(cfg.bits_per_level)
        levels = bits // nb
        net = coder.net
        cb = net.codebook.detach().cpu().numpy().astype(np.float32)
        s = net.scales(levels).detach().cpu().numpy().astype(np.float32).reshape(-1)
    except (AttributeError, TypeError, RuntimeError):
        return None
    if len(s) != levels or bits % nb or not hasattr(coder, "embed"):
        return None
    return np.stack([s[m] * cb for m in range(levels)]), nb, score


def prefix(coder: Any, codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes at `bits` from full-length stored codes (no copy at full length)."""
    if bits == coder.full_bits:
        return np.ascontiguousarray(codes)
    return coder.prefix_codes(codes, bits)


def as_full_length(coder: Any, codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes kept at `bits` -> full-length codes for `coder.scores` (whose contract takes stored,
    full-length codes and cuts the prefix itself): zero bytes appended, which the prefix drops.
    A view when already full; else one (n, full bytes) copy."""
    full = coder.bytes_per_item()
    if codes.shape[1] == full:
        return codes
    out = np.zeros((len(codes), full), dtype=np.uint8)
    out[:, :codes.shape[1]] = codes
    return out


def prepare_queries(plan: IndexPlan, coder: Any, bits: int, queries: np.ndarray) -> np.ndarray:
    """Float query features (nq, D) -> queries in the index's space: packed codes (binary), the PQ's
    space (pq-lut), DRQ embeddings (rq-lut), or the features themselves. Cost: one coder encode."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    if q.ndim == 1:
        q = q[None, :]
    t = plan.index_type
    if t in (BINARY_FLAT, BINARY_IVF):
        return prefix(coder, coder.encode(q), bits)
    if t == PQ_LUT:
        return np.ascontiguousarray(coder.to_pq_space(q), dtype=np.float32)
    if t == RQ_LUT:
        return np.ascontiguousarray(coder.embed(q), dtype=np.float32)
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


def new_index(plan: IndexPlan, coder: Any, bits: int, trained: bytes | None = None,
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
        src = coder.pq
        idx = faiss.IndexPQ(src.d, src.M, src.nbits)
        faiss.copy_array_to_vector(faiss.vector_to_array(src.centroids), idx.pq.centroids)
        idx.is_trained = True
        if idx.code_size != b:
            raise IndexBuildError(f"pq-lut: PQ code size {idx.code_size} != stored {b} bytes")
        return idx
    if t == RQ_LUT:
        got = additive_codebooks(coder, bits)
        if got is None:
            raise IndexBuildError(f"rq-lut: coder {coder.method} exposes no additive codebooks")
        cbs, nb, score = got
        levels, k, d = cbs.shape
        aq = faiss.AdditiveQuantizer
        # ip: LUT sums only; l2: ||q||^2 - 2 LUT + the stored float32 norm of z_hat
        metric, st = ((faiss.METRIC_INNER_PRODUCT, aq.ST_LUT_nonorm) if score == "ip"
                      else (faiss.METRIC_L2, aq.ST_norm_float))
        idx = faiss.IndexResidualQuantizer(d, levels, nb, metric, st)
        faiss.copy_array_to_vector(np.ascontiguousarray(cbs.reshape(-1)), idx.rq.codebooks)
        idx.rq.is_trained = True
        idx.is_trained = True
        if (levels * nb + 7) // 8 != b:
            raise IndexBuildError(f"rq-lut: {levels} levels of {nb} bits != stored {b} bytes")
        return idx
    d = b // 4
    if t == HNSW and final:
        idx = faiss.IndexHNSWFlat(d, plan.hnsw_m or HNSW_M)
        idx.hnsw.efSearch = plan.ef_search or HNSW_EF_SEARCH
        return idx
    return faiss.IndexFlatL2(d)


def train_ivf(plan: IndexPlan, coder: Any, bits: int, sample_codes: np.ndarray) -> bytes:
    """Train the coarse quantizer of an IVF type on full-length sample codes; returns the empty
    trained index's bytes. Cost: k-means of nlist centroids on the sample (faiss, OpenMP)."""
    if plan.index_type == BINARY_IVF:
        d = 8 * plan.bytes_per_item
        idx = faiss.IndexBinaryIVF(faiss.IndexBinaryFlat(d), d, plan.nlist)
        idx.train(prefix(coder, sample_codes, bits))
    elif plan.index_type == IVF_FLAT:
        d = plan.bytes_per_item // 4
        idx = faiss.IndexIVFFlat(faiss.IndexFlatL2(d), d, plan.nlist, faiss.METRIC_L2)
        idx.cp.seed = 1234
        idx.train(coder.decode(sample_codes))
    else:
        raise ValueError(f"{plan.index_type} needs no training")
    idx.nprobe = plan.nprobe
    return index_to_bytes(idx)


def add_codes(index: Any, plan: IndexPlan, coder: Any, bits: int, full_codes: np.ndarray) -> None:
    """Append stored full-length codes (n, B_full) uint8 in order; positions continue from ntotal.
    Cost: a copy of the codes (float kinds: decoded to vectors; IVF: one coarse assignment each)."""
    codes = prefix(coder, full_codes, bits)
    t = plan.index_type
    if t == RQ_LUT and index.rq.search_type != faiss.AdditiveQuantizer.ST_LUT_nonorm:
        index.add_sa_codes(_rq_codes_with_norms(index.rq, codes))
    elif t in (PQ_LUT, RQ_LUT):
        index.add_sa_codes(np.ascontiguousarray(codes))
    elif t in BINARY_STORAGE:
        index.add(np.ascontiguousarray(codes))
    else:
        index.add(np.ascontiguousarray(coder.decode(codes), dtype=np.float32))


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
    rq = getattr(index, "rq", None)
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
    elif ci.plan.index_type == HNSW and hasattr(ci.index, "hnsw"):  # hnsw partials are flat
        ci.index.hnsw.efSearch = ci.plan.ef_search or HNSW_EF_SEARCH


# =============================================================================================
# Search
# =============================================================================================
def search_prepared(ci: CodeIndex, coder: Any, q: np.ndarray, k: int,
                    exhaustive: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Top-k for queries already in the index's space (`prepare_queries`): (scores (nq, k) float32,
    higher is better, positions (nq, k) int64, -1 where fewer than k items). `exhaustive` visits
    every IVF list (exact for IVF types; HNSW searches its flat storage)."""
    t = ci.plan.index_type
    k = max(1, int(k))
    if t == CODER_LUT:
        return _coder_lut_search(ci, coder, q, k)
    if exhaustive and t in IVF_TYPES:
        old = ci.index.nprobe
        ci.index.nprobe = ci.plan.nlist
        try:
            d, i = ci.index.search(q, k)
        finally:
            ci.index.nprobe = old
    elif exhaustive and t == HNSW:
        d, i = faiss.downcast_index(ci.index.storage).search(q, k)
    else:
        d, i = ci.index.search(q, k)
    ip = getattr(ci.index, "metric_type", None) == faiss.METRIC_INNER_PRODUCT
    scores = d.astype(np.float32) if ip else -d.astype(np.float32)
    i = i.astype(np.int64)
    scores[i < 0] = -np.inf
    return scores, i


def _coder_lut_search(ci: CodeIndex, coder: Any, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k with `coder.scores` over the stored codes in chunks (memory nq · chunk · 4 bytes),
    keeping a running top-k; ties broken by lower position."""
    codes = ci.codes()
    n, nq = len(codes), len(q)
    chunk = max(1024, CODER_LUT_CHUNK_BYTES // (4 * max(1, nq)))
    best_s = np.full((nq, 0), -np.inf, dtype=np.float32)
    best_i = np.zeros((nq, 0), dtype=np.int64)
    for start in range(0, n, chunk):
        s = coder.scores(q, as_full_length(coder, codes[start:start + chunk], ci.bits), ci.bits)
        s = s.astype(np.float32, copy=False)
        kk = min(k, s.shape[1])
        part = np.argpartition(-s, kk - 1, axis=1)[:, :kk] if kk < s.shape[1] else \
            np.tile(np.arange(s.shape[1]), (nq, 1))
        cs = np.concatenate([best_s, np.take_along_axis(s, part, axis=1)], axis=1)
        ci_ = np.concatenate([best_i, part.astype(np.int64) + start], axis=1)
        order = np.lexsort((ci_, -cs), axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(cs, order, axis=1), np.take_along_axis(ci_, order, axis=1)
    if best_s.shape[1] < k:
        pad = k - best_s.shape[1]
        best_s = np.pad(best_s, ((0, 0), (0, pad)), constant_values=-np.inf)
        best_i = np.pad(best_i, ((0, 0), (0, pad)), constant_values=-1)
    return best_s, best_i


def reference_scores(ci: CodeIndex, coder: Any, q: np.ndarray, positions: np.ndarray,
                     q_features: np.ndarray | None = None) -> np.ndarray:
    """The coder's own score of each query against the codes at `positions` (nq, k) (-inf at -1):
    Hamming for binary codes, coder.scores for ADC (needs the float `q_features`), -L2 for float.
    Cost: one score per (query, returned item); ADC scores every query against the union of the
    returned items in one call (nq x |union| floats)."""
    t = ci.plan.index_type
    out = np.full(positions.shape, -np.inf, dtype=np.float32)
    ok = positions >= 0
    if not ok.any():
        return out
    uniq, inv = np.unique(positions[ok], return_inverse=True)
    rows = np.nonzero(ok)[0]
    if t in (PQ_LUT, RQ_LUT, CODER_LUT):
        s = coder.scores(q_features, as_full_length(coder, ci.codes()[uniq], ci.bits), ci.bits)
        out[ok] = s[rows, inv]
    elif t in (BINARY_FLAT, BINARY_IVF):
        codes = stored_codes_at(ci, uniq)[inv]
        out[ok] = -np.unpackbits(np.bitwise_xor(codes, q[rows]), axis=1).sum(axis=1)
    else:
        vecs = stored_vectors_at(ci, uniq)[inv].astype(np.float64)
        out[ok] = -((vecs - q[rows]) ** 2).sum(axis=1)
    return out


def stored_codes_at(ci: CodeIndex, pos: np.ndarray) -> np.ndarray:
    """(len(pos), B) uint8 codes stored at `pos` of a binary index (IVF: via a temporary direct map,
    8 bytes per item while it exists)."""
    if ci.plan.index_type in (BINARY_FLAT, CODER_LUT):
        return ci.codes()[pos]
    return _reconstruct_ivf(ci.index, pos)


def stored_vectors_at(ci: CodeIndex, pos: np.ndarray) -> np.ndarray:
    """(len(pos), D) float32 vectors stored at `pos` of a float index (flat, IVF-Flat, HNSW)."""
    if ci.plan.index_type == IVF_FLAT:
        return _reconstruct_ivf(ci.index, pos)
    return np.stack([ci.index.reconstruct(int(p)) for p in pos])


_DIRECT_MAP_LOCK = threading.Lock()


def _reconstruct_ivf(idx: Any, pos: np.ndarray) -> np.ndarray:
    with _DIRECT_MAP_LOCK:  # the direct map is index state: one builder at a time
        idx.make_direct_map()
        try:
            return np.stack([idx.reconstruct(int(p)) for p in pos])
        finally:
            idx.set_direct_map_type(faiss.DirectMap.NoMap)


# =============================================================================================
# Evaluation: tie-aware recall@k against the exact ranking, latency per query
# =============================================================================================
def tie_aware_recall(returned_scores: np.ndarray, kth_scores: np.ndarray, k: int,
                     rel_tol: float = 1e-4) -> float:
    """Mean fraction of the k returned items whose exact score reaches the exact k-th best score
    (minus rel_tol·max(1, |kth|) for float rounding): 1.0 means 'the exact top-k up to ties'."""
    kth = kth_scores[:, None]
    tol = rel_tol * np.maximum(1.0, np.abs(kth))
    return float((returned_scores[:, :k] >= kth - tol).sum(axis=1).mean() / k)


def evaluate(ci: CodeIndex, coder: Any, positions: np.ndarray, features: np.ndarray | None,
             k: int = 10, latency_queries: int = 200) -> dict[str, Any]:
    """Recall@k and latency of `ci` with database items as queries.

    `positions` (nq,): the items used as queries; binary and float indexes use their stored codes /
    vectors as queries (what encoding their features gives), ADC indexes need their `features`
    (nq, D). The exact ranking is the coder's own: Hamming / coder.scores / L2 over every stored
    code (exhaustive search for IVF and HNSW). Latency: one query at a time through
    prepare + search on one faiss thread, first `latency_queries` queries, p50/p99 in ms.
    Cost: the exact search, nq · N score evaluations, dominates.
    """
    t = ci.plan.index_type
    nq = len(positions)
    if nq == 0:
        return {"queries": 0}
    kk = min(k, ci.ntotal)
    raw = None
    if t in (BINARY_FLAT, BINARY_IVF):
        q = stored_codes_at(ci, positions)
    elif t in (FLAT, IVF_FLAT, HNSW):
        q = stored_vectors_at(ci, positions).astype(np.float32)
    else:
        if features is None:
            return {"queries": 0, "skipped": "no stored features for the sampled items"}
        raw = np.ascontiguousarray(features, dtype=np.float32)
        q = prepare_queries(ci.plan, coder, ci.bits, raw)
    # exact reference: k-th best exact score per query
    if t in EXACT_TYPES:
        kth = _exact_kth(ci, coder, q, raw, kk)
    else:
        ex_s, _ = search_prepared(ci, coder, q, kk, exhaustive=True)
        kth = ex_s[:, kk - 1]
    _, pos = search_prepared(ci, coder, q, kk)
    ref = reference_scores(ci, coder, q, pos, raw)
    recall = tie_aware_recall(ref, kth, kk)
    lat = []
    src = raw if raw is not None else q
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # one core per query: OpenMP barriers on a shared machine add 10-40x noise
    try:
        for r in range(min(latency_queries, nq)):
            t0 = time.perf_counter()
            qq = prepare_queries(ci.plan, coder, ci.bits, src[r:r + 1]) if raw is not None else src[r:r + 1]
            search_prepared(ci, coder, qq, kk)
            lat.append((time.perf_counter() - t0) * 1e3)
    finally:
        faiss.omp_set_num_threads(threads)
    return {"queries": int(nq), "k": int(kk), f"recall_at_{k}": round(recall, 5),
            "p50_ms": round(float(np.percentile(lat, 50)), 4),
            "p99_ms": round(float(np.percentile(lat, 99)), 4), "latency_threads": 1,
            "latency_queries": len(lat), "query_source": "features" if raw is not None else "stored codes"}


def _exact_kth(ci: CodeIndex, coder: Any, q: np.ndarray, raw: np.ndarray | None, k: int) -> np.ndarray:
    """k-th best exact score per query by the coder's own scoring over every stored code."""
    from encoders.metrics import hamming_scores

    codes = ci.codes()
    t = ci.plan.index_type
    full = as_full_length(coder, codes, ci.bits) if t not in (BINARY_FLAT, FLAT) else codes
    out = np.empty(len(q), dtype=np.float32)
    step = max(1, CODER_LUT_CHUNK_BYTES // (4 * max(1, len(codes))))
    for i in range(0, len(q), step):
        if t == BINARY_FLAT:
            s = hamming_scores(q[i:i + step], codes)
        elif t == FLAT:
            s = coder.scores(q[i:i + step], codes, ci.bits)
        else:
            s = coder.scores(raw[i:i + step], full, ci.bits)
        out[i:i + step] = -np.partition(-s, k - 1, axis=1)[:, k - 1]
    return out


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (ru_maxrss; shared by concurrent threads)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


# =============================================================================================
# Serialisation
# =============================================================================================
def index_to_bytes(index: Any) -> bytes:
    """faiss bytes of an Index or IndexBinary. Cost: one copy of the index (~10-40 ms per 3 MB)."""
    if isinstance(index, faiss.IndexBinary):
        return faiss.serialize_index_binary(index).tobytes()
    return faiss.serialize_index(index).tobytes()


def index_from_bytes(data: bytes, binary: bool) -> Any:
    arr = np.frombuffer(data, dtype=np.uint8)
    return faiss.deserialize_index_binary(arr) if binary else faiss.deserialize_index(arr)


def ids_bytes(ids: np.ndarray, parts: np.ndarray) -> bytes:
    """ids.parquet: position -> (id int64, part int32)."""
    t = pa.table({"id": pa.array(np.asarray(ids, dtype=np.int64)), "part": pa.array(np.asarray(parts, dtype=np.int32))})
    buf = io.BytesIO()
    pq.write_table(t, buf, compression="zstd")
    return buf.getvalue()


def ids_from_bytes(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    t = pq.read_table(io.BytesIO(data))
    return (t.column("id").to_numpy().astype(np.int64, copy=False),
            t.column("part").to_numpy().astype(np.int32, copy=False))


def code_index_from_bytes(plan: IndexPlan, bits: int, index_data: bytes, ids_data: bytes) -> CodeIndex:
    ids, parts = ids_from_bytes(ids_data)
    ci = CodeIndex(plan, bits, index_from_bytes(index_data, plan.binary_storage), ids, parts)
    if ci.ntotal != len(ids):
        raise IndexBuildError(f"index holds {ci.ntotal} items but ids.parquet {len(ids)}")
    configure_search(ci)
    return ci


# =============================================================================================
# Versions, staging and CURRENT
# =============================================================================================
def version_key(name: str, version: int, filename: str) -> str:
    return layout.index_version_prefix(name, version) + filename


def staging_prefix(name: str, digest: str) -> str:
    return f"{layout.index_prefix(name)}_staging/{digest}/"


def digest_of(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]


@dataclass(frozen=True)
class Current:
    """What CURRENT names, and the ETag it was read with (the If-Match of the next move)."""

    version: int
    etag: str
    pointer: dict[str, Any]


def read_current(store: Store, name: str) -> Current | None:
    """CURRENT of index `name`, or None if it was never published. One GET."""
    try:
        data, etag = store.read_with_etag(layout.index_current_key(name))
    except StoreError as e:
        if str(e).startswith("no object"):
            return None
        raise
    pointer = json.loads(data)
    return Current(int(pointer["version"]), etag, pointer)


def read_build(store: Store, name: str, version: int) -> dict[str, Any]:
    return json.loads(store.read_bytes(version_key(name, version, BUILD_FILE)))


def claim_version(store: Store, name: str, after: int, build_id: str, max_tries: int = 1000) -> int:
    """Claim the first free version number > `after` by a conditional create of its _claim.json
    (If-None-Match), so two writers never share a version directory. Versions claimed by killed or
    losing runs are skipped (never published). Returns the claimed number."""
    v = after + 1
    for _ in range(max_tries):
        body = json.dumps({"build_id": build_id, "claimed_at": time.time()}).encode()
        try:
            store.put_if(version_key(name, v, CLAIM_FILE), body, if_none_match=True)
            return v
        except PreconditionFailed:
            v += 1
    raise IndexBuildError(f"could not claim a version of {name} after {max_tries} tries from v{after + 1}")


def write_version_files(store: Store, name: str, version: int, ci: CodeIndex,
                        trained: bytes | None = None) -> dict[str, int]:
    """Write index.faiss, ids.parquet (and trained.faiss) into a claimed version. build.json, the
    completion marker, is written separately (`write_build`). Returns the bytes written per file."""
    data = index_to_bytes(ci.index)
    store.write_bytes(version_key(name, version, INDEX_FILE), data)
    ids = ids_bytes(ci.ids, ci.parts)
    store.write_bytes(version_key(name, version, IDS_FILE), ids)
    sizes = {"index_bytes": len(data), "ids_bytes": len(ids)}
    if trained is not None:
        store.write_bytes(version_key(name, version, TRAINED_FILE), trained)
        sizes["trained_bytes"] = len(trained)
    return sizes


def write_build(store: Store, name: str, version: int, build: dict[str, Any]) -> None:
    store.write_bytes(version_key(name, version, BUILD_FILE),
                      json.dumps(build, indent=1, sort_keys=True, default=str).encode())


def load_version(store: Store, name: str, version: int,
                 build: dict[str, Any] | None = None) -> tuple[CodeIndex, dict[str, Any]]:
    """(CodeIndex, build.json) of a complete version. Cost: reads index.faiss + ids.parquet,
    transient memory ~2 × the index (the bytes and the index)."""
    build = build or read_build(store, name, version)
    plan = IndexPlan.from_dict(build["plan"])
    ci = code_index_from_bytes(plan, int(build["bits"]), store.read_bytes(version_key(name, version, INDEX_FILE)),
                               store.read_bytes(version_key(name, version, IDS_FILE)))
    return ci, build


def commit_current(store: Store, name: str, version: int, expected: Current | None, build_id: str) -> Current:
    """Move CURRENT to `version` only if it still is what the caller read (`expected`; None: absent).
    Raises PreconditionFailed when another writer moved it first."""
    pointer = {"version": version, "name": name, "build_id": build_id, "published_at": time.time()}
    data = json.dumps(pointer, sort_keys=True).encode()
    key = layout.index_current_key(name)
    if expected is None:
        etag = store.put_if(key, data, if_none_match=True)
    else:
        etag = store.put_if(key, data, if_match=expected.etag)
    return Current(version, etag, pointer)


def discard_version(store: Store, name: str, version: int) -> int:
    """Delete an unpublished version directory (ours, after losing the race). Returns objects deleted."""
    return store.delete_prefix(layout.index_version_prefix(name, version))


def new_build_id() -> str:
    return f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"


# =============================================================================================
# Refresh planning (pure)
# =============================================================================================
@dataclass(frozen=True)
class RefreshDelta:
    """What changed in a codes prefix since a version: shard refs to read and parts to drop."""

    added: list  # ShardRef: new keys
    changed: list  # ShardRef: same key, new checksum (its old rows are removed, the shard re-read)
    removed: list[dict[str, Any]]  # build.json inputs/invalid entries whose key disappeared
    unchanged: int
    drop_parts: list[int]  # parts whose indexed rows must go (changed or removed shards that had rows)

    @property
    def empty(self) -> bool:
        return not (self.added or self.changed or self.removed)

    @property
    def to_read(self) -> list:
        return sorted([*self.added, *self.changed], key=lambda r: r.part)


def check_shrink(delta: RefreshDelta, allow_removal: str | None) -> None:
    """Refuse (IndexBuildError) a refresh that would drop indexed rows because their code shards
    disappeared, unless `allow_removal` gives the reason (recorded in build.json). A failed or
    interrupted rewrite must never shrink a published index silently. Pure, O(removed shards)."""
    gone = [i for i in delta.removed if "reason" not in i]
    if gone and not (allow_removal and allow_removal.strip()):
        keys = ", ".join(i["key"] for i in gone[:3]) + (f" and {len(gone) - 3} more" if len(gone) > 3 else "")
        raise IndexBuildError(
            f"{len(gone)} indexed code shard(s) are gone from the store ({keys}): refreshing would drop their "
            f"rows. Re-encode them (`codeshard encode`), or, if the removal is intended, refresh with an "
            f"explicit reason (allow_removal), which build.json records")


def plan_refresh(inputs: Sequence[dict[str, Any]], listing: Sequence[Any]) -> RefreshDelta:
    """Compare a version's inputs (build.json 'inputs' + 'invalid', each with key, part, checksum;
    invalid ones carry a 'reason' and have no rows) with the current listing (ShardRefs). Pure,
    O(shards)."""
    known = {i["key"]: i for i in inputs}
    added, changed, unchanged, drop = [], [], 0, set()
    for ref in listing:
        old = known.get(ref.key)
        if old is None:
            added.append(ref)
        elif old["checksum"] != ref.checksum:
            changed.append(ref)
            if "reason" not in old:
                drop.add(int(old["part"]))
        else:
            unchanged += 1
    keys = {r.key for r in listing}
    removed = [i for i in inputs if i["key"] not in keys]
    drop |= {int(i["part"]) for i in removed if "reason" not in i}
    return RefreshDelta(added, changed, removed, unchanged, sorted(drop))
