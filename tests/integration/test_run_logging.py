"""infra/run_logging.py: the project's own loggers reach a flow run's logs in the Prefect API."""
from __future__ import annotations

import logging
import time
import uuid

import anyio
from prefect import flow, task
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

from infra.run_logging import send_project_logs_to_prefect


@task
def _fit(marker: str) -> None:
    logging.getLogger("encoders.some_coder").info("epoch 1 %s", marker)  # as encoders/training.py logs


@flow
def _run(marker: str) -> str:
    from prefect.runtime import flow_run

    send_project_logs_to_prefect()
    logging.getLogger("infra.store").info("store notice %s", marker)
    _fit(marker)
    return flow_run.id


def test_project_loggers_reach_the_run_logs(prefect_server):
    marker = uuid.uuid4().hex
    run_id = _run(marker)

    async def messages() -> list[str]:
        async with get_client() as c:
            logs = await c.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
            return [f"{l.name}: {l.message}" for l in logs]

    deadline = time.monotonic() + 30
    while True:  # the API handler ships logs in batches
        got = anyio.run(messages)
        if {f"infra.store: store notice {marker}", f"encoders.some_coder: epoch 1 {marker}"} <= set(got):
            break
        assert time.monotonic() < deadline, got
        time.sleep(1)
