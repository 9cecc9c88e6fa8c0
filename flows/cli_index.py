"""`codeshard` commands over published indexes and the store's contents: index build, index refresh,
search, ls."""
from __future__ import annotations

import argparse
import sys

from flows.cli_common import existing_store, overrides, print_json, run_flow


def cmd_index_build(args) -> int:
    from flows.build_index import build_index
    from infra import layout

    layout.check_names(dataset=args.dataset, coder=args.coder, index=args.name)
    existing_store(args)
    s = run_flow(build_index, args, dataset=args.dataset, coder_id=args.coder, bits=args.bits, name=args.name,
                 memory_budget=args.memory_budget, force=args.force, shards_per_task=args.shards_per_task,
                 index_type=args.index_type, exclude_split=args.exclude_split, device=args.build_device,
                 merge_on_disk=args.merge_on_disk, **({"recall_target": args.recall_target} if args.recall_target else {}))
    print_json(s)
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
    print_json(run_flow(refresh_index, args, name=args.name, shards_per_task=args.shards_per_task,
                    allow_removal=args.allow_removal))
    return 0


def cmd_search(args) -> int:
    from infra import layout
    from infra.search import Searcher, query_feature
    from infra.settings import Settings

    layout.check_name("index", args.name)
    if args.k < 1:
        raise ValueError(f"-k must be at least 1, got {args.k}")
    cfg = Settings.load(**overrides(args))
    store = existing_store(args)
    searcher = Searcher(store, args.name, poll_seconds=0, cache_dir=args.cache_dir)
    if args.id is not None:
        res = searcher.search_by_id(args.id, args.k, nprobe=args.nprobe)
    else:
        model_id = searcher.current().build.model_id
        if not model_id:
            raise ValueError(f"index {args.name} records no model_id: search it --id")
        image = open(args.image, "rb").read() if args.image else None
        res = searcher.search(query_feature(store, model_id, image=image, text=args.text,
                                            device=cfg.torch_device()), args.k, nprobe=args.nprobe)
    print_json({"name": args.name, "version": res.version, "hits": res.hits[0]})
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


def index_type_arg(text: str) -> str:
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
