"""Failure notifications for deployment runs: an `on_failure` hook that always writes the failure to
the run's logs and to a markdown artifact, and also sends it through a Prefect notification block
when one is configured (`CODESHARD_NOTIFY_BLOCK=<block-type-slug>/<block-name>`, e.g.
`slack-webhook/codeshard-alerts`; created by the user in the UI or with `Block.save`)."""
from __future__ import annotations

import logging
import os
from typing import Any

from infra import layout

NOTIFY_BLOCK_ENV = "CODESHARD_NOTIFY_BLOCK"
LOG = logging.getLogger(__name__)


def failure_message(flow_name: str, flow_run: Any, state: Any) -> tuple[str, str]:
    """(subject, markdown body) of a failed run: flow, run name and id, deployment, state message."""
    dep = getattr(flow_run, "deployment_id", None)
    subject = f"codeshard: {flow_name} run {flow_run.name} {state.name.lower()}"
    body = "\n".join([f"### {subject}", "",
                      f"- flow run: `{flow_run.id}`" + (f" (deployment `{dep}`)" if dep else ""),
                      f"- state: {state.name}", f"- message: {state.message or '(none)'}",
                      f"- parameters: `{ {k: v for k, v in (flow_run.parameters or {}).items() if k != 'settings'} }`"])
    return subject, body


def notify_failure(flow: Any, flow_run: Any, state: Any) -> None:
    """Prefect `on_failure`/`on_crashed` hook. Never raises: a broken notifier must not hide the
    failure it reports (its own error is logged). Cost: one artifact write, one block call."""
    from prefect.artifacts import create_markdown_artifact
    from prefect.logging.loggers import flow_run_logger

    log = flow_run_logger(flow_run, flow)
    subject, body = failure_message(flow.name, flow_run, state)
    log.error("%s: %s", subject, state.message)
    try:
        create_markdown_artifact(markdown=body, key=layout.artifact_key("failure", flow.name),
                                 description=subject)
    except Exception as e:  # noqa: BLE001 - reported, never raised from a hook
        log.warning("failure artifact not written: %s: %s", type(e).__name__, e)
    block = os.environ.get(NOTIFY_BLOCK_ENV, "").strip()
    if block:
        try:
            send_notification(block, subject, body)
            log.info("failure notification sent through block %s", block)
        except Exception as e:  # noqa: BLE001
            log.error("failure notification through block %s failed: %s: %s", block, type(e).__name__, e)


def send_notification(block: str, subject: str, body: str) -> None:
    """Load notification block `block` ('<type-slug>/<name>') and notify(body, subject)."""
    from prefect.blocks.core import Block

    Block.load(block).notify(body=body, subject=subject)


FAILURE_HOOKS = {"on_failure": [notify_failure], "on_crashed": [notify_failure]}
