"""Index build flow: one index per coder x code length, from stored code shards (never re-encoded).

plan (count rows, choose the index type under the memory budget) -> [train the coarse quantizer] ->
one partial index per batch of shards (parallel tasks, staged in the store) -> merge into a claimed
version -> evaluate and write build.json -> move CURRENT with a conditional write (every step from
the batches on is flows/index_publish.publish_version, shared with the refresh flow).

Peak memory: each batch task holds one batch; the merge holds the final index (for flat code indexes
that is N x bytes per item whatever the batching) plus one partial and the serialised bytes.
"""
from __future__ import annotations

import time
from typing import Any

from prefect import flow, get_run_logger

from encoders.coders import Coder
from flows.index_publish import publish_version, summary
from flows.limits import ensure_heavy_limit
from infra import indexes as ix
from infra import layout
from infra.planner import batch_shards, select_shards
from infra.registry import load_coder
from infra.devices import use_device
from infra.runners import SettingsTaskRunner
from infra.settings import Settings
from infra.store import shared_store
from tasks.index import count_rows

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
                merge_on_disk: bool | None = None, settings: dict[str, Any] | None = None) -> dict[str, Any]:
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
    `merge_on_disk`: merge the IVF partials into one index.ivfdata file published beside index.faiss
    (True), in memory (False), or by the rule (None: on disk when 2 x the index exceeds the budget;
    `ix.choose_merge`), recorded in build.json ('merge_on_disk_requested', 'plan.ondisk').
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
    plan = ix.choose_merge(plan, budget, merge_on_disk)
    per = shards_per_task or ix.shards_per_task(n / len(refs), bpi, budget, cfg.max_workers, len(refs))
    batches = [refs[i:i + per] for i in range(0, len(refs), per)]
    log.info("index %s: %s over N=%d %s codes of %d bytes (%s; ~%s resident), %d shards in %d batches",
             name, plan.index_type, n, plan.kind, bpi, plan.reason, ix.human_bytes(plan.memory_bytes),
             len(refs), len(batches))
    asked = ix.BuildRecord(format=ix.FORMAT, name=name, mode="build", dataset=dataset, coder_id=coder_id,
                           coder_checksum=card["checksum"], method=card.get("method", coder.method),
                           model_id=card.get("model_id"), bits=bits, memory_budget=budget,
                           index_type_requested=index_type, merge_on_disk_requested=merge_on_disk,
                           exclude_split=exclude_split, based_on=None,
                           recall_target=recall_target, device=use_device(device))
    return publish_version(cfg, store, plan, batches, current, asked, plan_s=time.perf_counter() - t0)
