"""prefect.yaml deployments load with their schedules/parameters; backfill touches exactly its range."""
from __future__ import annotations

import time

import anyio
import pytest
from prefect import flow, task

from flows.deployments import load_flow, runner_deployments
from flows.limits import ensure_heavy_limit
from infra.store import open_store
from tests.conftest import settings_dict
from tests.helpers import register_untrained_cnn

EXPECTED = {  # name: (schedule, trigger event, parameters)
    "discover": ("interval", None, {"dataset", "model_id"}),
    "extract": (None, "codeshard.raw.discovered", {"dataset", "model_id"}),
    "codes": (None, "codeshard.features.extracted", {"dataset", "model_id", "methods"}),
    "index-refresh": (None, "codeshard.codes.encoded", {"name"}),
    "model-update": (None, None, {"dataset", "old_model_id", "arch", "method"}),
    "backfill": (None, None, {"dataset", "model_id", "stages"}),  # each run passes shards or dates
}


def test_prefect_yaml_deployments_serve_with_schedules_and_triggers(prefect_server):
    """What `codeshard serve` registers: every prefect.yaml entry, with its schedule or its trigger
    (the chain is event-driven: no clock offsets), parameters valid for the flow, and a timeout."""
    from prefect.client.orchestration import get_client

    from flows.deployments import load_project

    project = load_project()
    assert {s["name"] for s in project["deployments"]} == set(EXPECTED)
    deployments = runner_deployments(project)

    async def register_and_read():
        async with get_client() as client:
            out = {}
            for d in deployments:
                dep_id = await d.apply()
                out[d.name] = await client.read_deployment(dep_id)
            return out

    read = anyio.run(register_and_read)
    by_name = {d.name: d for d in deployments}
    for name, (schedule, event, params) in EXPECTED.items():
        dep = read[name]
        kinds = [type(s.schedule).__name__.removesuffix("Schedule").lower() for s in dep.schedules]
        assert kinds == ([schedule] if schedule else []), name
        assert [e for t in by_name[name].triggers for e in t.expect] == ([event] if event else []), name
        assert set(dep.parameters) == params, name
        # parameters validate against the flow's signature (a typo in prefect.yaml fails here)
        assert set(dep.parameters) <= set(dep.parameter_openapi_schema["properties"]), name
        assert load_flow(project["deployments"][list(EXPECTED).index(name)]["entrypoint"]).timeout_seconds, name
    assert {"shards", "dates"} <= set(read["backfill"].parameter_openapi_schema["properties"])
    refresh = read["index-refresh"]
    assert refresh.global_concurrency_limit.limit == 1
    assert str(refresh.concurrency_options.collision_strategy).endswith("ENQUEUE")


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




@task
def _nap(seconds: float) -> None:
    time.sleep(seconds)


@flow
def _three_naps(heavy_limit: int, tags: list[str]):
    ensure_heavy_limit(heavy_limit)
    nap = _nap.with_options(tags=tags) if tags else _nap  # with_options(tags=[]) would keep a task's tags
    for f in [nap.submit(1.0) for _ in range(3)]:
        f.result()


