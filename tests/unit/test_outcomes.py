"""infra/outcomes.py: the CLI's exit code and problem lines from any flow result."""
from __future__ import annotations

from infra.outcomes import EXIT_FAILED, EXIT_OK, EXIT_QUARANTINED, exit_code, problem_lines


def summary(stage, failed=(), quarantined=(), **extra):
    return {"stage": stage, "shards": 3, "done": 1, "skipped": 0, "rows": 9, **extra,
            "failed": [{"part": p, "reason": r} for p, r in failed],
            "quarantined": [{"part": p, "reason": r} for p, r in quarantined]}


def test_all_done_is_zero():
    assert exit_code(summary("ingest")) == EXIT_OK and problem_lines(summary("ingest")) == []


def test_quarantined_only_is_its_own_code_and_names_the_shard():
    s = summary("ingest", quarantined=[(2, "1 null labels (first id 30)")])
    assert exit_code(s) == EXIT_QUARANTINED
    assert problem_lines(s) == ["ingest: part 2 quarantined: 1 null labels (first id 30)"]


def test_a_failed_shard_anywhere_in_a_pipeline_result_wins():
    out = {"dataset": "d", "ingest": summary("ingest", quarantined=[(1, "bad")]),
           "extract": summary("extract"),
           "encode": [summary("encode", coder_id="itq-16-m"), summary("encode", failed=[(4, "StoreError: x")],
                                                                      coder_id="lsh-16-m")]}
    assert exit_code(out) == EXIT_FAILED
    assert problem_lines(out) == ["ingest: part 1 quarantined: bad", "encode lsh-16-m: part 4 failed: StoreError: x"]
