"""SIGKILL an extraction mid-way, rerun it: finished shards are not redone, outputs are identical,
and the kill leaves no Prefect concurrency slot held (the rerun would wait for it forever)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from flows.extract_features import extract_features
from flows.ingest import ingest
from infra.settings import Settings
from infra.store import open_store
from tests.conftest import settings_dict
from tests.helpers import register_untrained_cnn
from tests.integration.pipeline_runs import release_leaked_heavy_slots
from tests.integration.test_extract_flow import features_by_id

pytestmark = pytest.mark.s3


def cli_env(settings: Settings) -> dict[str, str]:
    return {**os.environ, **settings.to_env(), "PYTHONUNBUFFERED": "1"}


def manifests(store, dataset, model_id):
    return [i.key for i in store.list(f"_manifests/extract/{dataset}/{model_id}/")]


def test_sigkill_then_resume(prefect_server, s3_settings, seaweed):
    cfg = settings_dict(s3_settings)
    store = open_store(s3_settings)
    ingest("digits", shard_rows=100, settings=cfg)  # 18 shards
    register_untrained_cnn(store)
    slow = Settings.load(**{**cfg, "max_workers": 1, "batch_size": 16})
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "extract", "--dataset", "digits",
                             "--model", "test-cnn"], env=cli_env(slow), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while len(manifests(store, "digits", "test-cnn")) < 3 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    leaked = release_leaked_heavy_slots()  # released first: a failure here must not block the session
    assert leaked == 0, f"the SIGKILL left {leaked} Prefect 'heavy' concurrency slots held for good"
    finished = len(manifests(store, "digits", "test-cnn"))
    assert 3 <= finished < 18, f"kill landed outside the run ({finished} shards finished)"

    # resume and the clean run use the killed run's batch size and threads: float results are
    # bit-identical for a given batch size and thread count, not across them
    slow_cfg = {**cfg, "max_workers": 1, "batch_size": 16}
    s = extract_features("digits", "test-cnn", settings=slow_cfg)
    assert s["skipped"] >= finished and s["done"] + s["skipped"] == 18
    assert s["done"] == 18 - s["skipped"] and not s["failed"]
    ids, feats = features_by_id(store, "digits", "test-cnn")
    assert len(ids) == len(np.unique(ids)) == 1797  # no duplicates, nothing lost
    # identical to a clean, uninterrupted run in another prefix
    clean = Settings.load(**{**slow_cfg, "store": s3_settings.store + "-clean"})
    ingest("digits", shard_rows=100, settings=settings_dict(clean))
    register_untrained_cnn(open_store(clean))
    extract_features("digits", "test-cnn", settings=settings_dict(clean))
    ids_c, feats_c = features_by_id(open_store(clean), "digits", "test-cnn")
    np.testing.assert_array_equal(ids, ids_c)
    np.testing.assert_array_equal(feats, feats_c)
