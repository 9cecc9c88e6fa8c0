"""Evaluation flow: one table, method x code length, on one (dataset, model) feature set."""
from __future__ import annotations

import time
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from encoders.evaluation import BASELINES
from infra.reports import to_markdown, write_report
from infra.settings import Settings
from infra.store import open_store
from tasks.evaluate import evaluate_method


@flow(name="evaluate", log_prints=True)
def evaluate(dataset: str, model_id: str, methods: list[str] | None = None, bits: list[int] | None = None,
             R: int | None = None, run_id: str | None = None,
             settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fit each method on train (select on val), report mAP@R / P@100 and costs on query vs database.
    Writes reports/<dataset>/<run_id>/ (CSV, markdown, PNG) and table + markdown artifacts."""
    cfg = Settings.load(**(settings or {}))
    methods = methods or list(BASELINES)
    bits = sorted(bits or cfg.code_bits)
    run_id = run_id or time.strftime("%Y%m%dT%H%M%S")
    log = get_run_logger()
    log.info("evaluate %s/%s: %s at %s bits", dataset, model_id, methods, bits)
    futures = [evaluate_method.submit(cfg, dataset, model_id, m, bits, R) for m in methods]
    rows = [r for f in futures for r in f.result()]
    order = {m: i for i, m in enumerate(methods)}
    rows.sort(key=lambda r: (order[r["method"]], r["bits"]))
    title = f"{dataset} / {model_id}: mAP@{'all' if R is None else R}, query vs database"
    uris = write_report(open_store(cfg), dataset, run_id, rows, title)
    create_table_artifact(table=rows, key=f"eval-{dataset}-{model_id}".lower(), description=title)
    create_markdown_artifact(markdown=f"## {title}\n\n{to_markdown(rows)}\n\nPlot: {uris['map_vs_bits.png']}",
                             key=f"eval-md-{dataset}-{model_id}".lower(), description=title)
    return {"run_id": run_id, "rows": rows, "report": uris}
