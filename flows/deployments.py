"""prefect.yaml (shipped as flows/prefect.yaml) is the one list of deployments.

`deploy_all` is `prefect --no-prompt deploy --all` over it, so every key Prefect knows is honoured
(schedules of every kind, `active`, triggers, job variables, pull steps, concurrency). `serve_all`
serves them from one process; a served deployment has no work pool and no pull steps, so it
honours what it can (schedules, triggers, parameters, concurrency, `job_variables.env`, applied
to this process and so to every run it starts) and refuses any other key instead of dropping it.
Nothing here depends on a source checkout: entrypoints are module paths (`flows.deployed:…`).
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

PREFECT_YAML = Path(__file__).with_name("prefect.yaml")
# the deployment keys `serve` honours; any other key present makes it refuse (never dropped)
SERVE_KEYS = {"name", "entrypoint", "description", "tags", "schedules", "parameters", "concurrency_limit",
              "triggers", "work_pool", "version", "enforce_parameter_schema", "paused"}
SERVE_POOL_KEYS = {"name", "job_variables"}
SERVE_JOB_VARIABLE_KEYS = {"env"}
SERVE_TOP_KEYS = {"name", "prefect-version", "build", "push", "pull", "definitions", "deployments"}
# settings a worker's runs need, rendered into job_variables.env by `prefect deploy`
DEPLOY_ENV = ("store", "s3_endpoint", "s3_region", "runner", "dask_address", "dask_workers", "max_workers",
              "heavy_limit", "device")


class UnsupportedKey(ValueError):
    """prefect.yaml holds a key `codeshard serve` cannot honour: use `codeshard deploy`."""


def load_project(path: Path = PREFECT_YAML) -> dict[str, Any]:
    return yaml.safe_load(Path(path).read_text())


def deployment_specs(path: Path = PREFECT_YAML) -> list[dict[str, Any]]:
    """The `deployments:` entries of prefect.yaml (YAML anchors resolved, templates not)."""
    return load_project(path)["deployments"]


def deploy_env(settings: Any, pool: str, environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment `prefect deploy` renders prefect.yaml's `{{ $VAR }}` templates from: the
    caller's, plus CODESHARD_POOL and every DEPLOY_ENV setting as resolved here (unset ones as '',
    which Settings reads as "default"). AWS credentials are never put into deployments."""
    env = dict(os.environ if environ is None else environ)
    resolved = settings.to_env()
    for name in DEPLOY_ENV:
        key = f"CODESHARD_{name.upper()}"
        env[key] = resolved.get(key, "")
    env.setdefault("CODESHARD_NOTIFY_BLOCK", "")
    env["CODESHARD_POOL"] = pool
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():  # the API this process uses (a profile or temporary settings)
        env["PREFECT_API_URL"] = PREFECT_API_URL.value()
    return env


def render(value: Any, environ: dict[str, str]) -> Any:
    """prefect.yaml `{{ $VAR }}` templates filled from `environ` (as `prefect deploy` does)."""
    from prefect.utilities.templating import apply_values

    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(environ)
    try:
        return apply_values(value, dict(environ), remove_notset=False)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def check_servable(project: dict[str, Any]) -> None:
    """Raise UnsupportedKey naming every key of `project` that serving would not honour."""
    bad = [f"top-level {k!r}" for k in project if k not in SERVE_TOP_KEYS]
    bad += [f"{k!r} steps" for k in ("build", "push", "pull") if project.get(k)]
    for spec in project["deployments"]:
        where = f"deployment {spec.get('name')!r}"
        bad += [f"{where}: {k!r}" for k in spec if k not in SERVE_KEYS]
        pool = spec.get("work_pool") or {}
        bad += [f"{where}: work_pool.{k}" for k in pool if k not in SERVE_POOL_KEYS]
        bad += [f"{where}: work_pool.job_variables.{k}" for k in (pool.get("job_variables") or {})
                if k not in SERVE_JOB_VARIABLE_KEYS]
    if bad:
        raise UnsupportedKey("codeshard serve cannot honour " + "; ".join(bad)
                             + ": remove them or run `codeshard deploy --pool NAME` (prefect deploy) instead")


