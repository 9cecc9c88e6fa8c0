"""What every `codeshard` command shares: the settings flags, loading settings from them, the
existing-store check, running a flow and printing its result with the exit code of
infra/outcomes.py."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

SETTING_FLAGS = ("store", "s3_endpoint", "s3_region", "runner", "dask_address", "dask_workers",
                 "max_workers", "heavy_limit", "device", "batch_size", "shard_rows")


def settings_args(p: argparse.ArgumentParser) -> None:
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

    print_json(result)
    for line in outcomes.problem_lines(result):
        print(line, file=sys.stderr)
    return outcomes.exit_code(result)


def run_flow(flow_obj, args: argparse.Namespace, **params: Any) -> Any:
    """Call a flow with the settings from flags; each flow runs its tasks on the runner they select
    (infra/runners.py SettingsTaskRunner)."""
    from infra.settings import Settings

    Settings.load(**overrides(args))  # bad settings fail here, before a Prefect server starts
    return flow_obj(settings=overrides(args), **params)


def csv_list(text: str | None, cast=str) -> list | None:
    return [cast(t) for t in text.split(",") if t.strip()] if text else None


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))
