"""Searching a published index: follow CURRENT, cache the loaded version, reload when CURRENT moves.

`Searcher(store, name)` checks CURRENT's ETag with one HEAD at most every `poll_seconds` (0: every
call) and loads the version it names (index.faiss + ids.parquet + build.json + the coder) only when
it changed; the previous version stays cached so in-flight searches finish on it. Queries are float
features: symmetric coders encode them, ADC coders build their lookup tables, float indexes take them
as they are. Hits carry their stable id, score (higher is better) and metadata (label, split) read
from the raw shard with the same part number (cached per shard).
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from encoders.coders import Coder
from infra import indexes as ix
from infra import layout
from infra.registry import load_coder
from infra.shards import ShardInvalid, features_matrix, open_parquet
from infra.store import Store, StoreError

LOG = logging.getLogger(__name__)


class SearchError(LookupError):
    """The index or an id is not there; the message says what to do."""


@dataclass
class LoadedVersion:
    """One loaded version: the index, its build.json, the coder, and id -> position lookup.
    Memory: the index (build.plan['memory_bytes']) + 8 bytes per item for the id order."""

    version: int
    ci: ix.CodeIndex
    build: ix.BuildRecord
    coder: Coder
    id_order: np.ndarray = field(repr=False, default=None)  # argsort of ci.ids

    def position_of(self, item_id: int) -> int:
        ids = self.ci.ids
        j = np.searchsorted(ids, item_id, sorter=self.id_order)
        if j < len(ids) and ids[self.id_order[j]] == item_id:
            return int(self.id_order[j])
        raise SearchError(f"id {item_id} is not in index {self.build.name} v{self.version}")


@dataclass(frozen=True)
class SearchResult:
    """Top-k per query: ids (nq, k) int64 (-1: no hit), scores (nq, k) float32 (higher is more
    similar: -Hamming, -squared L2 or an inner product, by index kind), the index version searched,
    and per query a list of hit dicts {rank, id, score, label, split}."""

    ids: np.ndarray
    scores: np.ndarray
    version: int
    hits: list[list[dict[str, Any]]]


def check_k(k: int) -> None:
    """Raise ValueError unless `k` is an int >= 1 (faiss would answer k=0 with one hit)."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")


