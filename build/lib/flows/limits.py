"""The concurrency limit on heavy task runs (tag "heavy": model forward passes, coder fits, index
builds), enforced by the Prefect server across every flow run and every worker using the same API."""
from __future__ import annotations

import logging

HEAVY_TAG = "heavy"


def ensure_heavy_limit(limit: int) -> None:
    """Make the server's tag concurrency limit for "heavy" task runs `limit` (Settings.heavy_limit);
    0 leaves the server's limits as they are. A task run waits for a slot before it starts.

    Only against a Prefect server named by PREFECT_API_URL (`prefect server start`): its lease reaper
    gives back the slot of a run killed mid-task once the lease (60 s) runs out. A temporary
    (ephemeral) server runs no reaper and keeps such a slot taken for good, so without
    PREFECT_API_URL the limit is not set (a warning says so). Cost: one Prefect API call (an upsert)."""
    if limit <= 0:
        return
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        logging.getLogger(__name__).warning(
            "heavy_limit=%d not set: it needs a Prefect server (PREFECT_API_URL); a temporary server "
            "never gives back the slot of a killed run", limit)
        return
    with get_client(sync_client=True) as client:
        client.create_concurrency_limit(tag=HEAVY_TAG, concurrency_limit=limit)
