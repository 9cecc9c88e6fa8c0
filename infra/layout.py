"""The object-store layout (ARCHITECTURE.md, "the data contract"): every key is built here.

An output shard's key is a pure function of (input shard, model or coder id): part numbers carry
through every stage, so a rerun finds its own earlier output.
"""
from __future__ import annotations

import hashlib
import re

PART_RE = re.compile(r"part-(\d{5,})\.parquet$")
# Dataset, model, coder and index names become one path segment of every key and part of Prefect
# artifact keys: lowercase ASCII letters and digits, then also '.', '_' and '-' (no '/', no leading
# '.', so never '..'); 200 characters leave room for derived names ('<dataset>-<coder>-<bits>b').
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,199}$")
NAME_KINDS = ("dataset", "model", "coder", "index")


def check_name(kind: str, name: str) -> str:
    """`name` if it is a valid `kind` name (NAME_RE), else ValueError saying what is allowed.
    Called once at every flow's entry (and the CLI's), before any work."""
    if kind not in NAME_KINDS:
        raise ValueError(f"unknown name kind {kind!r}; one of {NAME_KINDS}")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ValueError(f"invalid {kind} name {name!r}: use 1-200 characters, lowercase ASCII letters, digits, "
                         f"'.', '_' or '-', starting with a letter or digit (no '/', no spaces)")
    return name


def check_names(**names: str | list[str] | None) -> None:
    """check_name for each keyword (kind=name, or kind=[names]); None is skipped:
    `check_names(dataset=d, model=m, coder=coder_ids)`."""
    for kind, value in names.items():
        for name in ([] if value is None else [value] if isinstance(value, str) else value):
            check_name(kind, name)


def artifact_key(*parts: str) -> str:
    """A Prefect artifact key (lowercase letters, digits, '-') for `parts` joined by '-'. Other
    characters become '-', and a short hash of the original is appended when any was replaced, so
    'ingest', 'my_data' and 'ingest', 'my-data' get different keys."""
    text = "-".join(parts)
    slug = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-") or "x"
    if slug != text:
        slug = f"{slug}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"
    return slug


def index_name(dataset: str, coder_id: str, bits: int) -> str:
    """The default index name: '<dataset>-<coder_id>-<bits>b'; a float coder has one length, so its
    index is '<dataset>-<coder_id>'."""
    return f"{dataset}-{coder_id}" if coder_id.startswith("float-") else f"{dataset}-{coder_id}-{bits}b"


def part_name(part: int) -> str:
    return f"part-{part:05d}.parquet"


def part_of(key: str) -> int:
    """Part number of a shard key ('…/part-00042.parquet' -> 42)."""
    m = PART_RE.search(key)
    if not m:
        raise ValueError(f"not a shard key: {key!r}")
    return int(m.group(1))


# top-level prefixes, for listings that span datasets (catalog, backfill)
RAW_ROOT, FEATURES_ROOT, CODES_ROOT = "raw/", "features/", "codes/"
MODELS_ROOT, CODERS_ROOT, INDEXES_ROOT, QUARANTINE_ROOT = "models/", "coders/", "indexes/", "_quarantine/"
RESULTS_ROOT = "_prefect_results/"


def segments_under(root: str, key: str) -> list[str]:
    """The path segments of `key` after `root` ('indexes/', 'indexes/x/v000001/ids.parquet' ->
    ['x', 'v000001', 'ids.parquet'])."""
    if not key.startswith(root):
        raise ValueError(f"{key!r} is not under {root!r}")
    return key[len(root):].split("/")


def folder_of(key: str) -> str:
    """The prefix holding `key` ('indexes/x/_staging/d/trained.faiss' -> 'indexes/x/_staging/d/')."""
    return key.rsplit("/", 1)[0] + "/"


def dataset_of(key: str) -> str:
    """The dataset of a raw, features or codes shard key ('codes/<dataset>/<coder>/part-…' -> dataset)."""
    for root in (RAW_ROOT, FEATURES_ROOT, CODES_ROOT):
        if key.startswith(root):
            return segments_under(root, key)[0]
    raise ValueError(f"not a raw, features or codes key: {key!r}")


def name_under(root: str, key: str, depth: int = 1) -> str:
    """The `depth` path segments of `key` after `root` ('indexes/', 'indexes/x/CURRENT' -> 'x')."""
    if not key.startswith(root):
        raise ValueError(f"{key!r} is not under {root!r}")
    return "/".join(key[len(root):].split("/")[:depth])


def raw_prefix(dataset: str) -> str:
    return f"raw/{dataset}/"


def raw_key(dataset: str, part: int) -> str:
    return f"raw/{dataset}/{part_name(part)}"


def features_prefix(dataset: str, model_id: str) -> str:
    return f"features/{dataset}/{model_id}/"


def features_key(dataset: str, model_id: str, part: int) -> str:
    return f"features/{dataset}/{model_id}/{part_name(part)}"


def codes_prefix(dataset: str, coder_id: str) -> str:
    return f"codes/{dataset}/{coder_id}/"


