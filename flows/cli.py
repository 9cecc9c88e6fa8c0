"""`codeshard` command line: one front door to the flows (the other is prefect.yaml)."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any, Callable

# Offline-safe Prefect defaults (STACK.md); the user's own values win.
for _k, _v in {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
               "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}.items():
    os.environ.setdefault(_k, _v)
if os.environ.get("PREFECT_HOME"):  # Prefect warns, then cannot open its database, when the folder is missing
    os.makedirs(os.path.expanduser(os.environ["PREFECT_HOME"]), exist_ok=True)
# faiss's loader logs every failed attempt at an optional CPU build (AVX-512, AVX2) at INFO
logging.getLogger("faiss.loader").setLevel(logging.WARNING)

SETTING_FLAGS = ("store", "s3_endpoint", "s3_region", "runner", "dask_address", "dask_workers",
                 "max_workers", "heavy_limit", "device", "batch_size", "shard_rows")


def _settings_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("settings (override CODESHARD_* environment variables)")
    g.add_argument("--store", help="file:///path or s3://bucket/prefix")
    g.add_argument("--s3-endpoint", help="S3 endpoint URL (SeaweedFS, MinIO); default AWS")
    g.add_argument("--s3-region")
    g.add_argument("--runner", choices=["threads", "dask"])
    g.add_argument("--dask-address", help="tcp://host:8786 (default with --runner dask: a local cluster)")
    g.add_argument("--dask-workers", type=int)
    g.add_argument("--max-workers", type=int, help="concurrent shard tasks (thread runner)")
    g.add_argument("--heavy-limit", type=int, help="concurrent heavy task runs per Prefect server (default 4; 0: no limit)")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"])
    g.add_argument("--batch-size", type=int)
    g.add_argument("--shard-rows", type=int)


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(args, k) for k in SETTING_FLAGS if getattr(args, k, None) is not None}


def existing_store(args: argparse.Namespace):
    """The store the flags name, which must exist and hold something (commands that only read or
    add to what is there): a mistyped --store is an error, never a new empty store."""
    from infra.settings import Settings
    from infra.store import open_store

    return open_store(Settings.load(**overrides(args))).require_existing()


def finish(result: Any) -> int:
    """Print a flow's result and its bad shards; the exit code of infra/outcomes.py (0 ok, 1 a
    shard failed, 4 some quarantined)."""
    from infra import outcomes

    _print(result)
    for line in outcomes.problem_lines(result):
        print(line, file=sys.stderr)
    return outcomes.exit_code(result)


def run_flow(flow_obj, args: argparse.Namespace, **params: Any) -> Any:
    """Call a flow with the settings from flags; each flow runs its tasks on the runner they select
    (infra/runners.py SettingsTaskRunner)."""
    from infra.settings import Settings

    Settings.load(**overrides(args))  # bad settings fail here, before a Prefect server starts
    return flow_obj(settings=overrides(args), **params)


# -- commands ---------------------------------------------------------------------------------
def cmd_doctor(args) -> int:
    from infra import doctor
    from infra.settings import Settings

    cfg = Settings.load(**overrides(args))
    print("codeshard settings (secrets masked):")
    for k, v in cfg.masked().items():
        print(f"  {k:24s} {v}")
    ok = True
    for check in doctor.checks(cfg):
        print(f"{check.name + ':':9s} {'ok' if check.ok else 'FAILED:'} {check.detail}")
        ok &= check.ok or not check.required
    return 0 if ok else 1


def cmd_dev_s3(args) -> int:
    from infra.seaweed import DEFAULT_ACCESS_KEY, DEFAULT_SECRET_KEY, start_seaweed, stop_seaweed
    from infra.settings import Settings

    data_dir = os.path.join(Settings.load().dev_dir, "seaweedfs")
    if args.action == "up":
        srv = start_seaweed(data_dir, bucket=args.bucket, s3_port=args.port)
        print(f"SeaweedFS S3 on {srv.endpoint} (pid {srv.pid}, data {data_dir}); to use it:")
        print(f"  export CODESHARD_STORE=s3://{args.bucket}/codeshard CODESHARD_S3_ENDPOINT={srv.endpoint}")
        print(f"  export AWS_ACCESS_KEY_ID={DEFAULT_ACCESS_KEY} AWS_SECRET_ACCESS_KEY=<dev secret, see infra/seaweed.py>")
        if args.env_file:
            with open(args.env_file, "w") as f:
                f.write(f"export CODESHARD_STORE=s3://{args.bucket}/codeshard\n"
                        f"export CODESHARD_S3_ENDPOINT={srv.endpoint}\n"
                        f"export AWS_ACCESS_KEY_ID={DEFAULT_ACCESS_KEY}\n"
                        f"export AWS_SECRET_ACCESS_KEY={DEFAULT_SECRET_KEY}\n")
        return 0
    print("stopped" if stop_seaweed(data_dir) else "no SeaweedFS running for " + data_dir)
    return 0


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
    _print(run_flow(train_backbone, args, dataset=args.dataset, arch=args.arch, model_id=args.model_id,
                    epochs=args.epochs, classes=classes, force=args.force))
    return 0


def cmd_extract(args) -> int:
    from flows.extract_features import extract_features

    from infra import layout

    layout.check_names(dataset=args.dataset, model=args.model)
    existing_store(args)
    return finish(run_flow(extract_features, args, dataset=args.dataset, model_id=args.model, shards=args.shards,
                           force=args.force))


def _csv_list(text: str | None, cast=str) -> list | None:
    return [cast(t) for t in text.split(",") if t.strip()] if text else None


def cmd_evaluate(args) -> int:
    from flows.evaluate import evaluate
    from infra.reports import to_csv, to_table

    from infra import layout

    args.features = args.features or f"{args.dataset}-small-cnn"
    layout.check_names(dataset=args.dataset, model=args.features)
    existing_store(args)
    out = run_flow(evaluate, args, dataset=args.dataset, model_id=args.features,
                   methods=_csv_list(args.methods), bits=_csv_list(args.bits, int),
                   R=args.R, run_id=args.run_id, seeds=args.seeds, gallery=args.gallery)
    if args.format == "csv":
        sys.stdout.write(to_csv(out["rows"]))
    elif args.format == "json":
        _print(out)
    else:
        print(to_table(out["rows"]))
        print("report:", out["report"]["report.md"])
    return 0


def cmd_train_coder(args) -> int:
    from flows.generate_codes import train_coders

    from infra import layout

    layout.check_names(dataset=args.dataset, model=args.features)
    existing_store(args)
    methods = {m: args.bits for m in _csv_list(args.method)}
    _print(run_flow(train_coders, args, dataset=args.dataset, model_id=args.features, methods=methods,
                    force=args.force))
    return 0


def cmd_encode(args) -> int:
    from flows.generate_codes import encode

    from infra import layout

    layout.check_names(dataset=args.dataset, model=args.features, coder=_csv_list(args.coder))
    existing_store(args)
    return finish(run_flow(encode, args, dataset=args.dataset, model_id=args.features,
                           coder_ids=_csv_list(args.coder), shards=args.shards, force=args.force))


def cmd_pipeline(args) -> int:
    from flows.pipeline import pipeline
    from infra import layout, outcomes
    from infra.reports import to_table

    layout.check_names(dataset=args.dataset, model=args.model)
    coders = None
    if args.coders:  # "drq:64,itq:64,float": {method: longest bits}, float has none
        coders = {m.strip(): int(b or 0) for m, _, b in (c.partition(":") for c in _csv_list(args.coders))}
    out = run_flow(pipeline, args, dataset=args.dataset, model_id=args.model, epochs=args.epochs,
                   bits=_csv_list(args.bits, int), coders=coders, evaluate_methods=_csv_list(args.methods),
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
    layout.check_names(dataset=args.dataset, model=model, coder=_csv_list(args.coders))
    stages = _csv_list(args.stages)
    if bad := sorted(set(stages or []) - set(STAGES)):
        raise ValueError(f"unknown stages {bad}; choose from {', '.join(STAGES)}")
    existing_store(args)
    return finish(run_flow(backfill, args, dataset=args.dataset, model_id=model, shards=args.shards,
                           dates=args.dates, stages=stages, coder_ids=_csv_list(args.coders), force=args.force))


def cmd_update_model(args) -> int:
    from flows.update_model import update_model
    from infra import layout

    layout.check_names(dataset=args.dataset, model=[args.old] + ([args.new_model_id] if args.new_model_id else []))
    existing_store(args)
    out = run_flow(update_model, args, dataset=args.dataset, old_model_id=args.old, arch=args.arch,
                   method=args.method, new_model_id=args.new_model_id, epochs=args.epochs,
                   bits=_csv_list(args.bits, int), max_flip_rate=args.max_flip_rate)
    _print({k: out[k] for k in ("model_id", "status", "gate_passed", "gate_reason", "gate", "compat_val", "compat",
                                "compat_codes")})
    return 0 if out["gate_passed"] else 3


def cmd_serve(args) -> int:
    from flows.deployments import serve_all
    from flows.limits import ensure_heavy_limit
    from infra.settings import Settings

    cfg = Settings.load(**overrides(args))
    ensure_heavy_limit(cfg.heavy_limit)
    serve_all(cfg)
    return 0


def cmd_deploy(args) -> int:
    from flows.deployments import deploy_all
    from flows.limits import ensure_heavy_limit
    from infra.settings import Settings

    cfg = Settings.load(**overrides(args))
    ensure_heavy_limit(cfg.heavy_limit)
    print(deploy_all(cfg, args.pool))
    print(f"start a worker: prefect worker start --pool {args.pool}")
    return 0


def cmd_index_build(args) -> int:
    from flows.build_index import build_index
    from infra import layout

    layout.check_names(dataset=args.dataset, coder=args.coder, index=args.name)
    existing_store(args)
    s = run_flow(build_index, args, dataset=args.dataset, coder_id=args.coder, bits=args.bits, name=args.name,
                 memory_budget=args.memory_budget, force=args.force, shards_per_task=args.shards_per_task,
                 index_type=args.index_type, exclude_split=args.exclude_split, device=args.build_device,
                 **({"recall_target": args.recall_target} if args.recall_target else {}))
    _print(s)
    if s["status"] == "superseded":
        print(f"codeshard index build: another run published v{s.get('current_version')} of {s['name']} first; "
              f"this build was discarded. Run `codeshard index refresh --name {s['name']}` to add anything newer.",
              file=sys.stderr)
    return 0


def cmd_index_refresh(args) -> int:
    from flows.refresh_index import refresh_index
    from infra import layout

    layout.check_name("index", args.name)
    existing_store(args)
    _print(run_flow(refresh_index, args, name=args.name, shards_per_task=args.shards_per_task,
                    allow_removal=args.allow_removal))
    return 0


def cmd_search(args) -> int:
    from infra import layout
    from infra.search import Searcher, query_feature
    from infra.settings import Settings
    from infra.store import open_store

    layout.check_name("index", args.name)
    if args.k < 1:
        raise ValueError(f"-k must be at least 1, got {args.k}")
    cfg = Settings.load(**overrides(args))
    store = open_store(cfg).require_existing()
    searcher = Searcher(store, args.name, poll_seconds=0, cache_dir=args.cache_dir)
    if args.id is not None:
        res = searcher.search_by_id(args.id, args.k, nprobe=args.nprobe)
    else:
        model_id = searcher.current().build.get("model_id")
        if not model_id:
            raise ValueError(f"index {args.name} records no model_id: search it --id")
        image = open(args.image, "rb").read() if args.image else None
        res = searcher.search(query_feature(store, model_id, image=image, text=args.text,
                                            device=cfg.torch_device()), args.k, nprobe=args.nprobe)
    _print({"name": args.name, "version": res.version, "hits": res.hits[0]})
    return 0


def cmd_ls(args) -> int:
    from infra import catalog
    from infra.index_plan import human_bytes

    store = existing_store(args)
    for kind in [args.kind] if args.kind else list(catalog.KINDS):
        entries = catalog.list_kind(store, kind)
        print(f"== {kind} ({len(entries)})")
        for e in entries:
            print(f"  {e.name:48s} {human_bytes(e.size_bytes):>10s}  {e.detail}")
    return 0


def _print(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def build_parser() -> argparse.ArgumentParser:
    # -v before or after the subcommand: the subcommand's copy leaves the top-level value alone
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                         help="debug logs and full tracebacks")
    p = argparse.ArgumentParser(prog="codeshard", description=__doc__, parents=[verbose])
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", required=True)

    def add(name: str, fn: Callable, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help, parents=[verbose])
        _settings_args(sp)
        sp.set_defaults(fn=fn)
        return sp

    add("doctor", cmd_doctor, "print resolved settings (secrets masked); check the store and Prefect")

    sp = add("ls", cmd_ls, "what the store holds: datasets, models, coders, indexes (CURRENT versions), "
             "quarantined shards, with sizes")
    sp.add_argument("kind", nargs="?", choices=["datasets", "models", "coders", "indexes", "quarantine"])

    dev = sub.add_parser("dev", help="local development services", parents=[verbose])
    devsub = dev.add_subparsers(dest="service", required=True)
    s3 = devsub.add_parser("s3", help="SeaweedFS S3 server on loopback (data under .codeshard/seaweedfs)",
                           parents=[verbose])
    s3.add_argument("action", choices=["up", "down"])
    s3.add_argument("--bucket", default="codeshard")
    s3.add_argument("--port", type=int, default=None)
    s3.add_argument("--env-file", help="write the export lines for this server to a file")
    s3.set_defaults(fn=cmd_dev_s3)

    sp = add("ingest", cmd_ingest, "write raw shards: a packaged dataset (fashion-mnist, wordnet, digits; glove also writes its vectors as features) or --from a folder/URI of Parquet")
    sp.add_argument("dataset")
    sp.add_argument("--from", dest="source", help="folder or URI of raw-schema Parquet shards")
    sp.add_argument("--rows-per-shard", dest="shard_rows_ingest", type=int)
    sp.add_argument("--limit", type=int, help="vector datasets (glove): ingest only the first N rows")
    sp.add_argument("--date", help="partition date recorded for the shards written now, YYYY-MM-DD "
                                   "(default today, UTC); backfill --dates selects on it")
    sp.add_argument("--force", action="store_true")

    sp = add("train-backbone", cmd_train_backbone, "train a CNN backbone on the train split, register it")
    sp.add_argument("--dataset", required=True)
    sp.add_argument("--arch", default="small-cnn", choices=["small-cnn", "wide-cnn"])
    sp.add_argument("--model-id")
    sp.add_argument("--epochs", type=int, default=8)
    sp.add_argument("--classes", help="comma-separated class ids to train on (default all)")
    sp.add_argument("--force", action="store_true")

    sp = add("extract", cmd_extract, "extract features for a dataset's raw shards")
    sp.add_argument("--dataset", required=True)
    sp.add_argument("--model", required=True, help="model id (trained, or efficientnet-lite0-64 / minilm)")
    sp.add_argument("--shards", help="part range START:STOP (default all)")
    sp.add_argument("--force", action="store_true")

    sp = add("evaluate", cmd_evaluate, "one table of mAP / P@100 / costs per method x code length")
    sp.add_argument("--dataset", required=True)
    sp.add_argument("--features", default=None, help="model id whose features to use (default <dataset>-small-cnn)")
    sp.add_argument("--methods", help="comma list (default: lsh,pca-rr,itq,pq,opq,float); also drq, "
                                      "drq-per-length, llc, gsl, gsl-none, gsl-qloss, and the ceiling/isolation "
                                      "rows float-cos, drq-emb, drq-emb+pq, drq-emb+rq, gsl-emb, gsl-none-emb")
    sp.add_argument("--seeds", type=int, help="seeds per learned method: rows are mean ± std (default 1: no spread)")
    sp.add_argument("--gallery", choices=["all", "no-train"], default="all",
                    help="the gallery: every non-query row, or without the coders' train/val rows")
    sp.add_argument("--bits", help="comma list of code lengths (default 8,16,32,64)")
    sp.add_argument("--R", type=int, default=None, help="mAP cut-off (default: all)")
    sp.add_argument("--run-id")
    sp.add_argument("--format", choices=["table", "csv", "json"], default="table")

    sp = add("train-coder", cmd_train_coder, "fit and register coders on a dataset's train features")
    sp.add_argument("--dataset", required=True)
    sp.add_argument("--features", required=True, help="model id whose features to use")
    sp.add_argument("--method", default="drq", help="comma list of methods")
    sp.add_argument("--bits", type=int, default=64, help="code length (DRQ: the longest; shorter are prefixes)")
    sp.add_argument("--force", action="store_true")

    sp = add("encode", cmd_encode, "encode every features shard with registered coders")
    sp.add_argument("--dataset", required=True)
    sp.add_argument("--features", required=True)
    sp.add_argument("--coder", required=True, help="comma list of coder ids")
    sp.add_argument("--shards")
    sp.add_argument("--force", action="store_true")

    sp = add("pipeline", cmd_pipeline, "the whole pipeline: ingest, backbone, extract, coders, encode, indexes, evaluate")
    sp.add_argument("--dataset", required=True)
    sp.add_argument("--model", help="use this registered model instead of training <dataset>-small-cnn")
    sp.add_argument("--epochs", type=int, default=8)
    sp.add_argument("--bits", help="code lengths to index and evaluate (default 8,16,32,64)")
    sp.add_argument("--coders", help="coders to train and index, METHOD:BITS comma list "
                                     "(default drq:64,itq:64,pq:64,float)")
    sp.add_argument("--methods", help="evaluation methods, comma list (default: all, see `evaluate`)")
    sp.add_argument("--exclude-queries", action="store_true",
                    help="leave the evaluation's query rows out of the indexes (recorded in build.json); "
                         "default: indexes hold every item")
    sp.add_argument("--force", action="store_true")

    sp = add("backfill", cmd_backfill, "re-run stages over a shard range or a partition-date range "
             "(done shards skipped unless --force)")
    sp.add_argument("--dataset", required=True)
    sp.add_argument("--model", help="model id (default <dataset>-small-cnn)")
    sp.add_argument("--shards", help="part range START:STOP, e.g. 120:180 (or a list: 0:3,7)")
    sp.add_argument("--dates", help="partition dates FIRST:LAST (inclusive), e.g. 2026-11-01:2026-11-30; "
                                    "with --shards: parts in both")
    sp.add_argument("--stages", default="extract,codes,index")
    sp.add_argument("--coders", help="coder ids for the codes stage (default: all registered for the model)")
    sp.add_argument("--force", action="store_true")

    index = sub.add_parser("index", help="build and refresh faiss indexes over stored codes", parents=[verbose])
    index_sub = index.add_subparsers(dest="index_command", required=True)
    sp = index_sub.add_parser("build", help="build and publish an index of one coder x code length",
                              parents=[verbose])
    _settings_args(sp)
    sp.set_defaults(fn=cmd_index_build)
    sp.add_argument("--dataset", required=True)
    sp.add_argument("--coder", required=True, help="coder id (codes/<dataset>/<coder>/ must exist)")
    sp.add_argument("--bits", type=int, help="code length (default: the coder's longest)")
    sp.add_argument("--name", help="index name (default <dataset>-<coder>-<bits>b)")
    sp.add_argument("--memory-budget", default="2GB", help="resident memory the index may take (e.g. 2GB, 512MB)")
    sp.add_argument("--index-type", type=_index_type,
                    help="a type (binary-flat, binary-ivf, pq-lut, rq-lut, coder-lut, ivf-pq, ivf-rq, flat, ivf-flat, "
                         "hnsw) or a faiss factory string over the stored codes ('IVF4096,PQ8x8', 'BIVF1024', "
                         "'HNSW32,Flat'); default: the cheapest that fits --memory-budget")
    sp.add_argument("--recall-target", type=float, help="tune nprobe/efSearch to this recall@10 (default 0.95)")
    sp.add_argument("--build-device", choices=["cpu", "cuda"], default="cpu",
                    help="where faiss trains the coarse quantizer (cuda falls back to cpu with a message)")
    sp.add_argument("--shards-per-task", type=int, help="code shards per partial-index task (default: by memory)")
    sp.add_argument("--exclude-split", choices=["query", "train", "val", "database"],
                    help="leave the rows of this raw split out (recorded in build.json); default: every item")
    sp.add_argument("--force", action="store_true", help="rebuild even if CURRENT covers the same shards")
    sp = index_sub.add_parser("refresh", help="add shards new since CURRENT; publish the next version",
                              parents=[verbose])
    _settings_args(sp)
    sp.set_defaults(fn=cmd_index_refresh)
    sp.add_argument("--name", required=True)
    sp.add_argument("--shards-per-task", type=int)
    sp.add_argument("--allow-removal", metavar="REASON",
                    help="publish even though code shards indexed before are gone; the reason goes into build.json")

    sp = add("search", cmd_search, "top-k of a published index for a stored item, an image or a text")
    sp.add_argument("--name", required=True)
    q = sp.add_mutually_exclusive_group(required=True)
    q.add_argument("--id", type=int, help="a stored item id (its stored feature is the query)")
    q.add_argument("--image", help="an image file (embedded with the coder's model)")
    q.add_argument("--text", help="a text (embedded with the coder's model)")
    sp.add_argument("-k", type=int, default=10)
    sp.add_argument("--nprobe", type=int, help="IVF lists (HNSW: efSearch) to visit; default: tuned at build time")
    sp.add_argument("--cache-dir", help="keep index files here and memory-map them (default: read into memory)")

    sp = add("update-model", cmd_update_model, "train a compatible new encoder; ship it only if the gate passes "
             "(exit 3 when refused)")
    sp.add_argument("--dataset", required=True)
    sp.add_argument("--old", required=True, help="model id that produced the stored gallery features")
    sp.add_argument("--arch", default="wide-cnn", choices=["small-cnn", "wide-cnn"])
    sp.add_argument("--method", default="dual-tuning", choices=["dual-tuning", "bct", "independent"])
    sp.add_argument("--new-model-id")
    sp.add_argument("--epochs", type=int, default=6)
    sp.add_argument("--bits", help="DRQ code lengths for the code-level matrix (default 16,32,64)")
    sp.add_argument("--max-flip-rate", type=float,
                    help="refuse when more than this fraction of val queries right at top-1 under the old "
                         "model turn wrong (negative flips; default 0.25; 1 switches the bound off)")

    add("serve", cmd_serve, "serve every deployment in prefect.yaml from this process (needs PREFECT_API_URL); "
        "refuses prefect.yaml keys it cannot honour")
    sp = add("deploy", cmd_deploy, "`prefect deploy --all` over prefect.yaml into a work pool (created as a process "
             "pool when missing), with these settings in every deployment's job_variables.env")
    sp.add_argument("--pool", required=True)
    return p


class _NoTracebackFormatter(logging.Formatter):
    """Log lines without the tracebacks attached to them (the exception's message stays). Another
    handler (Prefect's API handler) may have cached the traceback text on the record already."""

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info = record.exc_text = record.stack_info = None
        try:
            return super().format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved


def _index_type(text: str) -> str:
    """argparse type: a type name or factory string that some kind of stored code can use (the
    coder's own kind is checked by the flow)."""
    from infra.index_plan import KINDS, parse_index_type

    errors = []
    for kind in KINDS:
        try:
            parse_index_type(text, kind)
            return text
        except ValueError as e:
            errors.append(str(e))
    raise argparse.ArgumentTypeError(errors[-1])


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("codeshard")
    except PackageNotFoundError:
        return "(not installed)"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.verbose = getattr(args, "verbose", False)
    # a failed flow run logs its traceback; without -v the user gets the one-line error below
    handler = logging.StreamHandler()
    handler.setFormatter((logging.Formatter if args.verbose else _NoTracebackFormatter)(
        "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, handlers=[handler])
    for noisy in ("httpx", "httpcore", "botocore", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.fn(args) or 0
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # noqa: BLE001 - one clear line, not a traceback, for expected failures
        if args.verbose:
            raise
        from infra.store import clean_error

        print(f"codeshard {args.command}: error: {type(e).__name__}: {clean_error(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
