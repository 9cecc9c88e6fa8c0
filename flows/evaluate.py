"""Evaluation flow: one table, method x code length, on one (dataset, model) feature set."""
from __future__ import annotations

import hashlib
import json
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from encoders.evaluation import BASELINES
from flows.limits import ensure_heavy_limit, server_tagged
from infra import layout
from infra.reports import plot_markdown, read_csv_rows, to_markdown, write_report
from infra.runners import SettingsTaskRunner
from infra.settings import Settings
from infra.store import shared_store
from tasks.codes import features_fingerprint
from tasks.evaluate import GALLERIES, evaluate_method, evaluation_code_version


@flow(name="evaluate", log_prints=True, task_runner=SettingsTaskRunner())
def evaluate(dataset: str, model_id: str, methods: list[str] | None = None, bits: list[int] | None = None,
             R: int | None = None, run_id: str | None = None, force: bool = False,
             settings: dict[str, Any] | None = None, seeds: int | list[int] | None = None,
             gallery: str = "all", params: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Fit each method on train (select on val), report mAP@R / P@100 and costs on query vs the gallery,
    mean ± std over `seeds` (an int n: seeds settings.seed .. settings.seed + n - 1; default one seed,
    which the report title says). gallery: 'all' (every non-query row) or 'no-train'. params:
    {method: config overrides}. A method that cannot run gets a row with the reason.
    Writes reports/<dataset>/<run_id>/ (CSV, markdown, PNG) and table + markdown artifacts.
    The default run id is a hash of (features, methods, bits, R, seeds, gallery, params, the code
    version of encoders/ and the evaluation task): an identical evaluation already reported is read
    back instead of recomputed, unless `force`."""
    layout.check_names(dataset=dataset, model=model_id)
    cfg = Settings.load(**(settings or {}))
    ensure_heavy_limit(cfg.heavy_limit)
    store = shared_store(cfg)
    methods = methods or list(BASELINES)
    bits = sorted(bits or cfg.code_bits)
    log = get_run_logger()
    if gallery not in GALLERIES:
        raise ValueError(f"gallery must be one of {GALLERIES}, got {gallery!r}")
    if seeds is None or isinstance(seeds, int):
        seeds = [cfg.seed + i for i in range(seeds or 1)]
    params = params or {}
    if run_id is None:
        key = json.dumps([features_fingerprint(store, dataset, model_id), methods, bits, R, seeds, gallery,
                          params, evaluation_code_version()], sort_keys=True)
        run_id = f"{model_id}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
        done = layout.report_prefix(dataset, run_id) + "report.csv"
        if not force and store.exists(done):
            rows = read_csv_rows(store.read_bytes(done).decode())
            log.info("evaluate %s/%s: identical evaluation already reported (%s): skipped", dataset, model_id,
                     store.uri_of(done))
            prefix = layout.report_prefix(dataset, run_id)
            return {"run_id": run_id, "rows": rows, "skipped": True,
                    "report": {k: store.uri_of(prefix + k) for k in ("report.csv", "report.md", "map_vs_bits.png")}}
    log.info("evaluate %s/%s: %s at %s bits", dataset, model_id, methods, bits)
    (evaluate_task,) = server_tagged(evaluate_method)
    futures = [evaluate_task.submit(cfg, dataset, model_id, m, bits, R, params.get(m), seeds, gallery)
               for m in methods]
    rows = [r for f in futures for r in f.result()]
    order = {m: i for i, m in enumerate(methods)}
    rows.sort(key=lambda r: (order[r["method"]], r["bits"]))
    title = (f"{dataset} / {model_id}: mAP@{'all' if R is None else R}, seen-class protocol, query vs "
             f"{'every non-query row' if gallery == 'all' else 'the gallery without train/val rows'}, "
             f"{len(seeds)} seed{'s' if len(seeds) > 1 else ' (no spread: differences are not tested)'}")
    uris = write_report(store, dataset, run_id, rows, title)
    create_table_artifact(table=rows, key=layout.artifact_key("eval", dataset, model_id), description=title)
    png = store.read_bytes(layout.report_prefix(dataset, run_id) + "map_vs_bits.png")
    create_markdown_artifact(markdown=f"## {title}\n\n{to_markdown(rows)}\n\n"
                                      f"{plot_markdown(png, title, uris['map_vs_bits.png'])}",
                             key=layout.artifact_key("eval-md", dataset, model_id), description=title)
    return {"run_id": run_id, "rows": rows, "report": uris}