def load_flow(entrypoint: str):
    """'module.path:flow' (or 'path/file.py:flow') -> the flow object."""
    from prefect.flows import load_flow_from_entrypoint

    return load_flow_from_entrypoint(entrypoint)


def serve_env(project: dict[str, Any], environ: dict[str, str]) -> dict[str, str]:
    """The union of the deployments' `job_variables.env`, rendered; conflicting values refused."""
    out: dict[str, str] = {}
    for spec in project["deployments"]:
        env = render(((spec.get("work_pool") or {}).get("job_variables") or {}).get("env") or {}, environ)
        for k, v in env.items():
            v = "" if v is None else str(v)
            if k in out and out[k] != v:
                raise UnsupportedKey(f"job_variables.env {k!r} differs between deployments ({out[k]!r} vs {v!r}): "
                                     f"one serve process has one environment; use `codeshard deploy`")
            out[k] = v
    return out


def runner_deployments(project: dict[str, Any] | None = None, environ: dict[str, str] | None = None) -> list:
    """RunnerDeployments for `prefect.serve`, one per prefect.yaml entry (checked: check_servable)."""
    from prefect.cli.deploy._schedules import _schedule_config_to_deployment_schedule
    from prefect.cli.deploy._triggers import _initialize_deployment_triggers
    from prefect.client.schemas.objects import ConcurrencyLimitConfig

    project = project or load_project()
    check_servable(project)
    environ = dict(os.environ) if environ is None else environ
    out = []
    for spec in project["deployments"]:
        spec = render({k: v for k, v in spec.items() if k != "triggers"}, environ) | \
            {"triggers": spec.get("triggers") or []}  # trigger templates are rendered per event
        kw: dict[str, Any] = {k: spec[k] for k in ("description", "tags", "version", "paused",
                                                   "enforce_parameter_schema") if k in spec}
        kw["schedules"] = [_schedule_config_to_deployment_schedule(s) for s in spec.get("schedules") or []]
        if spec["triggers"]:
            kw["triggers"] = _initialize_deployment_triggers(spec["name"], [dict(t) for t in spec["triggers"]])
        if cl := spec.get("concurrency_limit"):
            kw["concurrency_limit"] = ConcurrencyLimitConfig(**cl) if isinstance(cl, dict) else cl
        out.append(load_flow(spec["entrypoint"]).to_deployment(name=spec["name"],
                                                               parameters=spec.get("parameters", {}), **kw))
    return out


def serve_all(settings: Any, path: Path = PREFECT_YAML) -> None:
    """Serve every deployment from this process (blocks; needs PREFECT_API_URL). Runs start as
    subprocesses of this one, with the deployments' `job_variables.env` in their environment."""
    from prefect import serve

    project = load_project(path)
    check_servable(project)
    environ = deploy_env(settings, pool="")
    os.environ.update({k: v for k, v in serve_env(project, environ).items()})
    serve(*runner_deployments(project, environ))


def deploy_all(settings: Any, pool: str, path: Path = PREFECT_YAML, timeout: float = 600) -> str:
    """`prefect --no-prompt deploy --all --prefect-file <prefect.yaml>` with the settings in its
    environment (rendered into job_variables.env) and CODESHARD_POOL=pool. The pool is created as a
    process pool when missing. Runs in an empty directory: nothing of a checkout is read or
    written. Returns prefect's output; raises CalledProcessError with it on failure."""
    env = deploy_env(settings, pool)
    ensure_pool(pool)
    prefect = [sys.executable, "-m", "prefect"]
    with tempfile.TemporaryDirectory(prefix="codeshard-deploy-") as cwd:
        r = subprocess.run([*prefect, "--no-prompt", "deploy", "--all", "--prefect-file", str(path)],
                           cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"prefect deploy failed (exit {r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r.stdout


def ensure_pool(pool: str) -> None:
    """Create process work pool `pool` when it does not exist."""
    import anyio
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    async def run():
        async with get_client() as c:
            try:
                await c.read_work_pool(pool)
            except ObjectNotFound:
                await c.create_work_pool(WorkPoolCreate(name=pool, type="process"))

    anyio.run(run)
