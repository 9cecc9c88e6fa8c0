"""The extract flow on a real Dask LocalCluster with 2 worker processes (prefect-dask)."""
from __future__ import annotations


import numpy as np
import pytest

from flows.extract_features import extract_features
from flows.ingest import ingest
from infra.manifests import writer
from infra.runners import task_runner
from infra.settings import Settings
from infra.store import open_store
from tests.conftest import settings_dict
from tests.helpers import register_untrained_cnn
from tests.integration.test_extract_flow import features_by_id

pytestmark = pytest.mark.s3


def test_extract_on_dask_local_cluster(prefect_server, s3_settings):
    cfg = settings_dict(s3_settings)
    store = open_store(s3_settings)
    ingest("digits", shard_rows=400, settings=cfg)
    register_untrained_cnn(store)
    dask_cfg = Settings.load(**{**cfg, "runner": "dask", "dask_workers": 2})
    flow = extract_features.with_options(task_runner=task_runner(dask_cfg))
    s = flow("digits", "test-cnn", settings={**cfg, "runner": "dask"})
    assert (s["done"], s["rows"], s["failed"]) == (5, 1797, [])
    # the work ran in worker processes, not in this one
    assert s["workers"] and writer() not in s["workers"]
    ids, feats = features_by_id(store, "digits", "test-cnn")
    assert len(np.unique(ids)) == 1797
    # same features as the thread runner would produce (rerun with --force on threads, compare)
    extract_features("digits", "test-cnn", force=True, settings=cfg)
    _, feats_threads = features_by_id(store, "digits", "test-cnn")
    np.testing.assert_allclose(feats, feats_threads, rtol=1e-5, atol=1e-5)
