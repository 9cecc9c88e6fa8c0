"""`python -m tests.integration.heavy_hold MARKER SECONDS`: a flow run whose one "heavy"-tagged task
writes MARKER once it holds its slot, then sleeps SECONDS. The flow sets the heavy limit the way the
project's flows do (`ensure_heavy_limit(Settings.load().heavy_limit)`). Not a test module: the
subprocess that tests/integration/test_heavy_limit.py SIGKILLs while it holds the slot."""
from __future__ import annotations

import sys
import time
from pathlib import Path

from prefect import flow, task

from flows.limits import HEAVY_TAG, ensure_heavy_limit
from infra.settings import Settings


@task(tags=[HEAVY_TAG])
def hold_slot(marker: str, seconds: float) -> None:
    Path(marker).write_text(str(time.time()))  # the task body runs only once the slot is taken
    time.sleep(seconds)


@flow
def heavy_hold(marker: str, seconds: float) -> None:
    ensure_heavy_limit(Settings.load().heavy_limit)
    hold_slot(marker, seconds)


if __name__ == "__main__":
    heavy_hold(sys.argv[1], float(sys.argv[2]))
