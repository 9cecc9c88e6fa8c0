"""The whole pipeline: ingest -> backbone -> extract -> train coders -> encode -> indexes -> evaluate.

Every stage skips what is already done (manifests, registered models/coders, published index
versions), so a second run over the same data does no work and a killed run resumes.
"""
from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.build_index import build_index
from flows.evaluate import evaluate
from flows.extract_features import extract_features
from flows.generate_codes import encode, train_coders
from flows.ingest import ingest
from flows.train_backbone import train_backbone
from infra.reports import to_markdown
from infra import layout
from infra.runners import SettingsTaskRunner, shared_cluster

TEXT_DATASETS = {"wordnet": "minilm"}
# Coders the pipeline trains and indexes: {method: longest bits}. DRQ gives every length <= 64.
DEFAULT_CODERS = {"drq": 64, "itq": 64, "pq": 64, "float": 0}
DEFAULT_EVAL = ["lsh", "pca-rr", "itq", "pq", "opq", "drq", "drq-per-length", "llc", "float"]


@flow(name="pipeline", log_prints=True, task_runner=SettingsTaskRunner())
def pipeline(dataset: str, model_id: str | None = None, arch: str = "small-cnn", epochs: int = 8,
             coders: dict[str, int] | None = None, bits: list[int] | None = None,
             evaluate_methods: list[str] | None = None, memory_budget: str = "2GB",
             exclude_queries: bool = False, force: bool = False,
             settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run every stage for `dataset` (packaged, or imported with `ingest --from`); returns the stage
    summaries, the evaluation rows and the published index versions. Text datasets use the packaged
    MiniLM encoder (no backbone training). Indexes hold every item unless `exclude_queries`, which
    leaves the evaluation's query rows out of them (recorded in each build.json). With runner
    'dask' and no address, all stages share one local cluster."""
    layout.check_names(dataset=dataset, model=model_id)
    with shared_cluster(settings) as stage_settings:
        return _stages(dataset, model_id, arch, epochs, coders or DEFAULT_CODERS, sorted(bits or [8, 16, 32, 64]),
                       evaluate_methods or DEFAULT_EVAL, memory_budget, exclude_queries, force, stage_settings)


def _stages(dataset: str, model_id: str | None, arch: str, epochs: int, coders: dict[str, int], bits: list[int],
            methods: list[str], memory_budget: str, exclude_queries: bool, force: bool,
            settings: dict[str, Any] | None) -> dict[str, Any]:
    log = get_run_logger()
    out: dict[str, Any] = {"dataset": dataset}
    out["ingest"] = ingest(dataset, force=force, settings=settings)
    if model_id is None:
        if dataset in TEXT_DATASETS:
            model_id = TEXT_DATASETS[dataset]
        else:
            model_id = f"{dataset}-{arch}"
            out["backbone"] = {k: v for k, v in train_backbone(dataset, arch, model_id, epochs, force=force,
                                                               settings=settings).items()
                               if k in ("model_id", "val_accuracy", "checksum", "train_seconds")}
    out["model_id"] = model_id
    out["extract"] = extract_features(dataset, model_id, force=force, settings=settings)

    cards = train_coders(dataset, model_id, coders, force=force, settings=settings)
    coder_ids = [c["coder_id"] for c in cards]
    out["coders"] = [{k: c.get(k) for k in ("coder_id", "lengths", "val", "fit_s")} for c in cards]
    out["encode"] = encode(dataset, model_id, coder_ids, force=force, settings=settings)

    out["indexes"] = []
    exclude_split = "query" if exclude_queries else None
    for card in cards:
        lengths = [b for b in card["lengths"] if b in bits] or [card["lengths"][-1]]
        for b in lengths:
            name = layout.index_name(dataset, card["coder_id"], b)
            res = build_index(dataset, card["coder_id"], b, name, memory_budget=memory_budget, force=force,
                              exclude_split=exclude_split, settings=settings)
            out["indexes"].append({"name": name, **{k: res.get(k) for k in ("version", "uri", "status", "n",
                                                                            "excluded")}})

    ev = evaluate(dataset, model_id, methods, bits, settings=settings)
    out["evaluation"] = {"rows": ev["rows"], "report": ev["report"]}
    md = (f"# pipeline {dataset}\n\nmodel `{model_id}`\n\n## evaluation\n\n{to_markdown(ev['rows'])}\n\n"
          "## indexes\n\n" + "\n".join(f"- `{i['name']}`: v{i.get('version')} {i.get('uri')}" for i in out["indexes"]))
    create_markdown_artifact(markdown=md, key=layout.artifact_key("pipeline", dataset), description=f"pipeline {dataset}")
    log.info("pipeline %s finished: %d indexes, report %s", dataset, len(out["indexes"]), ev["report"]["report.md"])
    return out
