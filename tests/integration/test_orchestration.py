"""prefect.yaml deployments load with their schedules/parameters; backfill touches exactly its range."""
from __future__ import annotations

import anyio
import pytest

from flows.deployments import deployment_specs, runner_deployments
from infra.store import open_store
from tests.conftest import settings_dict
from tests.helpers import register_untrained_cnn

EXPECTED = {
    "nightly-extract": ("0 2 * * *", {"dataset", "model_id"}),
    "nightly-codes": ("30 2 * * *", {"dataset", "model_id", "methods"}),
    "index-refresh": ("0 3 * * *", {"name"}),
    "model-update": (None, {"dataset", "old_model_id", "arch", "method"}),
    "backfill": (None, {"dataset", "model_id", "shards", "stages"}),
}


def test_prefect_yaml_deployments_register_with_schedules(prefect_server):
    from prefect.client.orchestration import get_client

    specs = deployment_specs()
    assert {s["name"] for s in specs} == set(EXPECTED)
    deployments = runner_deployments(specs)

    async def register_and_read():
        async with get_client() as client:
            out = {}
            for d in deployments:
                dep_id = await d.apply()
                out[d.name] = await client.read_deployment(dep_id)
            return out

    read = anyio.run(register_and_read)
    for name, (cron, params) in EXPECTED.items():
        dep = read[name]
        crons = [s.schedule.cron for s in dep.schedules]
        assert crons == ([cron] if cron else []), name
        assert set(dep.parameters) == params, name
        # parameters validate against the flow's signature (a typo in prefect.yaml fails here)
        assert set(dep.parameters) <= set(dep.parameter_openapi_schema["properties"]), name
    refresh = read["index-refresh"]
    assert refresh.concurrency_limit == 1 or refresh.global_concurrency_limit.limit == 1
    assert str(refresh.concurrency_options.collision_strategy).endswith("CANCEL_NEW")


@pytest.mark.s3
def test_backfill_processes_exactly_the_range(prefect_server, s3_settings):
    from flows.backfill import backfill
    from flows.ingest import ingest

    cfg = settings_dict(s3_settings)
    store = open_store(s3_settings)
    ingest("digits", shard_rows=200, settings=cfg)  # 9 shards
    register_untrained_cnn(store)
    out = backfill("digits", "test-cnn", shards="2:5", stages=["extract"], settings=cfg)
    assert (out["extract"]["shards"], out["extract"]["done"]) == (3, 3)
    written = sorted(i.key.rsplit("/", 1)[1] for i in store.list("features/digits/test-cnn/"))
    assert written == [f"part-{p:05d}.parquet" for p in (2, 3, 4)]
    again = backfill("digits", "test-cnn", shards="3:7", stages=["extract"], settings=cfg)
    assert (again["extract"]["done"], again["extract"]["skipped"]) == (2, 2)  # 5,6 new; 3,4 done
    forced = backfill("digits", "test-cnn", shards="4", stages=["extract"], force=True, settings=cfg)
    assert (forced["extract"]["shards"], forced["extract"]["done"]) == (1, 1)
