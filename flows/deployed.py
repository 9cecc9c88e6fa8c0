"""The flows that prefect.yaml deploys: each stage as a deployment run sees it.

Thin wrappers over the stage flows that add what production needs and a CLI run does not: a
timeout, one retry of transport failures (a bad shard or a bad parameter is not retried), a
failure notification (flows/notify.py), the project's loggers in the run logs, and the events that
chain the stages. New data drives the chain (prefect.yaml `triggers:`):

  discover-shards --codeshard.raw.discovered--> nightly-extract --codeshard.features.extracted-->
  nightly-codes --codeshard.codes.encoded--> index-refresh --> codeshard.index.published

Each event names exactly the shards that changed (`shards`, a part spec like '3:5,9'); a stage
passes on only the shards it finished (quarantined ones drop out) and emits nothing when it fails,
so a failed stage stops the chain after it.
"""
from __future__ import annotations

import time
from typing import Any, Callable

from prefect import flow, get_run_logger
from prefect.events import emit_event

from flows.backfill import backfill
from flows.discover import pending_shards, record_announced
from flows.extract_features import extract_features
from flows.generate_codes import generate_codes
from flows.notify import FAILURE_HOOKS
from flows.refresh_index import refresh_index
from flows.update_model import update_model
from infra.planner import parse_shard_ranges, parts_spec, select_shards
from infra.run_logging import send_project_logs_to_prefect
from infra.settings import Settings
from infra.store import StoreError, StoreUnavailable, shared_store
from infra import layout

RAW_DISCOVERED = "codeshard.raw.discovered"
FEATURES_EXTRACTED = "codeshard.features.extracted"
CODES_ENCODED = "codeshard.codes.encoded"
INDEX_PUBLISHED = "codeshard.index.published"
RETRY_DELAY_S = 60.0
HOUR = 3600


class StageFailed(RuntimeError):
    """A stage finished with failed shards: the run fails (and notifies) and the chain stops."""


def dataset_resource(dataset: str, model_id: str) -> dict[str, str]:
    """The resource the chain's events are about: one (dataset, model) pair."""
    return {"prefect.resource.id": f"codeshard.dataset.{dataset}.{model_id}",
            "prefect.resource.name": f"{dataset} / {model_id}", "codeshard.dataset": dataset,
            "codeshard.model": model_id}


def run_stage(stage: Callable[[], Any], what: str, retry_delay_s: float = RETRY_DELAY_S) -> Any:
    """Call `stage` once more after `retry_delay_s` when the store failed in transit (StoreError,
    OSError, but not an open breaker); any other error is not retried (it would fail again)."""
    try:
        return stage()
    except StoreUnavailable:
        raise
    except (StoreError, OSError) as e:
        get_run_logger().warning("%s: store failed (%s: %s); one retry in %.0fs", what, type(e).__name__, e,
                                 retry_delay_s)
        time.sleep(retry_delay_s)
        return stage()


def finished_parts(store, prefix: str, shards: str | None, summary: dict[str, Any]) -> list[int]:
    """Parts of `shards` under `prefix` that the stage did not quarantine or fail."""
    bad = {q["part"] for q in summary["quarantined"]} | {f["part"] for f in summary["failed"]}
    return [r.part for r in select_shards(store.list(prefix), parse_shard_ranges(shards)) if r.part not in bad]


def parts_run_name(template: str) -> Callable[[], str]:
    """A `flow_run_name` over the run's parameters that names `shards=None` as 'all' (a plain
    template would print 'parts None')."""
    def name() -> str:
        from prefect.runtime import flow_run

        params = dict(flow_run.parameters)
        return template.format(**(params | {"shards": params.get("shards") or "all"}))
    return name


def _check(summary: dict[str, Any], what: str) -> None:
    if summary["failed"]:
        raise StageFailed(f"{what}: {len(summary['failed'])} shard(s) failed: "
                          + "; ".join(f"part {f['part']}: {f['reason']}" for f in summary["failed"][:5]))


@flow(name="discover-shards", flow_run_name="discover new {dataset} shards for {model_id}",
      timeout_seconds=10 * 60, **FAILURE_HOOKS)
