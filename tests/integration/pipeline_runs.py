"""Helpers for tests that run the whole pipeline as `python -m flows.cli pipeline` subprocesses
against the session's SeaweedFS store (kill/resume, concurrent runs). Not a test module.

The runs use digits in 6 shards of 300 rows (few Prefect task runs: the shared test server is slow
under load) and a pre-registered, untrained 64-d SmallCNN
(`test-cnn64`, seeded weights) passed with `--model`, so no backbone is trained: a trained backbone
would differ bit for bit between runs (torch training on threads), and every feature after it too.
With the model fixed, raw, features, codes, coder weights (DRQ trained with torch, seeded; ITQ) and
each index's index.faiss / ids.parquet come out byte-identical run after run (same settings: batch
size, workers), which the tests check. (Also seen with the CLI's default coders drq/itq/pq/float.)
"""
from __future__ import annotations

import dataclasses
import io
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from infra.settings import Settings
from infra.store import Store

DATASET, MODEL, ROWS, SHARD_ROWS, PARTS = "digits", "test-cnn64", 1797, 300, 6
# `--coders drq:64,itq:64 --methods lsh,itq --bits 64`: 2 coders (itq registers in ~0.1 s, DRQ in
# ~2 s, so a kill between the two is possible), 2 indexes, a 2-method evaluation.
PIPELINE_ARGS = ("--coders", "drq:64,itq:64", "--methods", "lsh,itq", "--bits", "64")
CODERS = ("drq-64-test-cnn64", "itq-64-test-cnn64")
INDEXES = ("digits-drq-64-test-cnn64-64b", "digits-itq-64-test-cnn64-64b")
RUN_TIMEOUT_S = 420  # one whole run; ~80 s on 2 loaded cores


def pipeline_settings(seaweed) -> Settings:
    """A fresh prefix in the session bucket; 2 shard workers, 6 shards of 300 rows."""
    return Settings.load(store=f"s3://{seaweed.bucket}/p-{uuid.uuid4().hex[:10]}", s3_endpoint=seaweed.endpoint,
                         max_workers=2, batch_size=256, shard_rows=SHARD_ROWS)


def register_cnn64(store: Store) -> dict:
    """Register `test-cnn64`: a randomly initialised (seed 0) SmallCNN with 64-d features, so the
    CLI's default 64-bit coders fit (itq needs bits <= D)."""
    import torch

    from encoders.backbones import build_backbone
    from infra.registry import register_model

    torch.manual_seed(0)
    bb = build_backbone("small-cnn", embed_dim=64)
    return register_model(store, MODEL, "small-cnn", {"embed_dim": 64}, bb.module.state_dict(),
                          {"source": "untrained (tests)", "input_hw": [28, 28], "feature_dim": 64})


def start_pipeline(settings: Settings, log: Path) -> subprocess.Popen:
    """`codeshard pipeline` in its own session (so a SIGKILL to the group takes every child)."""
    cmd = [sys.executable, "-m", "flows.cli", "pipeline", "--dataset", DATASET, "--model", MODEL, *PIPELINE_ARGS]
    env = {**os.environ, **settings.to_env(), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, env=env, start_new_session=True, stdout=open(log, "ab"),
                            stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[2])


def tail(log: Path, n: int = 3000) -> str:
    return log.read_text(errors="replace")[-n:] if log.exists() else ""


STALL_S = 150  # no new or changed object in the store for this long: the run is stuck


def heavy_slots() -> str:
    """The Prefect server's "heavy" concurrency limit, in words (for a stuck run's message)."""
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as c:
            for g in c.read_global_concurrency_limits(limit=200):
                if g.name == "tag:heavy":
                    return f"Prefect limit tag:heavy: {g.active_slots} of {g.limit} slots held"
    except Exception as e:  # noqa: BLE001 - diagnostics only
        return f"Prefect limits unreadable: {e}"
    return "no Prefect limit tag:heavy"


