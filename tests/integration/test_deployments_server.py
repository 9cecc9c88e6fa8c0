"""prefect.yaml against a real `prefect server start`, a process work pool and a worker: new raw
shards move the index's CURRENT with nobody starting anything; a bad shard is quarantined and the
rest is published; a failing stage notifies and starts nothing after it."""
from __future__ import annotations

import time
from pathlib import Path

import anyio
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import yaml

from flows.deployments import PREFECT_YAML, deploy_all, load_project
from infra import indexes as ix
from infra import layout
from infra.settings import Settings
from infra.shards import read_table, write_table
from infra.store import open_store
from tests.helpers import register_untrained_cnn
from tests.integration.prefect_server import artifacts_and_logs, prefect_server, process_worker

DATASET, MODEL, METHOD, BITS = "digits", "test-cnn", "itq", 16
CODER = f"{METHOD}-{BITS}-{MODEL}"
INDEX = "digits-e2e"
CHAIN_BOUND_S = 240


def project_for_test(path: Path) -> Path:
    """The shipped prefect.yaml with digits/test-cnn parameters, a 10 s discovery and its triggers
    matching digits (nothing else changed: this is the file users deploy)."""
    project = load_project(PREFECT_YAML)
    rid = f"codeshard.dataset.{DATASET}.{MODEL}"
    for spec in project["deployments"]:
        params = spec.get("parameters", {})
        params.update({k: v for k, v in {"dataset": DATASET, "model_id": MODEL}.items() if k in params})
        if "methods" in params:
            params["methods"] = {METHOD: BITS}
        if spec["name"] == "index-refresh":
            params["name"] = INDEX
        if spec["name"] == "discover":
            spec["schedules"] = [{"interval": 10}]
        for t in spec.get("triggers", []):
            t["match"]["prefect.resource.id"] = rid
    path.write_text(yaml.safe_dump(project, sort_keys=False))
    return path


def land_new_shards(store) -> None:
    """part 6: gallery rows of part 0 under new ids (no train/val rows: the coder stays);
    part 7: the same with unreadable images (fails validation -> quarantine)."""
    t = read_table(store, layout.raw_key(DATASET, 0))
    t = t.filter(pc.equal(t.column("split"), "database"))
    t = t.set_column(t.schema.get_field_index("id"), "id", pc.add(t.column("id"), 1_000_000))
    write_table(store, layout.raw_key(DATASET, 6), t)
    bad = t.set_column(t.schema.get_field_index("id"), "id", pc.add(t.column("id"), 1_000_000))
    bad = bad.set_column(bad.schema.get_field_index("image"), "image",
                         pa.array([b"not a png"] * len(bad), type=t.schema.field("image").type))
    write_table(store, layout.raw_key(DATASET, 7), bad)


def flow_runs(url: str):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def read():
        async with get_client() as c:
            return await c.read_flow_runs()

    with temporary_settings({PREFECT_API_URL: url}):
        return anyio.run(read)


