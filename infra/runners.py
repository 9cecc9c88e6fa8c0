"""Task-runner selection: Prefect's thread pool on one machine, prefect-dask for many."""
from __future__ import annotations

from typing import Any

from infra.settings import Settings


def task_runner(settings: Settings) -> Any:
    """ThreadPoolTaskRunner(max_workers) or DaskTaskRunner (an address, or a local cluster of
    `dask_workers` single-threaded worker processes; OMP threads are 1 per worker there)."""
    if settings.runner == "threads":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=settings.max_workers)
    from prefect_dask import DaskTaskRunner

    if settings.dask_address:
        return DaskTaskRunner(address=settings.dask_address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": settings.dask_workers, "processes": True,
                                          "threads_per_worker": 1, "dashboard_address": None})
