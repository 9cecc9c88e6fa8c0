"""The whole pipeline end to end on real data (digits) on a Dask LocalCluster; a rerun skips everything."""
from __future__ import annotations

import os
import socket

import pytest

from flows.pipeline import pipeline
from infra import indexes as ix
from infra.manifests import read_manifest
from infra.store import open_store
from tests.conftest import settings_dict

pytestmark = pytest.mark.s3

CODERS = {"drq": 16, "itq": 16, "float": 0}
ARGS = dict(epochs=2, coders=CODERS, bits=[8, 16], evaluate_methods=["lsh", "itq", "drq", "float"])


def _writers(store, stage: str) -> set[str]:
    """host:pid of the processes that wrote the manifests of one stage's shards."""
    return {read_manifest(store, i.key).writer for i in store.list(f"_manifests/{stage}/digits/")}


def test_pipeline_on_dask_then_rerun_skips_everything(prefect_server, s3_settings):
    """`pipeline` with runner dask: the shard tasks of every stage (ingest, extract, encode, index
    batches) run in at least two Dask worker processes, none in this process (each stage flow is a
    subflow, which Prefect would otherwise run on its own default thread pool here); a rerun
    rewrites nothing."""
    cfg = {**settings_dict(s3_settings), "shard_rows": 400}  # 5 shards
    out = pipeline("digits", settings={**cfg, "runner": "dask", "dask_workers": 2}, **ARGS)
    assert out["ingest"]["done"] == 5 and out["extract"]["rows"] == 1797 and not out["extract"]["failed"]
    store = open_store(s3_settings)
    here = f"{socket.gethostname()}:{os.getpid()}"
    for stage in ("ingest", "extract", "encode"):
        writers = _writers(store, stage)
        assert len(writers) >= 2 and here not in writers, (stage, writers)
    for idx in out["indexes"]:
        batch_writers = set(ix.read_build(store, idx["name"], idx["version"]).batch_writers)
        assert len(batch_writers) >= 2 and here not in batch_writers, (idx["name"], batch_writers)
    assert {c["coder_id"] for c in out["coders"]} == {"drq-16-digits-small-cnn", "itq-16-digits-small-cnn",
                                                       "float-digits-small-cnn"}
    names = sorted(i["name"] for i in out["indexes"])
    assert names == ["digits-drq-16-digits-small-cnn-16b", "digits-drq-16-digits-small-cnn-8b",
                     "digits-float-digits-small-cnn", "digits-itq-16-digits-small-cnn-16b"]
    assert all(i["status"] == "published" and i["version"] == 1 for i in out["indexes"])
    rows = {(r["method"], r["bits"]): r["map"] for r in out["evaluation"]["rows"]}
    assert rows[("drq", 16)] > rows[("lsh", 16)]  # a learned code beats random projections on real data

    data_writes = lambda: sum(store.write_count(p) for p in ("raw/", "features/", "codes/", "indexes/"))  # noqa: E731
    before = data_writes()
    again = pipeline("digits", settings=cfg, **ARGS)  # the thread runner this time
    assert again["ingest"]["skipped"] == 5 and again["extract"]["skipped"] == again["extract"]["shards"]
    assert all(s["done"] == 0 for s in again["encode"])
    assert all(i["status"] == "skipped" and i["version"] == 1 for i in again["indexes"])
    assert again["evaluation"]["rows"] == out["evaluation"]["rows"]
    assert data_writes() == before  # the rerun rewrote no shard and no index
