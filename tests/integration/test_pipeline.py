"""The whole pipeline end to end on real data (digits) on a Dask LocalCluster; a rerun skips everything."""
from __future__ import annotations

import pytest

from flows.pipeline import pipeline
from infra.runners import task_runner
from infra.settings import Settings
from infra.store import open_store
from tests.conftest import settings_dict

pytestmark = pytest.mark.s3

CODERS = {"drq": 16, "itq": 16, "float": 0}
ARGS = dict(epochs=2, coders=CODERS, bits=[8, 16], evaluate_methods=["lsh", "itq", "drq", "float"])


def test_pipeline_on_dask_then_rerun_skips_everything(prefect_server, s3_settings):
    cfg = settings_dict(s3_settings)
    dask = Settings.load(**{**cfg, "runner": "dask", "dask_workers": 2})
    out = pipeline.with_options(task_runner=task_runner(dask))("digits", settings={**cfg, "runner": "dask"}, **ARGS)
    assert out["ingest"]["done"] == 1 and out["extract"]["rows"] == 1797 and not out["extract"]["failed"]
    assert {c["coder_id"] for c in out["coders"]} == {"drq-16-digits-small-cnn", "itq-16-digits-small-cnn",
                                                       "float-digits-small-cnn"}
    names = sorted(i["name"] for i in out["indexes"])
    assert names == ["digits-drq-16-digits-small-cnn-16b", "digits-drq-16-digits-small-cnn-8b",
                     "digits-float-digits-small-cnn", "digits-itq-16-digits-small-cnn-16b"]
    assert all(i["status"] == "published" and i["version"] == 1 for i in out["indexes"])
    rows = {(r["method"], r["bits"]): r["map"] for r in out["evaluation"]["rows"]}
    assert rows[("drq", 16)] > rows[("lsh", 16)]  # a learned code beats random projections on real data

    store = open_store(s3_settings)
    data_writes = lambda: sum(store.write_count(p) for p in ("raw/", "features/", "codes/", "indexes/"))  # noqa: E731
    before = data_writes()
    again = pipeline("digits", settings=cfg, **ARGS)
    assert again["ingest"]["skipped"] == 1 and again["extract"]["skipped"] == again["extract"]["shards"]
    assert all(s["done"] == 0 for s in again["encode"])
    assert all(i["status"] == "skipped" and i["version"] == 1 for i in again["indexes"])
    assert again["evaluation"]["rows"] == out["evaluation"]["rows"]
    assert data_writes() == before  # the rerun rewrote no shard and no index
