"""The project's own loggers (encoders.*, infra.*, tasks.*, flows.*) in Prefect's run logs.

Prefect sends only its own loggers (and PREFECT_LOGGING_EXTRA_LOGGERS, read once at process start)
to the API. A deployment run calls `send_project_logs_to_prefect()` first, so training epochs,
store notices and planner decisions show in the run's logs in the UI whatever the worker's env."""
from __future__ import annotations

import logging

PROJECT_LOGGERS = ("encoders", "infra", "tasks", "flows")


def send_project_logs_to_prefect(level: int = logging.INFO) -> list[str]:
    """Attach Prefect's API log handler to each project logger (once) and let INFO through.
    Records logged outside a flow or task run are dropped by that handler, as Prefect's own are.
    Returns the logger names it attached to. Cost: none per record beyond Prefect's batching."""
    from prefect.logging.handlers import APILogHandler

    attached = []
    for name in PROJECT_LOGGERS:
        lg = logging.getLogger(name)
        if not any(isinstance(h, APILogHandler) for h in lg.handlers):
            handler = APILogHandler()
            handler.addFilter(_in_a_run)
            lg.addHandler(handler)
            attached.append(name)
        if lg.level == logging.NOTSET or lg.level > level:
            lg.setLevel(level)
    return attached


def _in_a_run(record: logging.LogRecord) -> bool:
    """Only records logged inside a flow or task run go to the API (no warning per other record)."""
    from prefect.context import FlowRunContext, TaskRunContext

    return FlowRunContext.get() is not None or TaskRunContext.get() is not None
