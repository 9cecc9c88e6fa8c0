"""flows/progress.py summarize: counts by status, rows, the bad shards with their reasons."""
from __future__ import annotations

from flows.progress import summarize, summary_line


def test_summary_counts_every_status_and_names_bad_shards():
    outcomes = [{"part": 0, "status": "done", "rows": 10, "stats": {"writer": "h:7"}},
                {"part": 1, "status": "skipped", "rows": 10},
                {"part": 2, "status": "quarantined", "reason": "truncated", "rows": 0},
                {"part": 3, "status": "failed", "reason": "StoreError: 503"},
                {"part": 4, "status": "done", "rows": 5, "stats": {"writer": "h:8"}}]
    s = summarize("extract", outcomes)
    assert (s["shards"], s["done"], s["skipped"], s["rows"], s["rows_written"]) == (5, 2, 1, 25, 15)
    assert s["quarantined"] == [{"part": 2, "reason": "truncated"}]
    assert s["failed"] == [{"part": 3, "reason": "StoreError: 503"}]
    assert s["workers"] == ["h:7", "h:8"]  # the writers (host:pid) of the shards done in this run
    assert summary_line(s) == "extract: 5 shards, 2 done, 1 skipped, 1 quarantined, 1 failed; 25 rows"