def release_leaked_heavy_slots() -> int:
    """Slots of the Prefect server's "heavy" limit held right now, released (reset), so that later
    runs of the test session are not blocked. Called when nothing runs, after a kill: every slot
    held then belongs to the killed run (its 60 s leases expire, but the session's test server runs
    no repossessor to free them, so a killed run never gives its slots back there; see
    flows/limits.py). Returns how many were held."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as c:
        for g in c.read_global_concurrency_limits(limit=200):
            if g.name == "tag:heavy":
                if g.active_slots:
                    c.reset_concurrency_limit_by_tag("heavy")
                return int(g.active_slots)
    return 0


def watch(proc: subprocess.Popen, store: Store, log: Path, until=None, timeout: float = RUN_TIMEOUT_S) -> None:
    """Wait until `until()` holds (or, without one, the process ends). Fails, killing the run,
    when the time is up or the store has not changed for STALL_S seconds (a stuck run: e.g.
    concurrency slots that a killed run never gave back)."""
    t0 = last_change = last_look = time.monotonic()
    state = None
    while not (until() if until else proc.poll() is not None):
        if until and proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before the kill point:\n{tail(log)}")
        now = time.monotonic()
        if now - last_look >= 2:
            snap, last_look = snapshot(store), now
            if snap != state:
                state, last_change = snap, now
        if now - last_change > STALL_S or now - t0 > timeout:
            kill(proc)
            raise AssertionError(f"pipeline stuck: {now - last_change:.0f}s without a store change, "
                                 f"{now - t0:.0f}s in; {heavy_slots()}\n{tail(log)}")
        time.sleep(0.05)


def finish(proc: subprocess.Popen, log: Path, store: Store) -> int:
    watch(proc, store, log)
    return proc.wait()


def kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


@dataclasses.dataclass(frozen=True)
class KillPoint:
    """SIGKILL the run once `n` keys under `prefix` ending with `suffix` are visible in the store,
    `delay` seconds later. `total`: that count when the stage is complete; `landed_inside` says
    whether the kill came before the stage finished."""

    stage: str
    prefix: str
    n: int
    total: int
    suffix: str = ""
    delay: float = 0.0

    def count(self, store: Store) -> int:
        return sum(i.key.endswith(self.suffix) for i in store.list(self.prefix))

    def landed_inside(self, store: Store) -> tuple[bool, str]:
        """After the kill: was the stage still unfinished? (what was visible, in words)"""
        if self.stage == "ingest":  # extract had not begun
            n = len(store.list(f"_manifests/extract/{DATASET}/"))
            return n == 0, f"{self.count(store)} of {self.total} raw shards, {n} extract manifests"
        if self.stage == "index":  # the last CURRENT had not moved
            n = sum(i.key.endswith("/CURRENT") for i in store.list("indexes/"))
            return n < len(INDEXES), f"{self.count(store)} versions claimed, {n} CURRENT"
        if self.stage == "evaluate":  # no report written yet
            n = sum(i.key.endswith("/report.csv") for i in store.list(f"reports/{DATASET}/"))
            return n == 0, f"{n} reports"
        n = self.count(store)
        return n < self.total, f"{n} of {self.total}"


def kill_point(stage: str, rng) -> KillPoint:
    """The seeded kill point of `stage` (N drawn from `rng`)."""
    if stage == "ingest":
        # ingest's shard tasks finish within ~20 ms of each other (the rows are in memory), so a kill
        # after N visible raw shards usually finds all of them written: it counts as inside ingest
        # when the run has not reached extract (see landed_inside)
        return KillPoint(stage, f"raw/{DATASET}/", rng.randint(1, PARTS - 2), PARTS)
    if stage == "extract":
        return KillPoint(stage, f"_manifests/extract/{DATASET}/{MODEL}/", rng.randint(1, PARTS - 2), PARTS)
    if stage == "train-coders":  # some coders registered (card.json: the commit point), not all
        return KillPoint(stage, "coders/", rng.randint(1, len(CODERS) - 1), len(CODERS), suffix="/card.json")
    if stage == "encode":
        return KillPoint(stage, f"_manifests/encode/{DATASET}/", rng.randint(2, PARTS * len(CODERS) - 4), PARTS * len(CODERS))
    if stage == "index":  # the first index's version claimed (merged, evaluating), then 0-1.5 s more:
        # the kill lands before its CURRENT moves or while the next index builds (the window between
        # the last claim and the last CURRENT is too short to aim at under load)
        return KillPoint(stage, "indexes/", 1, len(INDEXES), suffix="/_claim.json",
                         delay=round(rng.uniform(0.0, 1.5), 2))
    if stage == "evaluate":  # every index published; the evaluation is running
        return KillPoint(stage, "indexes/", len(INDEXES), len(INDEXES), suffix="/CURRENT",
                         delay=round(rng.uniform(0.0, 1.5), 2))
    raise ValueError(stage)


def run_until(settings: Settings, store: Store, point: KillPoint, log: Path) -> None:
    """Start the pipeline, SIGKILL its process group at `point`; fail if it ends on its own first."""
    proc = start_pipeline(settings, log)
    try:
        watch(proc, store, log, until=lambda: point.count(store) >= point.n)
        if point.delay:
            time.sleep(point.delay)
        assert proc.poll() is None, f"the run ended before the kill at {point}:\n{tail(log)}"
    finally:
        kill(proc)


def snapshot(store: Store) -> dict[str, str]:
    """key -> ETag of every committed object: manifests, registry, index versions and CURRENT
    pointers (staging excluded: it is consumed and removed by design)."""
    out = {}
    for prefix in ("_manifests/", "models/", "coders/", "indexes/"):
        out.update({i.key: i.etag for i in store.list(prefix) if "/_staging/" not in i.key})
    return out


def data_etags(store: Store) -> dict[str, str]:
    """key -> ETag (content MD5 on a single PUT) of every data object: raw, features and codes
    shards and coder weights."""
    out = {}
    for prefix in ("raw/", "features/", "codes/", "coders/"):
        out.update({i.key: i.etag for i in store.list(prefix) if not i.key.endswith("card.json")})
    return out


def read_ids(store: Store, key: str) -> np.ndarray:
    return pq.read_table(io.BytesIO(store.read_bytes(key)), columns=["id"]).column("id").to_numpy()


def assert_ids_exact(store: Store) -> None:
    """Every stage's shards together hold each dataset id exactly once (nothing lost, nothing twice)."""
    prefixes = [f"raw/{DATASET}/", f"features/{DATASET}/{MODEL}/"] + [f"codes/{DATASET}/{c}/" for c in CODERS]
    for prefix in prefixes:
        keys = [i.key for i in store.list(prefix)]
        assert len(keys) == PARTS, (prefix, keys)
        ids = np.concatenate([read_ids(store, k) for k in keys])
        assert len(ids) == ROWS and len(np.unique(ids)) == ROWS, f"{prefix}: {len(ids)} ids, {len(np.unique(ids))} unique"
        np.testing.assert_array_equal(np.sort(ids), np.arange(ROWS))