def test_heavy_limit_keeps_heavy_tasks_apart(prefect_server):
    """Three 1-second task runs on three worker threads overlap when untagged (so the check can
    fail); tagged "heavy" with heavy_limit=1, the server hands out one slot at a time and no two of
    them overlap (Running -> Completed, as the server recorded them). Untagged means no tag at all:
    a run with any tag asks the server for a slot, and a 503 on that request delays it ~2 s, which
    once kept three "light" naps apart in a fresh-clone CI run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.task_runners import ThreadPoolTaskRunner

    def spans(tags: list[str]):
        state = _three_naps.with_options(task_runner=ThreadPoolTaskRunner(max_workers=3))(
            1, tags, return_state=True)

        async def read():
            async with get_client() as c:
                lim = await c.read_concurrency_limit_by_tag("heavy")
                runs = await c.read_task_runs(flow_run_filter=FlowRunFilter(
                    id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
                return lim.concurrency_limit, sorted((r.start_time, r.end_time) for r in runs)

        return anyio.run(read)

    def overlaps(s):
        return sum(start < prev_end for (_, prev_end), (start, _) in zip(s, s[1:]))

    try:
        limit, untagged = spans([])
        assert limit == 1 and len(untagged) == 3 and overlaps(untagged) >= 1, untagged
        limit, heavy = spans(["heavy"])
        assert limit == 1 and len(heavy) == 3 and overlaps(heavy) == 0, heavy
    finally:  # the session's other tests run without it (as with the default heavy_limit=0), and
        # the test server reaps no lease: a killed run elsewhere in the session would keep a slot
        with get_client(sync_client=True) as c:
            c.delete_concurrency_limit_by_tag("heavy")


def test_tasks_carry_heavy_tag_only_while_the_server_limits_it(prefect_server, local_settings):
    """A task run asks the server for a slot of every tag it carries, limit or none (a write that
    can answer 503 and cost a ~2 s retry): the extract flow drops a tag without a server limit
    (its task runs carry no "heavy"/"io"), and keeps "heavy" on its shard task runs while the
    server holds a "heavy" limit, so that limit still applies to them. The other stages' tasks go
    through the same `server_tagged` (encode, index batch, import: checked on the tasks)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.extract_features import extract_features
    from flows.ingest import ingest
    from flows.limits import limited_tags, server_tagged
    from tasks.codes import encode_shard
    from tasks.index import index_batch
    from tasks.ingest import import_shard

    cfg = settings_dict(local_settings)
    ingest("digits", shard_rows=900, settings=cfg)
    register_untrained_cnn(open_store(local_settings))

    def shard_task_tags() -> list[set[str]]:
        state = extract_features("digits", "test-cnn", force=True, settings=cfg, return_state=True)
        assert state.is_completed() and state.result()["done"] == 2

        async def read():
            async with get_client() as c:
                return await c.read_task_runs(flow_run_filter=FlowRunFilter(
                    id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))

        runs = anyio.run(read)
        assert {r.name.split(" ")[0].split("-")[0] for r in runs} >= {"extract", "check_ids_across_shards"}, runs
        return [set(r.tags) for r in runs if r.name.startswith("extract ")] + \
            [set(r.tags) for r in runs if r.name.startswith("check_ids")]

    others = (encode_shard, index_batch, import_shard)
    assert limited_tags({"heavy", "io"}) == frozenset()
    assert shard_task_tags() == [set(), set(), set()]
    assert [t.tags for t in server_tagged(*others)] == [set(), set(), set()]
    with get_client(sync_client=True) as c:
        c.create_concurrency_limit(tag="heavy", concurrency_limit=2)
    try:
        assert limited_tags({"heavy", "io"}) == {"heavy"}
        assert shard_task_tags() == [{"heavy"}, {"heavy"}, set()]
        assert [t.tags for t in server_tagged(*others)] == [{"heavy"}, {"heavy"}, set()]
    finally:  # as above: the session's other tests run without a heavy limit
        with get_client(sync_client=True) as c:
            c.delete_concurrency_limit_by_tag("heavy")


@pytest.mark.s3
def test_backfill_by_partition_date(prefect_server, s3_settings):
    """Ingest records each shard's partition date; a date backfill runs exactly the parts that
    landed in the range (a shard replaced since its ingest has no known date and is left out)."""
    from flows.backfill import backfill
    from flows.ingest import ingest
    from infra import layout
    from infra.shards import read_table, write_table

    cfg = settings_dict(s3_settings)
    store = open_store(s3_settings)
    assert ingest("digits", shard_rows=200, date="2026-11-01", settings=cfg)["done"] == 9
    for p in (6, 7, 8):  # lost, and landed again the next day
        store.delete(layout.raw_key("digits", p))
    again = ingest("digits", shard_rows=200, date="2026-11-02", settings=cfg)
    assert (again["done"], again["skipped"]) == (3, 6)  # the others keep the date they landed with
    register_untrained_cnn(store)

    def features():
        return sorted(layout.part_of(i.key) for i in store.list("features/digits/test-cnn/"))

    out = backfill("digits", "test-cnn", dates="2026-11-02", stages=["extract"], settings=cfg)
    assert (out["shards"], out["extract"]["done"]) == ("6:9", 3) and features() == [6, 7, 8]
    both = backfill("digits", "test-cnn", shards="0:7", dates="2026-11-02:2026-11-30", stages=["extract"],
                    settings=cfg)
    assert (both["shards"], both["extract"]["skipped"]) == ("6", 1)
    none = backfill("digits", "test-cnn", dates="2026-10-01:2026-10-31", stages=["extract"], settings=cfg)
    assert none["shards"] is None and "extract" not in none and features() == [6, 7, 8]

    raw0 = read_table(store, layout.raw_key("digits", 0))  # replaced by another writer: date unknown
    write_table(store, layout.raw_key("digits", 0), raw0.slice(0, 100))
    nov1 = backfill("digits", "test-cnn", dates="2026-11-01", stages=["extract"], settings=cfg)
    assert (nov1["shards"], nov1["extract"]["done"]) == ("1:6", 5) and features() == [1, 2, 3, 4, 5, 6, 7, 8]
    with pytest.raises(ValueError, match="shards .* or dates"):
        backfill("digits", "test-cnn", stages=["extract"], settings=cfg)
