"""Index build flow: one index per coder x code length, from stored code shards (never re-encoded).

plan (count rows, choose the index type under the memory budget) -> [train the coarse quantizer] ->
one partial index per batch of shards (parallel tasks, staged in the store) -> merge into a claimed
version -> evaluate and write build.json -> move CURRENT with a conditional write.

Peak memory: each batch task holds one batch; the merge holds the final index (for flat code indexes
that is N x bytes per item whatever the batching) plus one partial and the serialised bytes.
"""
from __future__ import annotations

import collections
import dataclasses
import time
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from encoders.coders import Coder
from flows.limits import ensure_heavy_limit
from infra import indexes as ix
from infra import layout
from infra.planner import ShardRef, batch_shards, select_shards
from infra.registry import load_coder
from infra.devices import use_device
from infra.runners import SettingsTaskRunner
from infra.settings import Settings
from infra.store import PreconditionFailed, Store, shared_store
from tasks.index import count_rows, evaluate_version, index_batch, merge_index, train_index

COUNT_SHARDS_PER_TASK = 64


def resolve_bits(coder: Coder, bits: int | None) -> int:
    """`bits` if the coder produces that length; its full length when None (or 0)."""
    if not bits:
        return int(coder.full_bits)
    if bits not in coder.lengths:
        raise ValueError(f"coder {coder.method} has no {bits}-bit codes; its lengths are {list(coder.lengths)}")
    return int(bits)


@flow(name="build-index", flow_run_name="build index of {dataset} {coder_id}", log_prints=True, task_runner=SettingsTaskRunner())
def build_index(dataset: str, coder_id: str, bits: int | None = None, name: str | None = None,
                memory_budget: str | int = "2GB", force: bool = False, shards_per_task: int | None = None,
                index_type: str | None = None, exclude_split: str | None = None,
                recall_target: float = ix.RECALL_TARGET, device: str = "cpu",
                settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Build and publish index `name` over codes/<dataset>/<coder_id>/ at `bits` (default: full).

    The index holds every stored item unless `exclude_split` names a raw split (e.g. 'query', the
    evaluation's held-out queries) whose rows are left out: an explicit choice, recorded in
    build.json ('exclude_split', 'excluded_rows') and logged, and kept by later refreshes.

    Skipped (status 'skipped') when CURRENT already covers exactly these shards with this coder and
    length, unless `force`. A build that loses the race for CURRENT to another writer is discarded
    and returns status 'superseded' (run `codeshard index refresh` to add anything newer).
    `index_type`: our type name or a faiss index_factory string ('IVF4096,PQ8x8', 'BIVF1024'); None:
    the memory-budget rule chooses. IVF / HNSW indexes get the smallest nprobe / efSearch reaching
    recall@10 >= `recall_target` against exact search (build.json 'plan' and 'eval.tuning').
    `device`: 'cuda' trains coarse quantizers with faiss on the GPU (falls back to CPU, logged).
    Returns a small summary: status, version, uri, n, index_type, recall_at_10, p50/p99 ms, seconds.
    """
    layout.check_names(dataset=dataset, coder=coder_id)  # the index name once its default is known, below
    cfg = Settings.load(**(settings or {}))
    ensure_heavy_limit(cfg.heavy_limit)
    store = shared_store(cfg)
    log = get_run_logger()
    budget = ix.parse_bytes(memory_budget)
    coder, card = load_coder(store, coder_id)
    bits = resolve_bits(coder, bits)
    name = layout.check_name("index", name or layout.index_name(dataset, coder_id, bits))
    prefix = layout.codes_prefix(dataset, coder_id)
    refs = select_shards(store.list(prefix))
    if not refs:
        raise ValueError(f"no code shards under {store.uri_of(prefix)}: run `codeshard encode --dataset "
                         f"{dataset} --coder {coder_id}` first")
    current = ix.read_current(store, name)
    if current is not None and not force:
        prev = ix.read_build(store, name, current.version)
        # builds before 'exclude_split' was recorded left the query split out
        same = ((prev.coder_checksum, prev.bits, prev.dataset, prev.exclude_split)
                == (card["checksum"], bits, dataset, exclude_split))
        if same and ix.plan_refresh(prev.inputs + prev.invalid, refs).empty:
            log.info("index %s v%d already covers these %d shards: skipped (force=True rebuilds)",
                     name, current.version, len(refs))
            return summary(store, name, prev, "skipped")

    t0 = time.perf_counter()
    groups = batch_shards(refs, max_tasks=-(-len(refs) // COUNT_SHARDS_PER_TASK))
    rows = [r for f in [count_rows.submit(cfg, g) for g in groups] for r in f.result()]
    n, bpi = sum(rows), coder.bytes_per_item(bits)
    plan = ix.choose_index(n, bpi, ix.index_kind(coder), budget, adc_engine=ix.adc_engine_for(coder, bits),
                           index_type=index_type, codec=ix.codec_of(coder, bits))
    per = shards_per_task or ix.shards_per_task(n / len(refs), bpi, budget, cfg.max_workers, len(refs))
    batches = [refs[i:i + per] for i in range(0, len(refs), per)]
    log.info("index %s: %s over N=%d %s codes of %d bytes (%s; ~%s resident), %d shards in %d batches",
             name, plan.index_type, n, plan.kind, bpi, plan.reason, ix.human_bytes(plan.memory_bytes),
             len(refs), len(batches))
    asked = ix.BuildRecord(format=ix.FORMAT, name=name, mode="build", dataset=dataset, coder_id=coder_id,
                           coder_checksum=card["checksum"], method=card.get("method", coder.method),
                           model_id=card.get("model_id"), bits=bits, memory_budget=budget,
                           index_type_requested=index_type, exclude_split=exclude_split, based_on=None,
                           recall_target=recall_target, device=use_device(device))
    return run_build(cfg, store, plan, batches, current, asked, plan_s=time.perf_counter() - t0)


def run_build(cfg: Settings, store: Store, plan: ix.IndexPlan, batches: list[list[ShardRef]],
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
