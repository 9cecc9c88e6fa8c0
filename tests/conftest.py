"""Shared fixtures: a real Prefect test server, a real S3 server (SeaweedFS) and stores on both."""
from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
# The session's Prefect server is the test harness (a temporary server): it runs no repossessor, so
# the slot of a run killed while holding a "heavy" slot would stay taken for good and stall every later
# run of the session. flows/limits.py cannot tell it from `prefect server start` (both are named by
# PREFECT_API_URL), so the suite turns the limit off here; tests that want it pass heavy_limit (see
# test_orchestration.py, and test_heavy_limit.py for a real server with a repossessor).
os.environ["CODESHARD_HEAVY_LIMIT"] = "0"

# Hypothesis's 200 ms per-example deadline is a timing assertion: on a loaded shared box it fails
# correct code (test_planner did). Speed is measured in bench/, not asserted in tests.
from hypothesis import settings as _hypothesis_settings  # noqa: E402

_hypothesis_settings.register_profile("codeshard", deadline=None)
_hypothesis_settings.load_profile("codeshard")


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on 1 thread for a module's tests: deterministic and, on a shared loaded box, faster
    than OpenMP spinning on 2. Use with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def one_faiss_thread():
    """faiss (OpenMP) on 1 thread for a module's tests: on shared cores spin-waiting makes faiss
    training 10-40x slower, and one thread makes OPQ / k-means bit-reproducible."""
    import faiss

    n = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(n)


@pytest.fixture(scope="session")
def prefect_server():
    """One Prefect test server for the session (STACK.md: the 30 s default start-up times out here).
    Yields its API URL; subprocesses and Dask workers are pointed at it through PREFECT_API_URL."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        url = PREFECT_API_URL.value()
        old = os.environ.get("PREFECT_API_URL")
        os.environ["PREFECT_API_URL"] = url
        try:
            yield url
        finally:
            if old is None:
                os.environ.pop("PREFECT_API_URL", None)
            else:
                os.environ["PREFECT_API_URL"] = old


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory):
    """A real SeaweedFS S3 server on loopback for the whole session; credentials in the env."""
    from infra.seaweed import DEFAULT_ACCESS_KEY, DEFAULT_SECRET_KEY, start_seaweed, stop_seaweed

    data_dir = tmp_path_factory.mktemp("seaweedfs")
    server = start_seaweed(data_dir, bucket="codeshard-test")
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    os.environ["AWS_ACCESS_KEY_ID"] = DEFAULT_ACCESS_KEY
    os.environ["AWS_SECRET_ACCESS_KEY"] = DEFAULT_SECRET_KEY
    try:
        yield server
    finally:
        stop_seaweed(data_dir)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_settings(seaweed):
    """Settings for a fresh prefix in the session's S3 bucket."""
    from infra.settings import Settings

    return Settings.load(store=f"s3://{seaweed.bucket}/t-{uuid.uuid4().hex[:10]}",
                         s3_endpoint=seaweed.endpoint, max_workers=2, batch_size=256)


@pytest.fixture
def local_settings(tmp_path: Path):
    from infra.settings import Settings

    return Settings.load(store=f"file://{tmp_path / 'store'}", max_workers=2, batch_size=256)


@pytest.fixture(params=["local", "s3"])
def any_settings(request):
    """Both store kinds: the same test runs on the local folder and on SeaweedFS."""
    return request.getfixturevalue(f"{request.param}_settings")


def settings_dict(settings) -> dict:
    """Flow parameter form of a Settings object."""
    return {"store": settings.store, "s3_endpoint": settings.s3_endpoint, "max_workers": settings.max_workers,
            "batch_size": settings.batch_size, "runner": settings.runner}