def discover_shards(dataset: str, model_id: str, settings: dict[str, Any] | None = None,
                    resend_after_hours: float = 20.0) -> dict[str, Any]:
    """Find raw shards of `dataset` that are new or changed since their features were extracted
    with `model_id` (flows/discover.py) and emit one `codeshard.raw.discovered` event naming them;
    nothing when there are none. Cheap: one LIST and one small read per raw shard."""
    send_project_logs_to_prefect()
    layout.check_names(dataset=dataset, model=model_id)
    store = shared_store(Settings.load(**(settings or {})))
    refs = run_stage(lambda: pending_shards(store, dataset, model_id, resend_after_hours * HOUR), "discover")
    log = get_run_logger()
    if not refs:
        log.info("no new or changed raw shards of %s for %s", dataset, model_id)
        return {"dataset": dataset, "model_id": model_id, "shards": None, "count": 0}
    spec = parts_spec(r.part for r in refs)
    emit_event(RAW_DISCOVERED, resource=dataset_resource(dataset, model_id),
               payload={"dataset": dataset, "model_id": model_id, "shards": spec, "count": len(refs)})
    record_announced(store, dataset, model_id, refs)
    log.info("%d new or changed raw shards of %s: %s", len(refs), dataset, spec)
    return {"dataset": dataset, "model_id": model_id, "shards": spec, "count": len(refs)}


@flow(name="extract-stage", flow_run_name=parts_run_name("extract {dataset} parts {shards} with {model_id}"),
      timeout_seconds=4 * HOUR, **FAILURE_HOOKS)
def extract_stage(dataset: str, model_id: str, shards: str | None = None, force: bool = False,
                  settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """extract-features over `shards`; then `codeshard.features.extracted` with the parts whose
    features are now there (quarantined shards drop out). Fails, emitting nothing, when any shard failed."""
    send_project_logs_to_prefect()
    summary = run_stage(lambda: extract_features(dataset, model_id, shards, force, settings=settings), "extract")
    _check(summary, f"extract {dataset}")
    store = shared_store(Settings.load(**(settings or {})))
    parts = finished_parts(store, layout.features_prefix(dataset, model_id), shards, summary)
    if parts:
        emit_event(FEATURES_EXTRACTED, resource=dataset_resource(dataset, model_id),
                   payload={"dataset": dataset, "model_id": model_id, "shards": parts_spec(parts),
                            "count": len(parts), "quarantined": summary["quarantined"]})
    return summary


@flow(name="codes-stage", flow_run_name=parts_run_name("encode {dataset} parts {shards} ({model_id} features)"),
      timeout_seconds=4 * HOUR, **FAILURE_HOOKS)
def codes_stage(dataset: str, model_id: str, methods: dict[str, int] | None = None, shards: str | None = None,
                force: bool = False, settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """generate-codes (coders retrained only when their features changed) over `shards`; then
    `codeshard.codes.encoded`. Fails, emitting nothing, when any shard failed."""
    send_project_logs_to_prefect()
    out = run_stage(lambda: generate_codes(dataset, model_id, methods, shards, force, settings=settings), "codes")
    for s in out["encode"]:
        _check(s, f"encode {dataset} with {s['coder_id']}")
    bad = {q["part"] for s in out["encode"] for q in s["quarantined"]}
    store = shared_store(Settings.load(**(settings or {})))
    parts = [p for p in finished_parts(store, layout.features_prefix(dataset, model_id), shards,
                                       {"quarantined": [], "failed": []}) if p not in bad]
    if parts:
        emit_event(CODES_ENCODED, resource=dataset_resource(dataset, model_id),
                   payload={"dataset": dataset, "model_id": model_id, "coders": out["coders"],
                            "shards": parts_spec(parts), "count": len(parts)})
    return out


@flow(name="index-stage", flow_run_name="refresh index {name}", timeout_seconds=2 * HOUR, **FAILURE_HOOKS)
def index_stage(name: str, shards: str | None = None, settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """refresh-index `name` (adds every code shard new since CURRENT; `shards` names what the
    event announced, for the run's name and log); then `codeshard.index.published` on a new version."""
    send_project_logs_to_prefect()
    out = run_stage(lambda: refresh_index(name, settings=settings), f"refresh {name}")
    if out.get("status") == "published":
        emit_event(INDEX_PUBLISHED, resource={"prefect.resource.id": f"codeshard.index.{name}",
                                              "prefect.resource.name": name},
                   payload={"name": name, "version": out.get("version"), "announced": shards})
    return out


# Deployments of flows that need no event: the same flow with a timeout and the failure hooks.
model_update = update_model.with_options(timeout_seconds=6 * HOUR, **FAILURE_HOOKS)
backfill_stage = backfill.with_options(timeout_seconds=12 * HOUR, **FAILURE_HOOKS)

