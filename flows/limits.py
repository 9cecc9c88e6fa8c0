"""The concurrency limit on heavy task runs (tag "heavy": model forward passes, coder fits, index
builds), enforced by the Prefect server across every flow run and every worker using the same API.

How a killed run's slot comes back (Prefect 3.8.8, checked in its source): a task run takes its
`tag:heavy` slot client-side with a 60 s lease (`task_engine`: `_concurrency(lease_duration=60)`;
the server refuses leases under 60 s), renewed every 45 s while the task runs. A SIGKILLed run stops
renewing; the server's repossessor service (every 15 s by default,
PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS) frees the expired lease, so the slot is back
within about 60 s + one repossessor loop (tests/integration/test_heavy_limit.py). Only
`prefect server start` runs the repossessor: a temporary (ephemeral) server, the test harness's
included, runs none and keeps such a slot taken for good.
"""
from __future__ import annotations

import logging
from typing import Iterable

from prefect import Task

HEAVY_TAG = "heavy"
LOG = logging.getLogger(__name__)


def ensure_heavy_limit(limit: int) -> bool:
    """Make the server's tag concurrency limit for "heavy" task runs `limit` (Settings.heavy_limit,
    default 4); 0 leaves the server's limits as they are. A task run waits for a slot before it
    starts. Returns whether the limit was set.

    Set only against a server that gives back a killed run's slots: one named by PREFECT_API_URL
    (`prefect server start`, a temporary server has no repossessor) whose settings do not turn the
    repossessor off. Otherwise the limit is not set, and a log line says why (debug without a
    server, a warning when a named server's repossessor is off). A temporary server named by
    PREFECT_API_URL (the test harness) cannot be told apart: tests/conftest.py sets
    CODESHARD_HEAVY_LIMIT=0 for it. Cost: two Prefect API calls (read settings, upsert the limit)."""
    if limit <= 0:
        return False
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        # the ordinary case of a run without a server (the demo, a CLI command): no limit to share,
        # so a debug line (-v), not a warning on every command
        LOG.debug("heavy_limit=%d not set: it needs a Prefect server (PREFECT_API_URL); a temporary "
                  "server never gives back the slot of a killed run", limit)
        return False
    with get_client(sync_client=True) as client:
        if not _server_reaps_leases(client):
            LOG.warning("heavy_limit=%d not set: the Prefect server's repossessor is off "
                        "(PREFECT_SERVER_SERVICES_REPOSSESSOR_ENABLED), so it would never give back the "
                        "slot of a killed run", limit)
            return False
        client.create_concurrency_limit(tag=HEAVY_TAG, concurrency_limit=limit)
    return True


def _server_reaps_leases(client) -> bool:
    """False when the server's own settings (GET /admin/settings) turn the repossessor off; True
    when they leave it on or cannot be read (a server that hides them is taken at its word)."""
    try:
        services = client._client.get("/admin/settings").raise_for_status().json()["server"]["services"]
        return bool(services["repossessor"]["enabled"])
    except Exception as e:  # noqa: BLE001 - an older or locked-down server: keep the limit
        LOG.debug("could not read the server's repossessor setting: %s", e)
        return True


def limited_tags(tags: Iterable[str]) -> frozenset[str]:
    """The tags among `tags` that the Prefect server holds an active concurrency limit for (the
    server's "tag:<tag>" limits, which `ensure_heavy_limit` creates). A tag whose limit cannot be
    read is counted as limited. Cost: one Prefect API read per tag."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    limited = set()
    with get_client(sync_client=True) as client:
        for tag in set(tags):
            try:
                if client.read_global_concurrency_limit_by_name(f"tag:{tag}").active:
                    limited.add(tag)
            except ObjectNotFound:
                pass
            except Exception as e:  # noqa: BLE001 - unreadable: keep the tag, the server decides per run
                LOG.debug("concurrency limit of tag %r not read (the tag stays): %s", tag, e)
                limited.add(tag)
    return frozenset(limited)


def server_tagged(*tasks: Task) -> tuple[Task, ...]:
    """`tasks`, each carrying only the tags the server holds a limit for (`only_limited_tags`): what
    every flow submits, so no task run asks for a slot of a tag without a limit. Cost: one Prefect
    API read per distinct tag."""
    limited = limited_tags(set().union(*(t.tags for t in tasks)))
    return tuple(only_limited_tags(t, limited) for t in tasks)


def only_limited_tags(task: Task, limited: frozenset[str]) -> Task:
    """`task` carrying only those of its tags in `limited`. Why: Prefect asks the server for a slot
    of every tag a task run carries (a write transaction), limit or none; on the SQLite server a
    transaction that collides with another answers 503 and the client retries after ~2 s
    (BENCHMARKS.md section 1). A tag without a limit takes no slot, so dropping it changes nothing
    but the run's tag list. Cost: none (a copy of the task)."""
    keep = set(task.tags) & limited
    if keep == set(task.tags):
        return task
    copy = task.with_options()
    copy.tags = keep  # with_options(tags=set()) would keep the old tags
    return copy
