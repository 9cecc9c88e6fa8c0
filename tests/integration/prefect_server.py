"""A real `prefect server start` (loopback, temporary PREFECT_HOME) and a process worker, as
subprocesses that the fixture stops. Used where the ephemeral test server is not enough: event
triggers, schedules, workers and the lease repossessor run only in a real server."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import anyio
import httpx

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update({"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
                "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO) + os.pathsep + env.get("PYTHONPATH", "")})
    return env


def stop(proc: subprocess.Popen, grace: float = 10) -> None:
    """SIGTERM the process group, SIGKILL it after `grace` seconds."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


@contextlib.contextmanager
def prefect_server(home: Path, timeout: float = 180, **settings: str) -> Iterator[str]:
    """Yield the API URL of `prefect server start` on a free loopback port (services on: scheduler,
    triggers, repossessor; loops shortened for tests). `settings`: extra PREFECT_* variables."""
    port = free_port()
    env = base_env(home) | {"PREFECT_UI_ENABLED": "false",
                            "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5",
                            "PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS": "2",
                            "PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED": "false"} | settings
    log = open(home / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError("prefect server exited:\n" + (home / "server.log").read_text()[-3000:])
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError("prefect server not healthy:\n" + (home / "server.log").read_text()[-3000:])
            time.sleep(0.5)
        yield url
    finally:
        stop(proc)
        log.close()


@contextlib.contextmanager
def process_worker(home: Path, url: str, pool: str, **env_extra: str) -> Iterator[subprocess.Popen]:
    """`prefect worker start --pool pool --type process` polling every 2 s; stopped on exit."""
    env = base_env(home) | {"PREFECT_API_URL": url, "PREFECT_WORKER_QUERY_SECONDS": "2",
                            "PREFECT_WORKER_PREFETCH_SECONDS": "5"} | env_extra
    log = open(home / f"worker-{pool}.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type",
                             "process"], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        stop(proc)
        log.close()


def artifacts_and_logs(flow_run_id, expect: str) -> tuple[list, list[str]]:
    """The run's artifacts and its log messages, read back from the server once a message starting
    with `expect` has arrived (run logs reach the API in batches; at most 20 s)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterFlowRunId, LogFilter,
                                                LogFilterFlowRunId)

    async def read():
        async with get_client() as c:
            arts = await c.read_artifacts(artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
            logs = await c.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
            return arts, [entry.message for entry in logs]

    deadline = time.monotonic() + 20
    while True:
        arts, logs = anyio.run(read)
        if any(m.startswith(expect) for m in logs) or time.monotonic() > deadline:
            return arts, logs
        time.sleep(0.5)
