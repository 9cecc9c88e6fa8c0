"""Index versions in the store: claim, write, complete (build.json), load, publish (CURRENT).

Store layout of one index (keys and file names from infra/layout.py):
    indexes/<name>/v000007/_claim.json   conditional create (If-None-Match): one writer per version
    indexes/<name>/v000007/index.faiss   faiss.serialize_index / serialize_index_binary bytes
    indexes/<name>/v000007/index.ivfdata plan.ondisk only: the inverted lists index.faiss reads them from
    indexes/<name>/v000007/ids.parquet   position -> id int64, part int32 (the code shard it came from)
    indexes/<name>/v000007/trained.faiss IVF kinds only: the empty trained index refreshes add into
    indexes/<name>/v000007/build.json    written last: a version directory with build.json is complete
    indexes/<name>/CURRENT               {"version": 7, ...}; replaced only by put_if(if_match=etag read)
    indexes/<name>/_staging/<digest>/    one batch's partial index (index.faiss, ids.parquet, stats.json
                                         last), content-addressed so a rerun after a kill reuses it

Readers follow CURRENT only, so a version being written (or abandoned by a killed run, or by the loser
of a race) is never seen. faiss labels are positions 0..N-1; ids.parquet maps them to stable ids.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import resource
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, ClassVar

from infra import layout
from infra.code_index import CodeIndex, code_index_from_bytes, code_index_from_file
from infra.index_files import ids_bytes, index_to_bytes, ivfdata_path_of
from infra.index_plan import IndexBuildError, IndexPlan
from infra.store import NotFound, PreconditionFailed, Store

FORMAT = 1  # of build.json / partial stats; bump when the partial format changes (it keys staging)

# file names and keys are infra/layout.py's; named here too for the callers of infra.indexes
INDEX_FILE, IDS_FILE, BUILD_FILE = layout.INDEX_FILE, layout.IDS_FILE, layout.BUILD_FILE
TRAINED_FILE, CLAIM_FILE, STATS_FILE = layout.TRAINED_FILE, layout.CLAIM_FILE, layout.STATS_FILE
IVFDATA_FILE = layout.IVFDATA_FILE
version_key = layout.index_version_key
staging_key_prefix = layout.index_staging_prefix


@dataclass
class BuildRecord:
    """build.json: what a version holds and how it was made. Created by the build or refresh flow
    (what was asked: the first block), completed by the flow after the merge (what was built) and by
    the evaluation task (`eval`, tuned `plan`). Every writer and reader of build.json goes through
    `to_json` / `from_json`; the JSON field names are the attribute names. Refreshes carry `based_on`,
    `attempt`, `delta` and (when shards went away) `removal_reason`."""

    # what was asked
    format: int
    name: str
    mode: str                    # build | refresh
    dataset: str
    coder_id: str
    coder_checksum: str
    method: str
    model_id: str | None
    bits: int
    memory_budget: int
    index_type_requested: str | None = None
    merge_on_disk_requested: bool | None = None  # None: the rule chose (plan.ondisk says what it chose)
    exclude_split: str | None = None
    based_on: int | None = None
    device: str = "cpu"
    recall_target: float | None = None
    attempt: int | None = None
    delta: dict[str, Any] | None = None
    removal_reason: str | None = None
    # what was built
    build_id: str = ""
    version: int = 0
    plan: dict[str, Any] = field(default_factory=dict)   # IndexPlan.as_dict, n and memory final
    n: int = 0
    removed_rows: int = 0
    duplicate_ids: int = 0
    excluded_rows: int = 0
    index_bytes: int = 0
    ids_bytes: int = 0
    inputs: list[dict[str, Any]] = field(default_factory=list)
    invalid: list[dict[str, Any]] = field(default_factory=list)
    batches: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    peak_rss_bytes: dict[str, int] = field(default_factory=dict)
    code_shards_read: dict[str, int] = field(default_factory=dict)
    batch_writers: list[str] = field(default_factory=list)  # host:pid of the batch tasks that did work
    trained: dict[str, Any] | None = None
    eval: dict[str, Any] = field(default_factory=dict)
    # keys of a build.json this code does not know (written by a newer version): kept, written back
    extra: dict[str, Any] = field(default_factory=dict)

    _REFRESH_ONLY: ClassVar[tuple[str, ...]] = ("attempt", "delta", "removal_reason")

    def to_json(self) -> dict[str, Any]:
        """The JSON object of build.json (refresh-only keys left out when unset)."""
        d = dataclasses.asdict(self)
        extra = d.pop("extra")
        for k in self._REFRESH_ONLY:
            if d[k] is None:
                d.pop(k)
        return {**extra, **d}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "BuildRecord":
        """Read a build.json object. Builds from before 'exclude_split' was recorded left the query
        split out: a missing 'exclude_split' reads as 'query'."""
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        known.setdefault("exclude_split", "query")
        return cls(**known, extra={k: v for k, v in d.items() if k not in names})


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (ru_maxrss; shared by concurrent threads)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


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
    except NotFound:
        return None
    pointer = json.loads(data)
    return Current(int(pointer["version"]), etag, pointer)


def read_build(store: Store, name: str, version: int) -> BuildRecord:
    """build.json of a version. One GET; NotFound when the version is incomplete or absent."""
    return BuildRecord.from_json(json.loads(store.read_bytes(version_key(name, version, BUILD_FILE))))


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
    """Write index.faiss, ids.parquet (and trained.faiss; for an on-disk plan index.ivfdata, streamed
    from its local file) into a claimed version. build.json, the completion marker, is written
    separately (`write_build`). Returns the bytes written per file."""
    sizes = {}
    if ci.plan.ondisk:
        path = ivfdata_path_of(ci.index)
        store.upload_file(version_key(name, version, IVFDATA_FILE), path)
        sizes["ivfdata_bytes"] = os.path.getsize(path)
    data = index_to_bytes(ci.index)  # an on-disk index serialises its list offsets and file name only
    store.write_bytes(version_key(name, version, INDEX_FILE), data)
    ids = ids_bytes(ci.ids, ci.parts)
    store.write_bytes(version_key(name, version, IDS_FILE), ids)
    sizes.update({"index_bytes": len(data), "ids_bytes": len(ids)})
    if trained is not None:
        store.write_bytes(version_key(name, version, TRAINED_FILE), trained)
        sizes["trained_bytes"] = len(trained)
    return sizes


def write_build(store: Store, name: str, version: int, build: BuildRecord) -> None:
    """build.json, the completion marker of a version (written last). One PUT."""
    store.write_bytes(version_key(name, version, BUILD_FILE),
                      json.dumps(build.to_json(), indent=1, sort_keys=True, default=str).encode())


def load_version(store: Store, name: str, version: int, build: BuildRecord | None = None,
                 cache_dir: str | None = None) -> tuple[CodeIndex, BuildRecord]:
    """(CodeIndex, build.json) of a complete version. Without `cache_dir`: reads index.faiss into
    memory (transient ~2 × the index: the bytes and the index). With `cache_dir`: downloads
    index.faiss once to <cache_dir>/<name>/v<version>/ (kept; named by version, which never changes)
    and memory-maps it (IO_FLAG_MMAP): the codes live in the page cache, so a reload does not hold
    two private copies. An on-disk plan (index.faiss + index.ivfdata) is always read from local files:
    without `cache_dir` they go to a temporary directory deleted once faiss has mapped them."""
    build = build or read_build(store, name, version)
    plan = IndexPlan.from_dict(build.plan)
    ids = store.read_bytes(version_key(name, version, IDS_FILE))
    if cache_dir is None and plan.ondisk:
        with tempfile.TemporaryDirectory(prefix="codeshard-ivf-") as tmp:
            path = cached_index_file(store, name, version, tmp, ondisk=True)
            ci = code_index_from_file(plan, build.bits, path, ids)  # the mapping outlives the unlink
    elif cache_dir is None:
        ci = code_index_from_bytes(plan, build.bits, store.read_bytes(version_key(name, version, INDEX_FILE)),
                                   ids)
    else:
        path = cached_index_file(store, name, version, cache_dir, ondisk=plan.ondisk)
        ci = code_index_from_file(plan, build.bits, path, ids, mmap=True)
    return ci, build


def cached_index_file(store: Store, name: str, version: int, cache_dir: str, ondisk: bool = False) -> str:
    """Local path of index.faiss of a version under `cache_dir`, downloaded (streamed, then renamed
    into place) when absent; `ondisk`: index.ivfdata too, into the same directory and before
    index.faiss (whose presence marks both complete). Versions are immutable once published, so a
    present file is valid."""
    d = os.path.join(cache_dir, name, f"v{version:06d}")
    path = os.path.join(d, INDEX_FILE)
    if not os.path.exists(path):
        os.makedirs(d, exist_ok=True)
        for f in ([IVFDATA_FILE] if ondisk else []) + [INDEX_FILE]:
            tmp = os.path.join(d, f"{f}.{uuid.uuid4().hex[:8]}.part")
            store.download_file(version_key(name, version, f), tmp)
            os.replace(tmp, os.path.join(d, f))
    return path


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
