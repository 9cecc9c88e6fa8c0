"""Model update with a measured compatibility gate: new encoder, old gallery, no re-extraction.

The flow owns the decision: train a candidate -> measure on val -> gate -> (measure on query, report)
-> record -> move the pointer only if the gate passed. Each step is a task; the gate is this flow's.
"""
from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from encoders.compat import DEFAULT_MAX_FLIP_RATE
from flows.limits import server_tagged
from infra import layout
from infra.runners import SettingsTaskRunner
from infra.settings import Settings
from tasks.update import decide_update_gate, move_query_model, record_decision
from tasks.update import measure_compatibility as measure_compatibility_task
from tasks.update import train_candidate as train_candidate_task


@flow(name="update-model", log_prints=True, task_runner=SettingsTaskRunner())
def update_model(dataset: str, old_model_id: str, arch: str = "wide-cnn", method: str = "dual-tuning",
                 new_model_id: str | None = None, epochs: int = 6, bits: list[int] | None = None,
                 max_flip_rate: float | None = None,
                 settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train, gate on val (M(new,old) > M(old,old) < M(new,new) and negative flips <= `max_flip_rate`;
    None means DEFAULT_MAX_FLIP_RATE, 1.0 switches the bound off), report the matrix on query (floats
    and DRQ codes), record the decision in the new model's card, and move the query-model pointer
    only if the gate passed."""
    layout.check_names(dataset=dataset, model=[old_model_id] + ([new_model_id] if new_model_id else []))
    cfg = Settings.load(**(settings or {}))
    new_model_id = new_model_id or f"{old_model_id}-{method}-{arch}"
    log = get_run_logger()
    train_candidate, measure_compatibility = server_tagged(train_candidate_task, measure_compatibility_task)
    train_candidate(cfg, dataset, old_model_id, arch, method, new_model_id, epochs)
    on_val = measure_compatibility(cfg, dataset, old_model_id, new_model_id, "val")
    bound = DEFAULT_MAX_FLIP_RATE if max_flip_rate is None else max_flip_rate
    decision = decide_update_gate(on_val, bound)                           # the gate: val rows only
    reported = measure_compatibility(cfg, dataset, old_model_id, new_model_id, "query", bits)
    card = record_decision(cfg, new_model_id, decision, reported)
    if decision.passed:
        move_query_model(cfg, dataset, new_model_id, old_model_id)
    else:
        log.warning("gate refused %s: %s; query model of %s unchanged", new_model_id, decision.reason, dataset)

    lines = [f"## update {old_model_id} -> {new_model_id} ({method})", "",
             f"**{decision.reason}** (decided on {decision.split}: {decision.n_queries} val queries vs "
             f"{decision.n_gallery} train rows; negative flips {decision.negative_flip_rate:.4f}, bound "
             f"{decision.max_negative_flip_rate})", "",
             "| cell | val mAP (decides) | query mAP (reported) | query top-1 |", "|---|---|---|---|"]
    rep = card["compat"]
    lines += [f"| {c} | {decision.map[c]:.4f} | {rep['map'][c]:.4f} | {rep['top1'][c]:.4f} |" for c in decision.map]
    lines += ["", f"query: update gain {rep['update_gain']:.3f}, negative flips {rep['negative_flip_rate']:.4f}"]
    for b, r in card["compat_codes"].items():
        lines += [f"- DRQ {b} bits (query, reported): " + ", ".join(f"{c} {v:.4f}" for c, v in r["map"].items())]
    create_markdown_artifact(markdown="\n".join(lines), key=layout.artifact_key("update", dataset, method),
                             description=decision.reason)
    print("\n".join(lines))
    return {k: card[k] for k in ("model_id", "parent", "method", "status", "gate", "gate_passed", "gate_reason",
                                 "compat_val", "compat", "compat_codes", "val_accuracy", "train_seconds")}
