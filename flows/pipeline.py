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

TEXT_DATASETS = {"wordnet": "minilm"}
# Coders the pipeline trains and indexes: {method: longest bits}. DRQ gives every length <= 64.
DEFAULT_CODERS = {"drq": 64, "itq": 64, "pq": 64, "float": 0}
DEFAULT_EVAL = ["lsh", "pca-rr", "itq", "pq", "opq", "drq", "drq-per-length", "llc", "float"]


def index_name(dataset: str, coder_id: str, bits: int) -> str:
    """'<dataset>-<coder_id>-<bits>b'; the float index is '<dataset>-<coder_id>' (one length)."""
    return f"{dataset}-{coder_id}" if coder_id.startswith("float-") else f"{dataset}-{coder_id}-{bits}b"


@flow(name="pipeline", log_prints=True)
def pipeline(dataset: str, model_id: str | None = None, arch: str = "small-cnn", epochs: int = 8,
             coders: dict[str, int] | None = None, bits: list[int] | None = None,
             evaluate_methods: list[str] | None = None, memory_budget: str = "2GB",
             force: bool = False, settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run every stage for `dataset`; returns the stage summaries, the evaluation rows and the
    published index versions. Text datasets use the packaged MiniLM encoder (no backbone training)."""
    log = get_run_logger()
    coders = coders or DEFAULT_CODERS
    bits = sorted(bits or [8, 16, 32, 64])
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
    for card in cards:
        lengths = [b for b in card["lengths"] if b in bits] or [card["lengths"][-1]]
        for b in lengths:
            name = index_name(dataset, card["coder_id"], b)
            res = build_index(dataset, card["coder_id"], b, name, memory_budget=memory_budget, force=force,
                              settings=settings)
            out["indexes"].append({"name": name, **{k: res.get(k) for k in ("version", "uri", "status", "recall_at_10")}})

    ev = evaluate(dataset, model_id, evaluate_methods or DEFAULT_EVAL, bits, settings=settings)
    out["evaluation"] = {"rows": ev["rows"], "report": ev["report"]}
    md = (f"# pipeline {dataset}\n\nmodel `{model_id}`\n\n## evaluation\n\n{to_markdown(ev['rows'])}\n\n"
          "## indexes\n\n" + "\n".join(f"- `{i['name']}`: v{i.get('version')} {i.get('uri')}" for i in out["indexes"]))
    create_markdown_artifact(markdown=md, key=f"pipeline-{dataset}".lower(), description=f"pipeline {dataset}")
    log.info("pipeline %s finished: %d indexes, report %s", dataset, len(out["indexes"]), ev["report"]["report.md"])
    return out