def codes_key(dataset: str, coder_id: str, part: int) -> str:
    return f"codes/{dataset}/{coder_id}/{part_name(part)}"


def model_prefix(model_id: str) -> str:
    return f"models/{model_id}/"


def coder_prefix(coder_id: str) -> str:
    return f"coders/{coder_id}/"


def index_prefix(name: str) -> str:
    return f"indexes/{name}/"


def index_version_prefix(name: str, version: int) -> str:
    return f"indexes/{name}/v{version:06d}/"


def index_current_key(name: str) -> str:
    return f"indexes/{name}/CURRENT"


# the files of one index version (index, ids, build record, trained quantizer, claim) and of a staged batch
INDEX_FILE, IDS_FILE, BUILD_FILE = "index.faiss", "ids.parquet", "build.json"
TRAINED_FILE, CLAIM_FILE, STATS_FILE = "trained.faiss", "_claim.json", "stats.json"
IVFDATA_FILE = "index.ivfdata"  # the inverted lists of an index merged on disk (OnDiskInvertedLists)


def index_version_key(name: str, version: int, filename: str) -> str:
    """One file of a version: indexes/<name>/v000007/<filename>."""
    return index_version_prefix(name, version) + filename


def index_staging_prefix(name: str, digest: str) -> str:
    """One staged batch (or trained quantizer) of index `name`: indexes/<name>/_staging/<digest>/."""
    return f"{index_prefix(name)}_staging/{digest}/"


def manifests_prefix(stage: str, dataset: str, output_id: str) -> str:
    return f"_manifests/{stage}/{dataset}/{output_id}/"


def announced_key(dataset: str, model_id: str) -> str:
    """Where discovery records what it announced: {raw key: [checksum, unix time]}."""
    return f"{manifests_prefix('discover', dataset, model_id)}announced.json"


def manifest_key(stage: str, dataset: str, output_id: str, part: int) -> str:
    """Manifest of one shard of one stage; `output_id` is the model/coder id ('-' for ingest)."""
    return f"{manifests_prefix(stage, dataset, output_id)}part-{part:05d}.json"


def quarantine_prefix(stage: str | None = None) -> str:
    return QUARANTINE_ROOT + (f"{stage}/" if stage else "")


def quarantine_key(stage: str, key: str) -> str:
    return f"{quarantine_prefix(stage)}{key}"


def quarantine_reason_key(stage: str, key: str) -> str:
    """The reason record beside a quarantined shard."""
    return quarantine_key(stage, key) + ".reason.json"


def result_key(path: str) -> str:
    """A Prefect result record (tasks/caching.py) in the store."""
    return RESULTS_ROOT + path


# -- imports: where each import source's shards land (flows/ingest.py, tasks/ingest.py) ----------
def source_id(uri: str) -> str:
    """A short stable name for an import source URI (its SHA-256, 16 hex digits)."""
    return hashlib.sha256(uri.encode()).hexdigest()[:16]


def import_sources_prefix(dataset: str) -> str:
    """One record per import source of `dataset`: `<prefix><source_id>.json` = {"uri": …}."""
    return f"_imports/{dataset}/sources/"


def import_source_key(dataset: str, uri: str) -> str:
    return f"{import_sources_prefix(dataset)}{source_id(uri)}.json"


def import_claims_prefix(dataset: str) -> str:
    return f"_imports/{dataset}/parts/"


def import_claim_key(dataset: str, part: int) -> str:
    """The claim of raw part `part` by one source shard (created only if absent: one owner)."""
    return f"{import_claims_prefix(dataset)}part-{part:05d}.json"


def import_claim_part(key: str) -> int:
    """Part number of a claim key ('…/parts/part-00042.json' -> 42)."""
    m = re.search(r"part-(\d{5,})\.json$", key)
    if not m:
        raise ValueError(f"not a part claim key: {key!r}")
    return int(m.group(1))


def import_shards_prefix(dataset: str, uri: str) -> str:
    return f"_imports/{dataset}/shards/{source_id(uri)}/"


def import_shard_key(dataset: str, uri: str, key: str) -> str:
    """Which part source shard `key` of source `uri` lands in (created once, never moved)."""
    return f"{import_shards_prefix(dataset, uri)}{key}.json"


def import_splits_key(dataset: str, uri: str) -> str:
    """Splits planned over one source's shards (when they carry no split column)."""
    return f"_staging/{dataset}/{source_id(uri)}/splits.parquet"


def import_quarantine_name(dataset: str, uri: str, key: str) -> str:
    """Name a bad source shard is quarantined under: the dataset and source make it unique."""
    return f"{dataset}/{source_id(uri)}/{key}"


def report_prefix(dataset: str, run_id: str) -> str:
    return f"reports/{dataset}/{run_id}/"


def pointer_key(name: str) -> str:
    """Small named pointers, e.g. the query model of a dataset: `pointers/<name>.json`."""
    return f"pointers/{name}.json"
