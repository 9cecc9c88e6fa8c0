"""The index plan, pure: which faiss index serves N stored codes under a memory budget, what it costs,
how batches are sized, what a refresh must read and drop. No faiss, no I/O; O(1) or O(shards).

The index-choice rule (`choose_index`), in words:
  * Every option keeps all N codes in memory (N x bytes) plus 12 bytes per item for the position ->
    (id, part) arrays; the smallest option is always the flat one. If even that exceeds the memory
    budget, nothing fits: `IndexBudgetError` says by how much and what to change.
  * binary codes (symmetric coders: lsh, pca-rr, itq, llc): `IndexBinaryFlat` (exact Hamming) up to
    5M items, else `IndexBinaryIVF` when it fits.
  * ADC codes (asymmetric coders with codebooks): an exact flat lookup-table scan over the stored
    codes up to 5M items, by coder: pq/opq -> faiss `IndexPQ` with the coder's PQ (`pq-lut`); DRQ
    scoring by inner product or -L2 -> `IndexResidualQuantizer` with codebooks s_m C (`rq-lut`; for
    -L2 it stores ||z_hat||^2 as a float32 per item, +4 bytes); anything else (DRQ 'cos', GSL) -> our
    chunked scan with `coder.scores` (`coder-lut`, never approximate). Above 5M, pq-lut becomes
    `IndexIVFPQ` (`ivf-pq`) and rq-lut `IndexIVFResidualQuantizer` (`ivf-rq`), both with
    by_residual=False: the inverted lists hold the stored codes themselves (`add_sa_codes`), the
    coarse quantizer only routes, so nothing is re-encoded and nprobe = nlist is the flat scan.
  * float features (the `float` coder): `IndexFlatL2` (exact) up to 1M items, else `IndexIVFFlat`
    when it fits, else flat; `hnsw` (IndexHNSWFlat, M=32) only when asked for.
  * IVF merge (`choose_merge`): ivf-flat / ivf-pq / ivf-rq partials are merged on disk (faiss
    `merge_ondisk`: the lists go into one index.ivfdata file, never all in RAM) when asked, or, when
    not asked, when the in-memory merge (~2 x memory_bytes) would exceed the budget. binary-ivf
    always merges in memory (faiss has no on-disk lists for IndexBinaryIVF).
  * IVF types: nlist ~ 4 sqrt(N) (`ivf_nlist`); nprobe starts at nlist/16 (at least 16) and the build
    tunes it to a recall target (`tasks/index.py`), recorded in build.json. IVF and HNSW cut search
    time, not memory: they hold every code too.
  * Routing of added codes (`ivf_routing`): ivf-pq / ivf-rq with nlist >= 8192 find each code's list
    through an HNSW graph over the centroids (M=32, efSearch=32) instead of the exact scan of all
    nlist (which costs N·nlist·d: its cost per item grows with sqrt(N); the graph's stays flat, and
    is the cheaper one from 8192 lists: BENCHMARKS.md section 11); a code whose nearest centroid
    the graph misses lands in a near list, which the measured recall includes.

An index type is given either by our name (`ivf-pq`) or as a faiss `index_factory` string
(`IVF4096,PQ8x8`, `BIVF1024`, `HNSW32,Flat`); the codec part of a factory string must be the stored
codes' own (`parse_index_type`): the index is built from the codes, never by encoding again.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import re
from dataclasses import dataclass
from typing import Any, Sequence

KINDS = ("binary", "adc", "float")
BINARY_FLAT, BINARY_IVF = "binary-flat", "binary-ivf"
PQ_LUT, RQ_LUT, CODER_LUT = "pq-lut", "rq-lut", "coder-lut"
IVF_PQ, IVF_RQ = "ivf-pq", "ivf-rq"
FLAT, IVF_FLAT, HNSW = "flat", "ivf-flat", "hnsw"
TYPES_BY_KIND = {"binary": (BINARY_FLAT, BINARY_IVF), "adc": (PQ_LUT, RQ_LUT, CODER_LUT, IVF_PQ, IVF_RQ),
                 "float": (FLAT, IVF_FLAT, HNSW)}
EXACT_TYPES = (BINARY_FLAT, PQ_LUT, RQ_LUT, CODER_LUT, FLAT)
IVF_TYPES = (BINARY_IVF, IVF_FLAT, IVF_PQ, IVF_RQ)
ONDISK_TYPES = (IVF_FLAT, IVF_PQ, IVF_RQ)  # faiss OnDiskInvertedLists serve float-index IVF only
BINARY_STORAGE = (BINARY_FLAT, BINARY_IVF, CODER_LUT)  # faiss IndexBinary objects
REMOVABLE = (BINARY_FLAT, PQ_LUT, RQ_LUT, CODER_LUT, FLAT)  # remove_ids compacts, order kept
APPROX_OF = {BINARY_FLAT: BINARY_IVF, PQ_LUT: IVF_PQ, RQ_LUT: IVF_RQ, FLAT: IVF_FLAT}  # coder-lut: none
FLAT_OF = {v: k for k, v in APPROX_OF.items()}

FLAT_MAX_ITEMS = {"binary": 5_000_000, "adc": 5_000_000, "float": 1_000_000}
ID_BYTES = 12  # int64 id + int32 part per item, held by every searcher
EXTRA_BYTES = {RQ_LUT: 4, IVF_RQ: 4}  # a float32 norm per item when the coder scores by -L2
HNSW_M = 32
HNSW_EF_SEARCH = 128
RECALL_TARGET = 0.95  # nprobe / efSearch are tuned to the smallest value reaching this recall@10
# The coarse quantizer's k-means sample and iterations (bench/ivf_train.py measured the choice):
IVF_TRAIN_PER_LIST = 64       # sample rows per list (faiss needs >= 39; it subsamples above 256)
IVF_TRAIN_MAX_ROWS = 262_144  # at most this many rows, whatever nlist
IVF_TRAIN_NITER = 10          # Lloyd iterations
# Routing codes to lists by an HNSW graph over the centroids (module docstring; BENCHMARKS.md section 11):
ROUTE_HNSW_MIN_NLIST = 8192
ROUTE_HNSW_M, ROUTE_HNSW_EF = 32, 32


class IndexBudgetError(ValueError):
    """No index type fits the memory budget; the message says what is needed."""


class IndexBuildError(RuntimeError):
    """An index could not be built or failed its validation; nothing was published."""


@dataclass(frozen=True)
class IndexPlan:
    """How one code index is built and searched, and what it costs in memory.

    Resident memory of a loaded index (`memory_bytes`), N = `n`, B = `bytes_per_item`:
      flat types (binary-flat, pq-lut, rq-lut, coder-lut, flat): N·B + 12·N (ids and parts),
          plus codebooks (< 1 MB); rq-lut / ivf-rq 4 bytes more per item (a float32 norm, -L2).
      IVF types: N·(B + 8) + 12·N + nlist·B (inverted lists store an 8-byte label). Loaded
          memory-mapped (searchers), the N·(B + 8) part is page cache, not the process's own.
      hnsw: N·(B + 8.5·M + 8) + 12·N (level-0 links are 2·M int32, upper levels ~6% more).
    Build: each batch task holds one batch of codes and its partial index (~3 × batch bytes); the
    merge holds the final index, one partial and the serialised bytes (~2 × memory_bytes).
    Search: flat types scan N·B bytes per query; IVF types ~nprobe/nlist of it; hnsw ~ef_search·M·B.
    `factory`: the faiss index_factory string of the index (recorded in build.json).
    `ondisk`: the partials are merged on disk and the lists published as index.ivfdata beside
    index.faiss (`choose_merge`); the merge then holds one partial's pages and the ids, not the lists.
    `routing`: how added codes find their list ('hnsw': `ivf_routing`; '' or 'exact': a scan of
    every centroid, what plans recorded before routing existed mean).
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
    factory: str = ""
    ondisk: bool = False
    routing: str = ""

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


