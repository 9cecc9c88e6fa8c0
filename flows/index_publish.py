"""The publish steps that an index build and a refresh share, run inside their flow:

one partial index per batch of shards (parallel `index_batch` tasks, staged in the store) -> merge
onto an optional base version -> evaluate and write build.json (a `BuildRecord`) -> move CURRENT
with a conditional write; a lost race discards the version, nothing of it visible.
"""
from __future__ import annotations

import collections
import dataclasses
import time
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.limits import server_tagged
from infra import indexes as ix
from infra import layout
from infra.planner import ShardRef
from infra.settings import Settings
from infra.store import PreconditionFailed, Store
from tasks.index import evaluate_version, index_batch, merge_index, train_index

_TASKS = (train_index, index_batch, merge_index, evaluate_version)


def publish_version(cfg: Settings, store: Store, plan: ix.IndexPlan, batches: list[list[ShardRef]],
              current: ix.Current | None, asked: ix.BuildRecord, plan_s: float = 0.0,
              base: ix.BuildRecord | None = None, drop_parts: list[int] | None = None,
              trained: dict[str, Any] | None = None, eval_parts: list[int] | None = None,
              cleanup_on_loss: bool = True) -> dict[str, Any]:
    """Partial indexes per batch -> merge (onto `base` build's version minus `drop_parts`, if given)
    -> evaluate -> conditional CURRENT move from `current`. `asked`: the build record's first block
    (what was asked); `plan_s`: seconds spent planning. Returns summary(...) with status
    'published' or 'superseded' (another writer moved CURRENT first; this version was discarded)."""
    log = get_run_logger()
    name, coder_id, bits, budget = asked.name, asked.coder_id, asked.bits, asked.memory_budget
    t0 = time.perf_counter()
    build_id = ix.new_build_id()
    pd = plan.as_dict()
    train_index, index_batch, merge_index, evaluate_version = server_tagged(*_TASKS)
    train_s, staged = 0.0, []
    if plan.needs_training and trained is None:
        tr = train_index.submit(cfg, name, coder_id, bits, pd, [r for b in batches for r in b],
                                device=asked.device).result()
        trained, train_s = {k: tr[k] for k in ("key", "checksum", "rows", "niter")}, tr["seconds"]
        staged.append(layout.folder_of(tr["key"]))
    t_add = time.perf_counter()
    futures = [index_batch.submit(cfg, name, coder_id, bits, pd, b, trained, asked.exclude_split)
               for b in batches]
    partials, failures = [], []
    for b, f in zip(batches, futures):
        try:
            partials.append(f.result())
        except Exception as e:  # noqa: BLE001 - report every failed batch, then stop
            failures.append(f"parts {b[0].part}..{b[-1].part}: {type(e).__name__}: {e}")
    if failures:
        raise ix.IndexBuildError(f"index {name}: {len(failures)} of {len(batches)} batches failed, nothing "
                                 f"published; rerun to resume (staged batches are reused). First: {failures[0]}")
    add_wall = time.perf_counter() - t_add
    staged += [p["staging"] for p in partials]
    merged = merge_index.submit(cfg, name, coder_id, bits, pd, partials, budget,
                                current.version if current else 0, build_id,
                                base.version if base else None, drop_parts, trained).result()
    version = merged["version"]
    dropped = set(drop_parts or [])
    inputs = [i for i in (base.inputs if base else []) if i["part"] not in dropped]
    read_keys = {i["key"] for p in partials for i in p["inputs"] + p["invalid"]}
    invalid = [i for i in (base.invalid if base else []) if i["key"] not in read_keys and i["part"] not in dropped]
    reads = collections.Counter(k for p in partials for k in p.get("code_shards_read", []))
    resident = ix.index_memory_bytes(plan.index_type, merged["n"], plan.bytes_per_item, plan.nlist,
                                     plan.hnsw_m or ix.HNSW_M)
    all_inputs = sorted(inputs + [i for p in partials for i in p["inputs"]], key=lambda i: i["part"])
    build = dataclasses.replace(
        asked, build_id=build_id, version=version,
        plan={**pd, "n": merged["n"], "memory_bytes": resident},
        n=merged["n"], removed_rows=merged["removed"], duplicate_ids=merged["duplicates"],
        excluded_rows=sum(i.get("excluded", 0) for i in all_inputs),
        index_bytes=merged["index_bytes"], ids_bytes=merged["ids_bytes"], inputs=all_inputs,
        invalid=sorted(invalid + [i for p in partials for i in p["invalid"]], key=lambda i: i["part"]),
        batches={"total": len(partials), "done": sum(p["status"] == "done" for p in partials),
                 "skipped": sum(p["status"] == "skipped" for p in partials)},
        seconds={"plan": plan_s, "train": train_s, "add_wall": add_wall,
                 "add_tasks": sum(p["seconds"] for p in partials if p["status"] == "done"),
                 "merge": merged["merge_s"]},
        peak_rss_bytes={"batch_tasks": max((p["peak_rss_bytes"] for p in partials), default=0),
                        "merge": merged["peak_rss_bytes"]},
        code_shards_read=dict(sorted(reads.items())), trained=trained,
        batch_writers=sorted({p["writer"] for p in partials if p["status"] == "done" and p.get("writer")}))
    if build.exclude_split:
        log.info("index %s: %d rows of split %r left out, as asked (exclude_split)", name, build.excluded_rows,
                 build.exclude_split)
    try:
        # the task takes and returns the record's JSON form (task parameters and results stay JSON)
        full = ix.BuildRecord.from_json(evaluate_version.submit(cfg, name, version, build.to_json(),
                                                                eval_parts).result())
        full.seconds["eval"] = full.eval.get("seconds", 0.0)
        full.seconds["total"] = time.perf_counter() - t0 + plan_s
        ix.write_build(store, name, version, full)
    except BaseException:
        ix.discard_version(store, name, version)
        raise
    try:
        ix.commit_current(store, name, version, current, build_id)
    except PreconditionFailed:
        ix.discard_version(store, name, version)
        now = ix.read_current(store, name)
        log.warning("index %s: another run moved CURRENT to v%s while this one built v%d; this version was "
                    "discarded (nothing of it is visible)", name, now.version if now else "?", version)
        if cleanup_on_loss:
            _cleanup(store, staged)
        return {**summary(store, name, full, "superseded"), "current_version": now.version if now else None,
                "staged": staged}
    _cleanup(store, staged)
    log.info("index %s: published v%d (N=%d, %s, recall@10 %s, p50 %s ms, p99 %s ms)", name, version,
             full.n, plan.index_type, full.eval.get("recall_at_10"), full.eval.get("p50_ms"),
             full.eval.get("p99_ms"))
    _artifact(name, full)
    return summary(store, name, full, "published")


