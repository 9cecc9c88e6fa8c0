"""Task-runner selection: Prefect's thread pool on one machine, prefect-dask for many.

Every flow is declared with `SettingsTaskRunner()`: it opens the runner that the flow run's own
`settings` parameter selects (runner, max_workers, dask address/workers) at the first task it
submits. So a stage flow runs its tasks where its settings say whether it is called alone, as a
subflow of `pipeline`/`backfill`, or by a deployment (Prefect gives a subflow its own decorator's
runner, never the parent's).
"""
from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterator

from prefect.context import FlowRunContext
from prefect.task_runners import TaskRunner

from infra.settings import Settings

LOCAL_CLUSTER_KWARGS = {"processes": True, "threads_per_worker": 1, "dashboard_address": None}


def task_runner(settings: Settings) -> Any:
    """ThreadPoolTaskRunner(max_workers) or DaskTaskRunner (an address, or a local cluster of
    `dask_workers` single-threaded worker processes; OMP threads are 1 per worker there)."""
    if settings.runner == "threads":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=settings.max_workers)
    from prefect_dask import DaskTaskRunner

    if settings.dask_address:
        return DaskTaskRunner(address=settings.dask_address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": settings.dask_workers, **LOCAL_CLUSTER_KWARGS})


class SettingsTaskRunner(TaskRunner):
    """A flow's task runner that defers to `task_runner(Settings.load(**settings))`, where
    `settings` is the running flow's parameter of that name (absent: environment defaults).
    The real runner is started at the first submit (a flow that submits nothing starts none)
    and stopped with this one. Cost: nothing until the first task; then the chosen runner's."""

    def __init__(self) -> None:
        super().__init__()
        self._inner: TaskRunner | None = None
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return "settings"

    def duplicate(self) -> "SettingsTaskRunner":
        return type(self)()

    def selected(self) -> TaskRunner:
        """The started runner that this flow run's settings select."""
        with self._lock:
            if self._inner is None:
                ctx = FlowRunContext.get()
                params = (ctx.parameters if ctx is not None else None) or {}
                cfg = Settings.load(**(params.get("settings") or {}))
                inner = task_runner(cfg)
                inner.__enter__()
                self._inner = inner
                self.logger.debug("tasks of this flow run on %s", type(inner).__name__)
            return self._inner

    def __getstate__(self) -> dict[str, Any]:
        # the flow (and so this runner) travels with each task to a Dask worker: never the started
        # runner or the lock, which belong to this process
        state = self.__dict__.copy()
        state.update(_inner=None, _lock=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _lock=threading.Lock())

    def submit(self, task, parameters, wait_for=None, dependencies=None):  # type: ignore[override]
        return self.selected().submit(task, parameters, wait_for, dependencies)

    def map(self, task, parameters, wait_for=None):  # type: ignore[override]
        return self.selected().map(task, parameters, wait_for)

    def __exit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> None:
        with self._lock:
            inner, self._inner = self._inner, None
        try:
            if inner is not None:
                inner.__exit__(exc_type, exc_value, traceback)
        finally:
            super().__exit__(exc_type, exc_value, traceback)


@contextlib.contextmanager
def shared_cluster(settings: dict[str, Any] | None) -> Iterator[dict[str, Any] | None]:
    """For a flow that calls several stage flows: with runner 'dask' and no address, start one
    local cluster for all of them and yield `settings` with its address, so each stage connects
    to it instead of starting its own (worker start-up costs seconds per process). Otherwise
    yields `settings` unchanged."""
    cfg = Settings.load(**(settings or {}))
    if cfg.runner != "dask" or cfg.dask_address:
        yield settings
        return
    from distributed import LocalCluster

    with LocalCluster(n_workers=cfg.dask_workers, **LOCAL_CLUSTER_KWARGS) as cluster:
        yield {**(settings or {}), "runner": "dask", "dask_address": cluster.scheduler_address}
