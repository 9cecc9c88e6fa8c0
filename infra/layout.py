"""The object-store layout (ARCHITECTURE.md, "the data contract"): every key is built here.

An output shard's key is a pure function of (input shard, model or coder id): part numbers carry
through every stage, so a rerun finds its own earlier output.
"""
from __future__ import annotations

import re

PART_RE = re.compile(r"part-(\d{5,})\.parquet$")


def part_name(part: int) -> str:
    return f"part-{part:05d}.parquet"


def part_of(key: str) -> int:
    """Part number of a shard key ('…/part-00042.parquet' -> 42)."""
    m = PART_RE.search(key)
    if not m:
        raise ValueError(f"not a shard key: {key!r}")
    return int(m.group(1))


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


def manifest_key(stage: str, dataset: str, output_id: str, part: int) -> str:
    """Manifest of one shard of one stage; `output_id` is the model/coder id ('-' for ingest)."""
    return f"_manifests/{stage}/{dataset}/{output_id}/part-{part:05d}.json"


def quarantine_key(stage: str, key: str) -> str:
    return f"_quarantine/{stage}/{key}"


def report_prefix(dataset: str, run_id: str) -> str:
    return f"reports/{dataset}/{run_id}/"


def pointer_key(name: str) -> str:
    """Small named pointers, e.g. the query model of a dataset: `pointers/<name>.json`."""
    return f"pointers/{name}.json"
