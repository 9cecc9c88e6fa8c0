"""What a finished command says about its shards: the exit code and one line per bad shard.

The CLI's contract (flows/cli.py calls `exit_code` and `problem_lines` on what a flow returned):

    0  every shard done or skipped
    1  some shard FAILED (a store or transport fault past its retries): rerun the command
    2  the command could not run (bad name, settings, store unreachable): one-line error
    3  refused by a gate (update-model)
    4  finished, but some shards were QUARANTINED (bad data, reasons recorded): fix and rerun

Failed wins over quarantined: a rerun may finish the failed shards, a quarantined one needs new bytes.
"""
from __future__ import annotations

from typing import Any, Iterator

EXIT_OK, EXIT_FAILED, EXIT_ERROR, EXIT_REFUSED, EXIT_QUARANTINED = 0, 1, 2, 3, 4


def stage_summaries(result: Any) -> Iterator[dict[str, Any]]:
    """Every stage summary (flows.progress.summarize: a dict with 'stage', 'failed' and
    'quarantined') inside a flow's result, however nested (the pipeline's dict, encode's list)."""
    if isinstance(result, dict):
        if "stage" in result and isinstance(result.get("failed"), list) and isinstance(result.get("quarantined"), list):
            yield result
            return
        for value in result.values():
            yield from stage_summaries(value)
    elif isinstance(result, (list, tuple)):
        for value in result:
            yield from stage_summaries(value)


def exit_code(result: Any) -> int:
    """EXIT_FAILED when any shard failed, else EXIT_QUARANTINED when any was quarantined, else 0."""
    summaries = list(stage_summaries(result))
    if any(s["failed"] for s in summaries):
        return EXIT_FAILED
    return EXIT_QUARANTINED if any(s["quarantined"] for s in summaries) else EXIT_OK


def problem_lines(result: Any) -> list[str]:
    """One line per failed or quarantined shard: '<stage>[ <coder>]: part N failed|quarantined: reason'."""
    lines = []
    for s in stage_summaries(result):
        name = s["stage"] + (f" {s['coder_id']}" if s.get("coder_id") else "")
        for status in ("failed", "quarantined"):
            lines += [f"{name}: part {p['part']} {status}: {p['reason']}" for p in s[status]]
    return lines
