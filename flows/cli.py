"""`codeshard` command line: one front door to the flows (the other is prefect.yaml).

This module is the grammar (subcommands, flags) and `main`; the commands live by group in
`flows/cli_pipeline.py` (stages), `flows/cli_index.py` (indexes, search, ls) and `flows/cli_ops.py`
(doctor, dev, serve, deploy), sharing `flows/cli_common.py`.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable

# Offline-safe Prefect defaults (STACK.md); the user's own values win.
for _k, _v in {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
               "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}.items():
    os.environ.setdefault(_k, _v)
if os.environ.get("PREFECT_HOME"):  # Prefect warns, then cannot open its database, when the folder is missing
    os.makedirs(os.path.expanduser(os.environ["PREFECT_HOME"]), exist_ok=True)
# faiss's loader logs every failed attempt at an optional CPU build (AVX-512, AVX2) at INFO
logging.getLogger("faiss.loader").setLevel(logging.WARNING)

from flows.cli_common import settings_args  # noqa: E402 - after the environment defaults above
from flows.cli_index import cmd_index_build, cmd_index_refresh, cmd_ls, cmd_search, index_type_arg  # noqa: E402
from flows.cli_ops import cmd_deploy, cmd_dev_s3, cmd_doctor, cmd_serve  # noqa: E402
from flows.cli_pipeline import (cmd_backfill, cmd_encode, cmd_evaluate, cmd_extract, cmd_ingest,  # noqa: E402
                                cmd_pipeline, cmd_train_backbone, cmd_train_coder, cmd_update_model)


def build_parser() -> argparse.ArgumentParser:
    # -v before or after the subcommand: the subcommand's copy leaves the top-level value alone
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                         help="debug logs and full tracebacks")
    p = argparse.ArgumentParser(prog="codeshard", description=__doc__.split("\n\n")[0], parents=[verbose])
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", required=True)

    def add(name: str, fn: Callable, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help, parents=[verbose])
        settings_args(sp)
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
    settings_args(sp)
    sp.set_defaults(fn=cmd_index_build)
    sp.add_argument("--dataset", required=True)
    sp.add_argument("--coder", required=True, help="coder id (codes/<dataset>/<coder>/ must exist)")
    sp.add_argument("--bits", type=int, help="code length (default: the coder's longest)")
    sp.add_argument("--name", help="index name (default <dataset>-<coder>-<bits>b)")
    sp.add_argument("--memory-budget", default="2GB", help="resident memory the index may take (e.g. 2GB, 512MB)")
    sp.add_argument("--index-type", type=index_type_arg,
                    help="a type (binary-flat, binary-ivf, pq-lut, rq-lut, coder-lut, ivf-pq, ivf-rq, flat, ivf-flat, "
                         "hnsw) or a faiss factory string over the stored codes ('IVF4096,PQ8x8', 'BIVF1024', "
                         "'HNSW32,Flat'); default: the cheapest that fits --memory-budget")
    sp.add_argument("--recall-target", type=float, help="tune nprobe/efSearch to this recall@10 (default 0.95)")
    sp.add_argument("--merge-on-disk", action=argparse.BooleanOptionalAction, default=None,
                    help="IVF: merge the partials into one index.ivfdata file (--merge-on-disk) or in memory "
                         "(--no-merge-on-disk); default: on disk when twice the index exceeds --memory-budget")
    sp.add_argument("--build-device", choices=["cpu", "cuda"], default="cpu",
                    help="where faiss trains the coarse quantizer (cuda falls back to cpu with a message)")
    sp.add_argument("--shards-per-task", type=int, help="code shards per partial-index task (default: by memory)")
    sp.add_argument("--exclude-split", choices=["query", "train", "val", "database"],
                    help="leave the rows of this raw split out (recorded in build.json); default: every item")
    sp.add_argument("--force", action="store_true", help="rebuild even if CURRENT covers the same shards")
    sp = index_sub.add_parser("refresh", help="add shards new since CURRENT; publish the next version",
                              parents=[verbose])
    settings_args(sp)
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
