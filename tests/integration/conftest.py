"""Fixtures shared by the whole-pipeline integration tests (kill/resume, concurrent runs)."""
from __future__ import annotations

import time

import pytest

from infra.store import open_store
from tests.integration import pipeline_runs as pr


@pytest.fixture(scope="session")
def clean_pipeline(prefect_server, seaweed, tmp_path_factory):
    """One uninterrupted `codeshard pipeline` run (subprocess, own prefix), run once per session:
    the reference that killed-and-resumed and concurrent runs are compared with."""
    settings = pr.pipeline_settings(seaweed)
    store = open_store(settings)
    pr.register_cnn64(store)
    log = tmp_path_factory.mktemp("clean-pipeline") / "clean.log"
    t0 = time.monotonic()
    rc = pr.finish(pr.start_pipeline(settings, log), log, store)
    assert rc == 0, pr.tail(log)
    pr.assert_ids_exact(store)
    return {"settings": settings, "data": pr.data_etags(store), "published": pr.published(store),
            "eval": pr.eval_rows(store), "seconds": time.monotonic() - t0}
