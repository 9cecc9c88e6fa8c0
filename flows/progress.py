"""Gathering shard-task futures with progress logs and artifacts, and summarising their outcomes."""
from __future__ import annotations

import collections
import time
from typing import Any, Iterable

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.futures import as_completed


def gather(futures: list, stage: str, parts: list[list[int]] | None = None) -> list[dict[str, Any]]:
    """Wait for shard futures as they complete, logging and updating a progress artifact.
    A future that raised is recorded as status 'failed' with its error, one outcome per part it
    covered (`parts[i]`: the parts of `futures[i]`; -1 when not given); the run goes on."""
    covered = {id(f): p for f, p in zip(futures, parts or [])}
    log = get_run_logger()
    total = len(futures)
    if total == 0:
        return []
    art = create_progress_artifact(progress=0.0, description=f"{stage}: shards finished")
    out, t0 = [], time.perf_counter()
    for i, fut in enumerate(as_completed(futures), 1):
        try:
            res = fut.result()
            results = res if isinstance(res, list) else [res]
        except Exception as e:  # noqa: BLE001 - one failed shard must not hide the others
            reason = f"{type(e).__name__}: {e}"
            results = [{"stage": stage, "part": p, "status": "failed", "reason": reason}
                       for p in covered.get(id(fut), [-1])]
            log.error("%s: parts %s failed after their retries: %s", stage, [r["part"] for r in results], reason)
        out.extend(results)
        if art is not None:
            update_progress_artifact(art, progress=100.0 * i / total)
        if i == total or i % max(1, total // 10) == 0:
            log.info("%s: %d/%d tasks finished (%.0fs)", stage, i, total, time.perf_counter() - t0)
    return sorted(out, key=lambda r: r.get("part", -1))


def summarize(stage: str, outcomes: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Counts by status, rows written, and the quarantined/failed shards with their reasons."""
    outcomes = list(outcomes)
    counts = collections.Counter(o["status"] for o in outcomes)
    return {
        "stage": stage,
        "shards": len(outcomes),
        "done": counts.get("done", 0),
        "skipped": counts.get("skipped", 0),
        "quarantined": [{"part": o["part"], "reason": o.get("reason", "")} for o in outcomes
                        if o["status"] == "quarantined"],
        "failed": [{"part": o["part"], "reason": o.get("reason", "")} for o in outcomes if o["status"] == "failed"],
        "rows": sum(o.get("rows", 0) for o in outcomes),
        "rows_written": sum(o.get("rows", 0) for o in outcomes if o["status"] == "done"),
        "workers": sorted({o["stats"]["writer"] for o in outcomes
                           if o["status"] == "done" and o.get("stats", {}).get("writer")}),  # host:pid
    }


def summary_line(s: dict[str, Any]) -> str:
    return (f"{s['stage']}: {s['shards']} shards, {s['done']} done, {s['skipped']} skipped, "
            f"{len(s['quarantined'])} quarantined, {len(s['failed'])} failed; {s['rows']} rows")


def publish_summary(s: dict[str, Any], key: str) -> None:
    """Log the one-line summary and each bad shard, and attach a markdown artifact."""
    log = get_run_logger()
    log.info(summary_line(s))
    lines = [f"### {s['stage']}", "", summary_line(s), ""]
    for q in s["quarantined"]:
        log.warning("quarantined part %s: %s", q["part"], q["reason"])
        lines.append(f"- quarantined part {q['part']}: {q['reason']}")
    for f in s["failed"]:
        lines.append(f"- FAILED part {f['part']}: {f['reason']}")
    create_markdown_artifact(markdown="\n".join(lines), key=key, description=summary_line(s))