def ivf_train_rows(nlist: int) -> int:
    """Rows of the coarse quantizer's training sample: IVF_TRAIN_PER_LIST per list, capped at
    IVF_TRAIN_MAX_ROWS but never under 39 per list (faiss's minimum; above the cap from nlist 8192,
    N >= ~4M). k-means then costs ~2 · IVF_TRAIN_NITER · rows · nlist · d flops."""
    return max(39 * nlist, min(IVF_TRAIN_MAX_ROWS, nlist * IVF_TRAIN_PER_LIST))


def ivf_routing(index_type: str, nlist: int) -> str:
    """'hnsw' for ivf-pq / ivf-rq with nlist >= ROUTE_HNSW_MIN_NLIST, else 'exact' (module docstring)."""
    return "hnsw" if index_type in (IVF_PQ, IVF_RQ) and nlist >= ROUTE_HNSW_MIN_NLIST else "exact"


def ivf_nprobe(nlist: int) -> int:
    """Lists visited per query before tuning: nlist/16, at least 16 (capped at nlist)."""
    return min(nlist, max(16, nlist // 16))


def nprobe_candidates(nlist: int) -> list[int]:
    """nprobe values tried by the tuning, ascending: powers of two up to nlist, and nlist itself."""
    out, p = [], 1
    while p < nlist:
        out.append(p)
        p *= 2
    return out + [nlist]


def index_memory_bytes(index_type: str, n: int, bytes_per_item: int, nlist: int = 0,
                       hnsw_m: int = HNSW_M) -> int:
    """Resident bytes of a loaded index of this type (see `IndexPlan`)."""
    b = bytes_per_item + EXTRA_BYTES.get(index_type, 0)
    if index_type in IVF_TYPES:
        return n * (b + 8 + ID_BYTES) + nlist * b
    if index_type == HNSW:
        return int(n * (b + 8.5 * hnsw_m + 8 + ID_BYTES))
    return n * (b + ID_BYTES)


# ---------------------------------------------------------------------------------------------
# Index types by name or faiss factory string
# ---------------------------------------------------------------------------------------------
_FACTORY = [  # (pattern, type or '<flat>' for the kind's exact type, has nlist, has hnsw M)
    (r"BFlat", BINARY_FLAT, False, False),
    (r"BIVF(\d+)(?:,BFlat|,Flat)?", BINARY_IVF, True, False),
    (r"IVF(\d+),(PQ[0-9x]*)", IVF_PQ, True, False),
    (r"IVF(\d+),(RQ[0-9x_]*)", IVF_RQ, True, False),
    (r"IVF(\d+),Flat", IVF_FLAT, True, False),
    (r"(PQ[0-9x]*)", PQ_LUT, False, False),
    (r"(RQ[0-9x_]*)", RQ_LUT, False, False),
    (r"HNSW(\d+)(?:,Flat)?", HNSW, False, True),
    (r"Flat", FLAT, False, False),
]


def parse_index_type(spec: str, kind: str, codec: str = "") -> tuple[str, int | None, int | None]:
    """(index type, nlist or None, hnsw M or None) from our type name or a faiss factory string.

    `codec` is the stored codes' own faiss codec ('PQ8x8', 'RQ8x8'; '' when unknown): a factory
    string naming another codec (e.g. 'IVF1024,PQ16' over 8-byte PQ codes) is refused, since the
    index is built from the stored codes and never encodes. Raises ValueError with what to use."""
    s = str(spec).strip()
    if s in TYPES_BY_KIND.get(kind, ()):
        return s, None, None
    if any(s in types for types in TYPES_BY_KIND.values()):
        raise ValueError(f"index type {s!r} does not serve {kind} codes; choose one of {TYPES_BY_KIND[kind]}")
    for pattern, t, has_nlist, has_m in _FACTORY:
        m = re.fullmatch(pattern, s)
        if not m:
            continue
        if t not in TYPES_BY_KIND[kind]:
            raise ValueError(f"index type {s!r} ({t}) does not serve {kind} codes; choose one of "
                             f"{TYPES_BY_KIND[kind]} or a factory string of that kind")
        asked = next((g for g in m.groups() if g and g[:2] in ("PQ", "RQ")), None)
        if asked and codec and _codec_sizes(asked) and _codec_sizes(asked) != _codec_sizes(codec):
            raise ValueError(f"factory string {s!r} asks for {asked} codes but the stored codes are {codec}: "
                             f"indexes are built from the stored codes, never re-encoded; use "
                             f"{s.replace(asked, codec)!r}")
        if asked and codec and asked[:2] != codec[:2]:
            raise ValueError(f"factory string {s!r} asks for {asked[:2]} codes but the stored codes are {codec}")
        num = int(m.group(1)) if (has_nlist or has_m) else None
        return t, num if has_nlist else None, num if has_m else None
    raise ValueError(f"cannot read an index type from {spec!r}: use one of {TYPES_BY_KIND.get(kind)} or a "
                     f"faiss factory string such as 'IVF4096,PQ8x8', 'IVF1024,RQ8x8', 'BIVF1024', 'BFlat', "
                     f"'IVF1024,Flat', 'HNSW32,Flat'")


def _codec_sizes(codec: str) -> tuple[int, ...]:
    """'PQ8x8' -> (8, 8); 'PQ8' -> (8, 8) (faiss's default 8 bits); 'PQ' -> ()."""
    nums = tuple(int(x) for x in re.findall(r"\d+", codec))
    return nums + (8,) if len(nums) == 1 else nums


def factory_string(index_type: str, codec: str, nlist: int = 0, hnsw_m: int = 0) -> str:
    """The faiss index_factory string of a plan (`codec`: 'PQ8x8', 'RQ8x8', '' for binary/float)."""
    return {BINARY_FLAT: "BFlat", BINARY_IVF: f"BIVF{nlist}", PQ_LUT: codec, RQ_LUT: codec,
            IVF_PQ: f"IVF{nlist},{codec}", IVF_RQ: f"IVF{nlist},{codec}", FLAT: "Flat",
            IVF_FLAT: f"IVF{nlist},Flat", HNSW: f"HNSW{hnsw_m},Flat", CODER_LUT: "coder-lut"}[index_type]


# ---------------------------------------------------------------------------------------------
# The rule
# ---------------------------------------------------------------------------------------------
def choose_index(n: int, bytes_per_item: int, kind: str, memory_budget_bytes: int, *,
                 adc_engine: str = CODER_LUT, index_type: str | None = None,
                 flat_max_items: int | None = None, codec: str = "") -> IndexPlan:
    """The written rule (module docstring): which index for N codes of `bytes_per_item` bytes.

    Args:
        n: items to index (> 0). bytes_per_item: stored bytes per item at the chosen length.
        kind: 'binary' (Hamming), 'adc' (asymmetric lookup tables) or 'float' (raw vectors).
        memory_budget_bytes: resident bytes the loaded index may take.
        adc_engine: the exact ADC type for this coder (pq-lut, rq-lut or coder-lut).
        index_type: force a type of this kind, by name or factory string (still budget-checked).
        flat_max_items: above this N the approximate type is preferred (default FLAT_MAX_ITEMS).
        codec: the stored codes' faiss codec ('PQ8x8', 'RQ8x8'), for factory strings.

    Raises IndexBudgetError when nothing fits, ValueError for a type that cannot serve these codes.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if n <= 0:
        raise ValueError(f"nothing to index (n={n})")
    if bytes_per_item <= 0:
        raise ValueError(f"bytes_per_item must be positive, got {bytes_per_item}")
    flat = {"binary": BINARY_FLAT, "adc": adc_engine, "float": FLAT}[kind]
    approx = APPROX_OF.get(flat)
    limit = flat_max_items if flat_max_items is not None else FLAT_MAX_ITEMS[kind]
    nlist = hnsw_m = None
    if index_type is not None:
        t, nlist, hnsw_m = parse_index_type(index_type, kind, codec)
        if nlist is not None and not 1 <= nlist <= max(1, n // 39):
            raise ValueError(f"nlist={nlist} needs >= 39 training items per list; N={n:,} allows at most "
                             f"{max(1, n // 39)}")
        candidates = [(t, f"asked for ({index_type})")]
    elif approx is None:
        candidates = [(flat, f"{flat}: the coder's own exact scan")]
    elif n <= limit:
        candidates = [(flat, f"N={n:,} <= {limit:,}: exact flat scan")]
    else:
        candidates = [(approx, f"N={n:,} > {limit:,}: approximate search"),
                      (flat, f"N={n:,} > {limit:,} but {approx} exceeds the budget: exact flat scan")]
    plans = [_plan(t, n, bytes_per_item, kind, why, codec, nlist, hnsw_m) for t, why in candidates]
    for p in plans:
        if p.memory_bytes <= memory_budget_bytes:
            return p
    need = min(p.memory_bytes for p in plans)
    raise IndexBudgetError(
        f"N={n:,} {kind} codes of {bytes_per_item} bytes needs >= {need:,} bytes ({human_bytes(need)}) "
        f"for {plans[-1].index_type}, budget {memory_budget_bytes:,} ({human_bytes(memory_budget_bytes)}); "
        f"raise --memory-budget or use a shorter code")


def _plan(index_type: str, n: int, b: int, kind: str, reason: str, codec: str = "",
          nlist: int | None = None, hnsw_m: int | None = None) -> IndexPlan:
    if index_type in IVF_TYPES:
        nlist = nlist or ivf_nlist(n)
    else:
        nlist = 0
    m = (hnsw_m or HNSW_M) if index_type == HNSW else 0
    return IndexPlan(
        kind=kind, index_type=index_type, n=n, bytes_per_item=b,
        memory_bytes=index_memory_bytes(index_type, n, b, nlist, m or HNSW_M), exact=index_type in EXACT_TYPES,
        nlist=nlist, nprobe=ivf_nprobe(nlist) if nlist else 0,
        hnsw_m=m, ef_search=HNSW_EF_SEARCH if index_type == HNSW else 0,
        reason=reason, factory=factory_string(index_type, codec, nlist, m),
        routing=ivf_routing(index_type, nlist) if nlist else "")


def choose_merge(plan: IndexPlan, memory_budget_bytes: int, asked: bool | None = None) -> IndexPlan:
    """`plan` with `ondisk` set by the written rule (module docstring): `asked` True/False wins
    (True on a type without on-disk lists raises ValueError); None: on disk for ONDISK_TYPES when
    2 x memory_bytes (the in-memory merge) exceeds the budget. The reason is appended. Pure."""
    if asked and plan.index_type not in ONDISK_TYPES:
        raise ValueError(f"an on-disk merge needs one of {ONDISK_TYPES}, not {plan.index_type}")
    if asked is None:
        on = plan.index_type in ONDISK_TYPES and 2 * plan.memory_bytes > memory_budget_bytes
        why = (f"merge on disk: 2 x {human_bytes(plan.memory_bytes)} > budget {human_bytes(memory_budget_bytes)}"
               if on else "merge in memory")
    else:
        on, why = bool(asked), f"merge {'on disk' if asked else 'in memory'}: asked for"
    return dataclasses.replace(plan, ondisk=on, reason=f"{plan.reason}; {why}")


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
    if isinstance(value, numbers.Integral):
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


# ---------------------------------------------------------------------------------------------
# Refresh planning
# ---------------------------------------------------------------------------------------------
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