def published(store: Store) -> dict[str, dict]:
    """For each index: the version CURRENT names, which must be complete (build.json present), the
    ETags of its index.faiss and ids.parquet, and its ids (unique)."""
    from infra import indexes as ix

    out = {}
    for name in INDEXES:
        cur = ix.read_current(store, name)
        assert cur is not None, f"{name}: no CURRENT"
        build = ix.read_build(store, name, cur.version)  # raises if the version is incomplete
        files = {f: store.head(ix.version_key(name, cur.version, f)) for f in (ix.INDEX_FILE, ix.IDS_FILE)}
        assert all(files.values()), f"{name} v{cur.version}: {files}"
        ci, _ = ix.load_version(store, name, cur.version, build)
        assert ci.ntotal == build.n == len(np.unique(ci.ids)), f"{name}: duplicate ids in the index"
        out[name] = {"version": cur.version, "n": build.n, "ids": np.sort(ci.ids),
                     **{f: h.etag for f, h in files.items()}}
    return out


def eval_rows(store: Store) -> list[tuple]:
    """(method, bits, map, p_at_100) of every evaluation report in the store (timings excluded)."""
    from infra.reports import read_csv_rows

    rows = []
    for info in store.list(f"reports/{DATASET}/"):
        if info.key.endswith("/report.csv"):
            rows += [(r["method"], str(r["bits"]), str(r["map"]), str(r["p_at_100"]))
                     for r in read_csv_rows(store.read_bytes(info.key).decode())]
    return sorted(rows)


def assert_same_outputs(store: Store, clean: dict) -> None:
    """`store` holds what a clean run produced: data objects byte-identical (same keys, same
    content MD5), each published index's index.faiss and ids.parquet byte-identical, the same
    evaluation figures."""
    got = data_etags(store)
    diff = sorted(k for k in set(got) | set(clean["data"]) if got.get(k) != clean["data"].get(k))
    assert not diff, f"{len(diff)} data objects differ from the clean run: {diff[:10]}"
    pub = published(store)
    for name, ref in clean["published"].items():
        for f in ("index.faiss", "ids.parquet"):
            assert pub[name][f] == ref[f], f"{name}: {f} differs from the clean run"
        np.testing.assert_array_equal(pub[name]["ids"], ref["ids"])
    assert eval_rows(store) == clean["eval"]
