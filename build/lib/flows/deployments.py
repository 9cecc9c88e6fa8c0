"""prefect.yaml is the one list of deployments; `serve` and `deploy` both build from it."""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import yaml

from infra.settings import REPO_ROOT

PREFECT_YAML = REPO_ROOT / "prefect.yaml"


def deployment_specs(path: Path = PREFECT_YAML) -> list[dict[str, Any]]:
    """The `deployments:` entries of prefect.yaml."""
    return yaml.safe_load(path.read_text())["deployments"]


def load_flow(entrypoint: str):
    """'flows/x.py:fn' -> the flow object (imported as a module of this repository)."""
    file, name = entrypoint.split(":")
    module = ".".join(Path(file).with_suffix("").parts)
    return getattr(importlib.import_module(module), name)


def _schedule_kwargs(spec: dict[str, Any]) -> dict[str, Any]:
    from prefect.client.schemas.objects import ConcurrencyLimitConfig
    from prefect.schedules import Cron

    kw: dict[str, Any] = {}
    if spec.get("schedules"):
        kw["schedules"] = [Cron(s["cron"], timezone=s.get("timezone", "UTC")) for s in spec["schedules"]]
    if spec.get("concurrency_limit"):
        cl = spec["concurrency_limit"]
        kw["concurrency_limit"] = ConcurrencyLimitConfig(limit=cl["limit"],
                                                         collision_strategy=cl.get("collision_strategy", "ENQUEUE"))
    return kw


def runner_deployments(specs: list[dict[str, Any]] | None = None) -> list:
    """RunnerDeployments for `prefect.serve` (one process serves them all)."""
    out = []
    for spec in specs or deployment_specs():
        f = load_flow(spec["entrypoint"])
        out.append(f.to_deployment(name=spec["name"], parameters=spec.get("parameters", {}),
                                   description=spec.get("description"), tags=spec.get("tags", []),
                                   **_schedule_kwargs(spec)))
    return out


def serve_all() -> None:
    """Serve every deployment from this process (blocks). Needs a Prefect API (PREFECT_API_URL)."""
    from prefect import serve

    serve(*runner_deployments())


def deploy_all(pool: str, specs: list[dict[str, Any]] | None = None) -> list[str]:
    """Register every deployment with work pool `pool` (created as a process pool when missing);
    code is pulled from this repository's directory. Returns the deployment ids."""
    import anyio
    from prefect import flow as prefect_flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    async def ensure_pool():
        async with get_client() as c:
            try:
                await c.read_work_pool(pool)
            except Exception:  # noqa: BLE001 - ObjectNotFound: create it
                await c.create_work_pool(WorkPoolCreate(name=pool, type="process"))

    anyio.run(ensure_pool)
    ids = []
    for spec in specs or deployment_specs():
        f = prefect_flow.from_source(source=str(REPO_ROOT), entrypoint=spec["entrypoint"])
        ids.append(str(f.deploy(name=spec["name"], work_pool_name=pool, parameters=spec.get("parameters", {}),
                                description=spec.get("description"), tags=spec.get("tags", []),
                                print_next_steps=False, **_schedule_kwargs(spec))))
    return ids