def test_new_shards_drive_the_chain_to_a_new_index_version(tmp_path):
    """~155-170 s (a real server, a process worker, four chained deployments). Its one failure was a
    race in the test itself (the refresh run was still 'Running' after CURRENT moved); it waits for
    the runs to end now."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.build_index import build_index
    from flows.extract_features import extract_features
    from flows.generate_codes import generate_codes
    from flows.ingest import ingest

    home = tmp_path / "prefect"
    home.mkdir()
    cfg = Settings.load(store=f"file://{tmp_path / 'store'}", max_workers=2, heavy_limit=2)
    params = {"store": cfg.store, "max_workers": 2}
    store = open_store(cfg)
    with prefect_server(home) as url, temporary_settings({PREFECT_API_URL: url}):
        # day 0, run by hand: 6 raw shards, features, an itq coder, index v1
        assert ingest(DATASET, shard_rows=300, settings=params)["done"] == 6
        register_untrained_cnn(store, MODEL)
        extract_features(DATASET, MODEL, settings=params)
        generate_codes(DATASET, MODEL, {METHOD: BITS}, settings=params)
        v1 = build_index(DATASET, CODER, BITS, INDEX, settings=params)["version"]

        out = deploy_all(cfg, "codeshard-e2e", path=project_for_test(tmp_path / "prefect.yaml"))
        assert "discover" in out and "index-refresh" in out, out

        async def deployments():
            async with get_client() as c:
                return {d.name: d for d in await c.read_deployments()}

        deps = anyio.run(deployments)
        assert set(deps) == {"discover", "extract", "codes", "index-refresh", "model-update", "backfill"}
        assert deps["extract"].job_variables["env"]["CODESHARD_STORE"] == cfg.store  # workers need no exports
        assert deps["extract"].job_variables["env"]["CODESHARD_HEAVY_LIMIT"] == "2"
        assert deps["index-refresh"].pull_steps == [] and not deps["extract"].schedules
        assert [s.schedule.interval.total_seconds() for s in deps["discover"].schedules] == [10]

        with process_worker(home, url, "codeshard-e2e"):
            land_new_shards(store)  # nobody starts anything after this
            t0 = time.monotonic()
            while True:
                cur = ix.read_current(store, INDEX)
                if cur.version > v1:
                    inputs = {layout.part_of(i["key"]) for i in ix.read_build(store, INDEX, cur.version).inputs}
                    if 6 in inputs:
                        break
                assert time.monotonic() - t0 < CHAIN_BOUND_S, (
                    [(r.name, r.state_name) for r in flow_runs(url)],
                    (home / "worker-codeshard-e2e.log").read_text()[-4000:])
                time.sleep(2)
            assert 7 not in inputs  # quarantined, the rest published
            assert store.exists(layout.quarantine_key("extract", layout.raw_key(DATASET, 7)) + ".reason.json")

            # CURRENT moves before the refresh run ends (it still emits its event): wait for the runs to end
            chain = (f"extract {DATASET} parts 6:8 with {MODEL}", f"encode {DATASET} parts 6 ({MODEL} features)",
                     f"refresh index {INDEX}")
            while True:
                runs = {r.name: r for r in flow_runs(url)}
                if all(runs[name].state.is_final() for name in chain):
                    break
                assert time.monotonic() - t0 < CHAIN_BOUND_S, [(n, runs[n].state_name) for n in chain]
                time.sleep(1)
            assert [runs[name].state_name for name in chain] == ["Completed"] * 3, [runs[n].state for n in chain]

            # a failing stage notifies (run log + artifact) and emits nothing: no index run follows it
            n_refresh = sum(r.name.startswith("refresh index") for r in flow_runs(url))
            failed = run_deployment("codes-stage/codes", parameters={"model_id": "no-such-model"}, timeout=120)
            assert failed.state.is_failed(), failed.state

            arts, logs = artifacts_and_logs(failed.id, "codeshard: codes-stage run")
            assert any(a.key == "failure-codes-stage" and "no-such-model" in str(a.data) for a in arts), arts
            assert any(m.startswith("codeshard: codes-stage run") for m in logs), logs[-10:]
            time.sleep(5)
            assert sum(r.name.startswith("refresh index") for r in flow_runs(url)) == n_refresh


def test_codeshard_serve_runs_a_deployment_from_a_real_server(tmp_path):
    """The other path: `codeshard serve` (one process, no work pool) against a real `prefect server
    start`. A deployment run asked through the API (a manual backfill over parts 1:3, extract only)
    is picked up and runs in a subprocess of `serve` with the served settings: exactly those parts
    are extracted, written by a process other than this one."""
    import os
    import socket
    import subprocess
    import sys

    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.ingest import ingest
    from infra.manifests import read_manifest
    from tests.integration.prefect_server import base_env, stop

    home = tmp_path / "prefect"
    home.mkdir()
    cfg = Settings.load(store=f"file://{tmp_path / 'store'}", max_workers=2)
    params = {"store": cfg.store, "max_workers": 2}
    store = open_store(cfg)
    with prefect_server(home) as url, temporary_settings({PREFECT_API_URL: url}):
        assert ingest(DATASET, shard_rows=300, settings=params)["done"] == 6
        register_untrained_cnn(store, MODEL)
        env = base_env(home) | {"PREFECT_API_URL": url, "CODESHARD_STORE": cfg.store, "CODESHARD_HEAVY_LIMIT": "0",
                                "PREFECT_RUNNER_POLL_FREQUENCY": "2"}
        log = open(tmp_path / "serve.log", "wb")
        serve = subprocess.Popen([str(Path(sys.executable).parent / "codeshard"), "serve"], env=env, stdout=log,
                                 stderr=subprocess.STDOUT, start_new_session=True)
        try:
            t0 = time.monotonic()
            while True:  # served deployments appear once `serve` has registered them
                try:
                    run = run_deployment("backfill/backfill", timeout=180,
                                         parameters={"dataset": DATASET, "model_id": MODEL, "shards": "1:3",
                                                     "stages": ["extract"]})
                    break
                except Exception:  # noqa: BLE001 - ObjectNotFound until serve registered it
                    assert time.monotonic() - t0 < 120, (tmp_path / "serve.log").read_text()[-3000:]
                    time.sleep(2)
            assert run.state.is_completed(), (run.state, (tmp_path / "serve.log").read_text()[-3000:])
        finally:
            stop(serve)
            log.close()
    manifests = [read_manifest(store, i.key) for i in store.list(layout.manifests_prefix("extract", DATASET, MODEL))]
    assert sorted(m.part for m in manifests) == [1, 2]
    here = f"{socket.gethostname()}:{os.getpid()}"
    assert all(m.writer and m.writer != here for m in manifests)
