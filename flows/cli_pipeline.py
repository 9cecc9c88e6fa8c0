"""`codeshard` commands that run the pipeline's stages: ingest, train-backbone, extract, evaluate,
train-coder, encode, pipeline, backfill, update-model. Each checks its names, then runs one flow."""
from __future__ import annotations

import sys

from flows.cli_common import csv_list, existing_store, finish, print_json, run_flow


def cmd_ingest(args) -> int:
    from flows.ingest import ingest
    from infra import layout
    from infra.redact import refuse_credentials_in_uri

    layout.check_name("dataset", args.dataset)
    if args.source:
        refuse_credentials_in_uri(args.source, "--from")
    return finish(run_flow(ingest, args, dataset=args.dataset, source=args.source,
                           shard_rows=args.shard_rows_ingest, force=args.force, limit=args.limit, date=args.date))


def cmd_train_backbone(args) -> int:
    from flows.train_backbone import train_backbone

    from infra import layout

    layout.check_names(dataset=args.dataset, model=args.model_id)
    existing_store(args)
    classes = [int(c) for c in args.classes.split(",")] if args.classes else None
    print_json(run_flow(train_backbone, args, dataset=args.dataset, arch=args.arch, model_id=args.model_id,
                    epochs=args.epochs, classes=classes, force=args.force))
    return 0


def cmd_extract(args) -> int:
    from flows.extract_features import extract_features

    from infra import layout

    layout.check_names(dataset=args.dataset, model=args.model)
    existing_store(args)
    return finish(run_flow(extract_features, args, dataset=args.dataset, model_id=args.model, shards=args.shards,
                           force=args.force))


def cmd_evaluate(args) -> int:
    from flows.evaluate import evaluate
    from infra.reports import to_csv, to_table

    from infra import layout

    args.features = args.features or f"{args.dataset}-small-cnn"
    layout.check_names(dataset=args.dataset, model=args.features)
    existing_store(args)
    out = run_flow(evaluate, args, dataset=args.dataset, model_id=args.features,
                   methods=csv_list(args.methods), bits=csv_list(args.bits, int),
                   R=args.R, run_id=args.run_id, seeds=args.seeds, gallery=args.gallery)
    if args.format == "csv":
        sys.stdout.write(to_csv(out["rows"]))
    elif args.format == "json":
        print_json(out)
    else:
        print(to_table(out["rows"]))
        print("report:", out["report"]["report.md"])
    return 0


def cmd_train_coder(args) -> int:
    from flows.generate_codes import train_coders

    from infra import layout

    layout.check_names(dataset=args.dataset, model=args.features)
    existing_store(args)
    methods = {m: args.bits for m in csv_list(args.method)}
    print_json(run_flow(train_coders, args, dataset=args.dataset, model_id=args.features, methods=methods,
                    force=args.force))
    return 0


def cmd_encode(args) -> int:
    from flows.generate_codes import encode

    from infra import layout

    layout.check_names(dataset=args.dataset, model=args.features, coder=csv_list(args.coder))
    existing_store(args)
    return finish(run_flow(encode, args, dataset=args.dataset, model_id=args.features,
                           coder_ids=csv_list(args.coder), shards=args.shards, force=args.force))


def cmd_pipeline(args) -> int:
    from flows.pipeline import pipeline
    from infra import layout, outcomes
    from infra.reports import to_table

    layout.check_names(dataset=args.dataset, model=args.model)
    coders = None
    if args.coders:  # "drq:64,itq:64,float": {method: longest bits}, float has none
        coders = {m.strip(): int(b or 0) for m, _, b in (c.partition(":") for c in csv_list(args.coders))}
    out = run_flow(pipeline, args, dataset=args.dataset, model_id=args.model, epochs=args.epochs,
                   bits=csv_list(args.bits, int), coders=coders, evaluate_methods=csv_list(args.methods),
                   exclude_queries=args.exclude_queries, force=args.force)
    print()
    print(f"== pipeline {args.dataset}: model {out['model_id']}")
    for stage in ("ingest", "extract"):
        s = out[stage]
        print(f"  {stage:8s} {s['shards']} shards: {s['done']} done, {s['skipped']} skipped, "
              f"{len(s['quarantined'])} quarantined, {len(s['failed'])} failed ({s['rows']} rows)")
    for s in out["encode"]:
        print(f"  encode   {s['coder_id']}: {s['done']} done, {s['skipped']} skipped")
    print("\n== evaluation (query vs database, mAP@all)")
    print(to_table(out["evaluation"]["rows"]))
    print("report:", out["evaluation"]["report"]["report.md"])
    print("\n== indexes")
    for i in out["indexes"]:
        left_out = i.get("excluded") or {}
        note = f", {left_out.get('rows')} '{left_out.get('split')}' rows left out as asked" if left_out else ""
        print(f"  {i['name']}: v{i.get('version')} ({i.get('status')}, {i.get('n')} items{note}) {i.get('uri')}")
    for line in outcomes.problem_lines(out):
        print(line, file=sys.stderr)
    return outcomes.exit_code(out)


def cmd_backfill(args) -> int:
    from flows.backfill import STAGES, backfill
    from infra import layout

    model = args.model or f"{args.dataset}-small-cnn"
    layout.check_names(dataset=args.dataset, model=model, coder=csv_list(args.coders))
    stages = csv_list(args.stages)
    if bad := sorted(set(stages or []) - set(STAGES)):
        raise ValueError(f"unknown stages {bad}; choose from {', '.join(STAGES)}")
    existing_store(args)
    return finish(run_flow(backfill, args, dataset=args.dataset, model_id=model, shards=args.shards,
                           dates=args.dates, stages=stages, coder_ids=csv_list(args.coders), force=args.force))


def cmd_update_model(args) -> int:
    from flows.update_model import update_model
    from infra import layout

    layout.check_names(dataset=args.dataset, model=[args.old] + ([args.new_model_id] if args.new_model_id else []))
    existing_store(args)
    out = run_flow(update_model, args, dataset=args.dataset, old_model_id=args.old, arch=args.arch,
                   method=args.method, new_model_id=args.new_model_id, epochs=args.epochs,
                   bits=csv_list(args.bits, int), max_flip_rate=args.max_flip_rate)
    print_json({k: out[k] for k in ("model_id", "status", "gate_passed", "gate_reason", "gate", "compat_val", "compat",
                                "compat_codes")})
    return 0 if out["gate_passed"] else 3