def _cleanup(store: Store, prefixes: list[str]) -> None:
    for p in dict.fromkeys(prefixes):
        store.delete_prefix(p)


def summary(store: Store, name: str, build: ix.BuildRecord, status: str) -> dict[str, Any]:
    """The small dict flows return: status, version, uri and the build.json figures."""
    ev = build.eval
    return {"status": status, "name": name, "version": build.version,
            "uri": store.uri_of(layout.index_version_prefix(name, build.version)),
            "n": build.n, "index_type": build.plan["index_type"], "bits": build.bits,
            "recall_at_10": ev.get("recall_at_10"), "p50_ms": ev.get("p50_ms"), "p99_ms": ev.get("p99_ms"),
            "seconds": build.seconds, "batches": build.batches,
            "code_shards_read": build.code_shards_read, "based_on": build.based_on,
            "excluded": {"split": build.exclude_split, "rows": build.excluded_rows}
            if build.exclude_split else None}


def _artifact(name: str, b: ix.BuildRecord) -> None:
    s, ev, rss = b.seconds, b.eval, b.peak_rss_bytes
    rows = [("version", f"v{b.version:06d} ({b.mode}, based on {b.based_on})"),
            ("coder", f"{b.coder_id} ({b.method}, {b.bits} bits, checksum {b.coder_checksum})"),
            ("index type", f"{b.plan['index_type']} — {b.plan['reason']}"),
            ("N", f"{b.n:,} ({len(b.inputs)} shards, {len(b.invalid)} invalid)"),
            ("bytes", f"index {b.index_bytes:,}, ids {b.ids_bytes:,}, est. resident "
                      f"{ix.human_bytes(b.plan['memory_bytes'])}"),
            ("seconds", ", ".join(f"{k} {v:.2f}" for k, v in s.items() if isinstance(v, (int, float)))),
            ("peak RSS", f"batch tasks {ix.human_bytes(rss['batch_tasks'])}, merge {ix.human_bytes(rss['merge'])}"),
            ("recall@10", f"{ev.get('recall_at_10')} ({ev.get('queries')} queries from {ev.get('query_source')})"),
            ("latency", f"p50 {ev.get('p50_ms')} ms, p99 {ev.get('p99_ms')} ms per query")]
    md = "\n".join([f"### index `{name}`", "", "| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows]])
    create_markdown_artifact(markdown=md, key=layout.artifact_key("index", name),
                             description=f"index {name} v{b.version}")
