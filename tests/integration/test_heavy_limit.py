"""The "heavy" concurrency limit survives a killed run (flows/limits.py): on a real `prefect server
start` (repossessor loop 2 s), a run SIGKILLed while its heavy task holds the only slot gives it
back once the 60 s lease runs out, and the next run's heavy task starts within KILL_BOUND_S of the
kill. The counter-case, with the repossessor off, shows the check can fail: the slot stays held,
the next run still waits at the bound, and `ensure_heavy_limit` refuses to set a limit there."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.prefect_server import REPO, base_env, prefect_server, stop

# The slot comes back 60 s (Prefect's lease, not configurable below 60 s) after the last renewal,
# i.e. at most 60 s after the kill, plus a repossessor loop (2 s here) plus the waiting task's
# retry delay (<= ~10 s, PREFECT_SERVER_TASKS_TAG_CONCURRENCY_SLOT_WAIT_SECONDS); the rest is slack.
KILL_BOUND_S = 120


def _start_hold(url: str, home: Path, marker: Path, seconds: float, log: Path) -> subprocess.Popen:
    env = base_env(home) | {"PREFECT_API_URL": url, "CODESHARD_HEAVY_LIMIT": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "tests.integration.heavy_hold", str(marker), str(seconds)],
                            env=env, cwd=REPO, stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _wait_for(path: Path, proc: subprocess.Popen, log: Path, deadline: float) -> bool:
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before its heavy task started:\n"
                                 + log.read_text(errors="replace")[-3000:])
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def _heavy_slots(url: str) -> tuple[int, int] | None:
    """(active slots, limit) of the server's `tag:heavy` limit, or None when there is none."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: url}), get_client(sync_client=True) as c:
        for g in c.read_global_concurrency_limits(limit=200):
            if g.name == "tag:heavy":
                return int(g.active_slots), int(g.limit)
    return None


@pytest.mark.slow  # a real server (~10-30 s to start) and a 60 s lease to run out: ~2 min each
@pytest.mark.parametrize("repossessor", ["on", "off"])
def test_killed_runs_heavy_slot_comes_back(tmp_path, repossessor):
    """Run A's heavy task takes the only slot (limit 1, set by the flow from CODESHARD_HEAVY_LIMIT;
    the API shows 1 of 1 held); A is SIGKILLed mid-task and the slot is still held right after.
    Run B starts: with the repossessor on, B's heavy task starts within KILL_BOUND_S of the kill,
    B finishes and no slot stays held. Off: B still waits at the bound, the slot still held."""
    home = tmp_path / "prefect-home"
    home.mkdir()
    server = {} if repossessor == "on" else {"PREFECT_SERVER_SERVICES_REPOSSESSOR_ENABLED": "false"}
    logs = {name: tmp_path / f"{name}.log" for name in ("a", "b")}
    marks = {name: tmp_path / f"{name}.started" for name in ("a", "b")}
    with prefect_server(home, **server) as url:
        if repossessor == "off":  # the flow refuses to set the limit on such a server: set it by hand
            from prefect.client.orchestration import get_client
            from prefect.settings import PREFECT_API_URL, temporary_settings

            from flows.limits import ensure_heavy_limit

            with temporary_settings(updates={PREFECT_API_URL: url}):
                assert ensure_heavy_limit(1) is False and _heavy_slots(url) is None
                with get_client(sync_client=True) as c:
                    c.create_concurrency_limit(tag="heavy", concurrency_limit=1)
        a = _start_hold(url, home, marks["a"], 600, logs["a"])
        b = None
        try:
            assert _wait_for(marks["a"], a, logs["a"], time.monotonic() + 180), "run A's heavy task never started"
            assert _heavy_slots(url) == (1, 1)
            os.killpg(a.pid, signal.SIGKILL)
            a.wait(10)
            killed = time.monotonic()
            assert _heavy_slots(url) == (1, 1), "the kill should leave the slot held until its lease runs out"
            b = _start_hold(url, home, marks["b"], 0, logs["b"])
            started = _wait_for(marks["b"], b, logs["b"], killed + KILL_BOUND_S)
            waited = time.monotonic() - killed
            if repossessor == "off":
                assert not started and _heavy_slots(url) == (1, 1), (
                    f"without a repossessor run B started {waited:.0f}s after the kill: the slot came back "
                    "some other way, and the 'on' case no longer shows the repossessor at work")
                return
            assert started, (f"run B's heavy task did not start within {KILL_BOUND_S}s of the kill; "
                             f"tag:heavy (active, limit) = {_heavy_slots(url)}\n"
                             + logs["b"].read_text(errors="replace")[-3000:])
            assert b.wait(120) == 0, logs["b"].read_text(errors="replace")[-3000:]
            assert _heavy_slots(url) == (0, 1)
            print(f"\nrun B's heavy task started {waited:.0f}s after run A was SIGKILLed holding the slot")
        finally:
            for p in (a, b):
                if p is not None:
                    stop(p, grace=5)