class Searcher:
    """Search index `name` in `store`, always on the version CURRENT names (checked at most every
    `poll_seconds`). Thread-safe. `meta_cache_parts`: raw/features shards kept in memory."""

    def __init__(self, store: Store, name: str, poll_seconds: float = 5.0, meta_cache_parts: int = 64,
                 cache_dir: str | None = None):
        """`cache_dir`: a local directory where index files of published versions are kept and
        memory-mapped (IO_FLAG_MMAP): the codes are page cache, shared by every process of the host
        and evictable, so a reload does not hold two private copies. None: read into memory."""
        self.store, self.name, self.poll_seconds = store, name, poll_seconds
        self.cache_dir = cache_dir
        self._lock = threading.RLock()
        self._versions: collections.OrderedDict[int, LoadedVersion] = collections.OrderedDict()
        self._live: LoadedVersion | None = None
        self._etag: str | None = None
        self._checked = 0.0
        self._meta: collections.OrderedDict[tuple, dict[int, tuple]] = collections.OrderedDict()
        self._feats: collections.OrderedDict[tuple, tuple[dict[int, int], np.ndarray]] = collections.OrderedDict()
        self._cache_parts = meta_cache_parts
        self.loads = 0  # versions loaded so far (tests and metrics)

    # -- following CURRENT ---------------------------------------------------------------------
    def current(self) -> LoadedVersion:
        """The live version; one HEAD of CURRENT when `poll_seconds` have passed, a load if it moved."""
        with self._lock:
            now = time.monotonic()
            if self._live is not None and now - self._checked < self.poll_seconds:
                return self._live
            self._checked = now
            head = self.store.head(layout.index_current_key(self.name))
            if head is None:
                raise SearchError(f"no index named {self.name!r} in {self.store.uri} (no CURRENT): "
                                  f"build it with `codeshard index build --name {self.name} …`")
            if self._live is not None and head.etag == self._etag:
                return self._live
            cur = ix.read_current(self.store, self.name)
            if cur is None:
                raise SearchError(f"index {self.name!r} disappeared from {self.store.uri}")
            if cur.version not in self._versions:
                self._versions[cur.version] = self._load(cur.version)
                while len(self._versions) > 2:
                    self._versions.popitem(last=False)
            self._live, self._etag = self._versions[cur.version], cur.etag
            return self._live

    def _load(self, version: int) -> LoadedVersion:
        t0 = time.perf_counter()
        ci, build = ix.load_version(self.store, self.name, version, cache_dir=self.cache_dir)
        coder, card = load_coder(self.store, build.coder_id)
        if card["checksum"] != build.coder_checksum:
            raise SearchError(f"coder {build.coder_id} changed since {self.name} v{version} was built; "
                              f"rebuild the index")
        self.loads += 1
        LOG.info("loaded %s v%d (%s, N=%d) in %.2fs", self.name, version, ci.plan.index_type, ci.ntotal,
                 time.perf_counter() - t0)
        return LoadedVersion(version, ci, build, coder, np.argsort(ci.ids, kind="stable"))

    # -- search ----------------------------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int = 10, with_metadata: bool = True,
               nprobe: int | None = None) -> SearchResult:
        """Top-k for float query features (nq, D) float32 (or one (D,) vector). Cost: the coder's
        query encoding plus the index search (flat types scan N codes per query; IVF types the
        nprobe lists tuned at build time, or `nprobe` for this call; HNSW: efSearch). k >= 1."""
        check_k(k)
        lv = self.current()
        q = ix.prepare_queries(lv.ci.plan, lv.coder, lv.ci.bits, queries)
        return self._result(lv, q, k, with_metadata, nprobe)

    def search_by_id(self, item_id: int, k: int = 10, with_metadata: bool = True,
                     nprobe: int | None = None) -> SearchResult:
        """Top-k for the stored feature of `item_id` (read from its features shard, cached). Binary and
        float indexes fall back to the item's stored code when its features are not in the store. k >= 1;
        `nprobe` as in `search`."""
        check_k(k)
        lv = self.current()
        pos = lv.position_of(int(item_id))
        feat = self.feature_of(int(item_id), lv)
        if feat is not None:
            return self._result(lv, ix.prepare_queries(lv.ci.plan, lv.coder, lv.ci.bits, feat[None, :]), k,
                                with_metadata, nprobe)
        if lv.ci.plan.kind == "adc":
            raise SearchError(f"no stored feature for id {item_id} (model {lv.build.model_id}); "
                              f"ADC indexes need it to build the query's lookup table")
        q = ix.stored_codes_at(lv.ci, np.array([pos])) if lv.ci.plan.kind == "binary" else \
            ix.stored_vectors_at(lv.ci, np.array([pos])).astype(np.float32)
        return self._result(lv, q, k, with_metadata, nprobe)

    def _result(self, lv: LoadedVersion, q: np.ndarray, k: int, with_metadata: bool,
                nprobe: int | None = None) -> SearchResult:
        scores, pos = ix.search_prepared(lv.ci, lv.coder, q, k, nprobe=nprobe)
        ids = np.where(pos >= 0, lv.ci.ids[np.maximum(pos, 0)], -1)
        hits = []
        for r in range(len(pos)):
            row = []
            for j in range(pos.shape[1]):
                if pos[r, j] < 0:
                    continue
                p = int(pos[r, j])
                hit = {"rank": j + 1, "id": int(ids[r, j]), "score": float(scores[r, j]),
                       "part": int(lv.ci.parts[p])}
                if with_metadata:
                    hit.update(self.metadata(int(ids[r, j]), int(lv.ci.parts[p]), lv))
                row.append(hit)
            hits.append(row)
        return SearchResult(ids.astype(np.int64), scores, lv.version, hits)

    # -- metadata and stored features -------------------------------------------------------------
    def metadata(self, item_id: int, part: int, lv: LoadedVersion | None = None) -> dict[str, Any]:
        """{label, split} of `item_id` from raw/<dataset>/part-<part>.parquet (None when absent)."""
        lv = lv or self.current()
        key = layout.raw_key(lv.build.dataset, part)
        with self._lock:
            table = self._meta.get(key)
            if table is None:
                table = self._read_meta(key)
                self._meta[key] = table
                while len(self._meta) > self._cache_parts:
                    self._meta.popitem(last=False)
            else:
                self._meta.move_to_end(key)
        label, split = table.get(item_id, (None, None))
        return {"label": label, "split": split}

    def _read_meta(self, key: str) -> dict[int, tuple]:
        try:
            pf = open_parquet(self.store, key)
            cols = [c for c in ("id", "label", "split") if c in pf.schema_arrow.names]
            t = pf.read(columns=cols)
        except (StoreError, ShardInvalid) as e:
            LOG.warning("no metadata from %s: %s", key, e)
            return {}
        ids = t.column("id").to_pylist()
        labels = t.column("label").to_pylist() if "label" in cols else [None] * len(ids)
        splits = t.column("split").to_pylist() if "split" in cols else [None] * len(ids)
        return {int(i): (lab, sp) for i, lab, sp in zip(ids, labels, splits)}

    def feature_of(self, item_id: int, lv: LoadedVersion | None = None) -> np.ndarray | None:
        """The stored feature (D,) float32 of `item_id`, or None if its features shard is missing."""
        lv = lv or self.current()
        part = int(lv.ci.parts[lv.position_of(item_id)])
        model_id = lv.build.model_id
        if not model_id:
            return None
        key = layout.features_key(lv.build.dataset, model_id, part)
        with self._lock:
            entry = self._feats.get(key)
            if entry is None:
                try:
                    t = open_parquet(self.store, key).read(columns=["id", "feature"])
                except (StoreError, ShardInvalid):
                    return None
                entry = ({int(i): r for r, i in enumerate(t.column("id").to_numpy())}, features_matrix(t))
                self._feats[key] = entry
                while len(self._feats) > max(1, self._cache_parts // 8):
                    self._feats.popitem(last=False)
        row = entry[0].get(int(item_id))
        return None if row is None else entry[1][row]


def query_feature(store: Store, model_id: str, image: bytes | None = None, text: str | None = None,
                  device: str = "cpu") -> np.ndarray:
    """(1, D) float32 feature of one query image (PNG/JPEG bytes) or text, with the backbone the
    coder was trained on (`model_id` from its card). Cost: one forward pass (+ model load, cached)."""
    from infra.images import decode_images
    from infra.registry import image_input, load_backbone

    if (image is None) == (text is None):
        raise ValueError("give exactly one of image or text")
    backbone, card = load_backbone(store, model_id, device=device)
    is_text = card["arch"] == "minilm"
    if text is not None:
        if not is_text:
            raise ValueError(f"model {model_id} ({card['arch']}) embeds images; use --image FILE")
        return np.asarray(backbone.features([text]), dtype=np.float32)
    if is_text:
        raise ValueError(f"model {model_id} embeds text; use --text")
    hw, mode = image_input(card)
    pixels = decode_images([image], np.zeros(1, np.int64), hw, mode)
    return np.asarray(backbone.features(pixels), dtype=np.float32)
