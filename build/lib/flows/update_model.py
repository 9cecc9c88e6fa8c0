"""Model update with a measured compatibility gate: new encoder, old gallery, no re-extraction."""
from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from infra import layout
from infra.runners import SettingsTaskRunner
from infra.settings import Settings
from tasks.update import update_model_task


@flow(name="update-model", log_prints=True, task_runner=SettingsTaskRunner())
def update_model(dataset: str, old_model_id: str, arch: str = "wide-cnn", method: str = "dual-tuning",
                 new_model_id: str | None = None, epochs: int = 6, bits: list[int] | None = None,
                 max_flip_rate: float | None = None,
                 settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train, measure M(old,old) / M(new,new) / M(new,old) on floats and on DRQ codes, register the
    new model, and move the query-model pointer only if M(new,old) > M(old,old) < M(new,new)
    (and the negative flip rate <= `max_flip_rate`, when given)."""
    layout.check_names(dataset=dataset, model=[old_model_id] + ([new_model_id] if new_model_id else []))
    cfg = Settings.load(**(settings or {}))
    new_model_id = new_model_id or f"{old_model_id}-{method}-{arch}"
    out = update_model_task(cfg, dataset, old_model_id, arch, method, new_model_id, epochs, bits,
                            max_flip_rate=max_flip_rate)
    m = out["compat"]["map"]
    lines = [f"## update {old_model_id} -> {new_model_id} ({method})", "",
             "| cell | mAP | top-1 |", "|---|---|---|"]
    lines += [f"| {c} | {m[c]:.4f} | {out['compat']['top1'][c]:.4f} |" for c in m]
    lines += ["", f"update gain {out['compat']['update_gain']:.3f}, negative flips "
                  f"{out['compat']['negative_flip_rate']:.4f}", "", f"**{out['gate_reason']}**"]
    for b, rep in out["compat_codes"].items():
        lines += [f"- DRQ {b} bits: " + ", ".join(f"{c} {v:.4f}" for c, v in rep["map"].items())
                  + f" — {rep['gate_reason']}"]
    create_markdown_artifact(markdown="\n".join(lines), key=layout.artifact_key("update", dataset, method),
                             description=out["gate_reason"])
    print("\n".join(lines))
    return out
