"""Concurrency on the real S3 server (SeaweedFS) under a real Prefect server:

- a conditional PUT (the primitive behind CURRENT and version claims) whose response is lost:
  botocore's retry is refused with 412 because the first attempt landed; the writer must still
  see its own write as a success (and a real loss must stay a loss);
- searcher threads loading CURRENT and searching while refreshes publish new versions;
- two whole pipelines (`codeshard pipeline` subprocesses) on the same dataset and store at once.
"""
from __future__ import annotations

import collections
import threading
import time

import pytest

from flows.build_index import build_index
from flows.refresh_index import refresh_index
from infra import indexes as ix
from infra import layout
from infra.search import Searcher
from infra.settings import Settings
from infra.store import PreconditionFailed, open_store
from tests.conftest import settings_dict
from tests.faultproxy import FaultProxy
from tests.integration import pipeline_runs as pr
from tests.integration.test_faults_s3 import Watcher
from tests.integration.test_index_flow import DATASET, ROWS, fit_coders, synthetic, write_parts

pytestmark = pytest.mark.s3


class DropFirstPut:
    """Proxy `match`: fault (drop the response of) the first PUT of a key ending with `suffix`;
    on the next PUT of it, run `before_retry` first (e.g. a rival's write), then let it through."""

    def __init__(self, suffix: str, before_retry=None):
        self.suffix, self.before_retry, self.puts = suffix, before_retry, 0

    def __call__(self, method: str, path: str) -> bool:
        if method != "PUT" or not path.endswith(self.suffix):
            return False
        self.puts += 1
        if self.puts == 2 and self.before_retry is not None:
            self.before_retry()
        return self.puts == 1


def test_conditional_put_whose_response_is_lost_still_wins(prefect_server, s3_settings, seaweed):
    """The proxy forwards a conditional PUT, the server applies it, the response never reaches the
    client; botocore retries and the retry gets 412 (If-None-Match: the object now exists; If-Match:
    its ETag moved). `put_if` re-reads the object: it holds exactly this write's bytes, so the write
    won and put_if returns its ETag. Shown for a create (If-None-Match), a move (If-Match), and
    through the index build flow, whose CURRENT move would otherwise be taken for a lost race: the
    version CURRENT already names would be discarded (deleted) under the searchers.
    Counter-cases: a plain 412 (not a retry) with equal bytes, and a retried 412 where a rival's
    bytes are in the object, still raise PreconditionFailed."""
    direct = open_store(s3_settings)
    with FaultProxy(seaweed.endpoint, seed=9, rate=1.0, kinds=("drop_response",)) as proxy:
        cfg = {**settings_dict(s3_settings), "s3_endpoint": proxy.endpoint}
        via = open_store(Settings.load(**cfg))
        key = "ptr/CURRENT"

        proxy.set(match=DropFirstPut(key))
        etag = via.put_if(key, b'{"version": 1, "build_id": "a"}', if_none_match=True)
        assert proxy.counts["drop_response"] == 1 and proxy.match.puts == 2  # landed, lost, retried: 412
        assert direct.read_with_etag(key) == (b'{"version": 1, "build_id": "a"}', etag)

        proxy.set(match=DropFirstPut(key))
        etag2 = via.put_if(key, b'{"version": 2, "build_id": "a"}', if_match=etag)
        assert proxy.counts["drop_response"] == 2 and proxy.match.puts == 2
        assert direct.read_with_etag(key) == (b'{"version": 2, "build_id": "a"}', etag2)

        proxy.set(rate=0.0, match=None)  # a real loss, first attempt, even with the same bytes: still a loss
        with pytest.raises(PreconditionFailed) as lost:
            via.put_if(key, b'{"version": 2, "build_id": "a"}', if_match=etag)
        assert not lost.value.retried

        rival = b'{"version": 3, "build_id": "b"}'  # our write lands, a rival moves CURRENT on top
        proxy.set(rate=1.0, match=DropFirstPut(key, before_retry=lambda: direct.write_bytes(key, rival)))
        with pytest.raises(PreconditionFailed) as lost:
            via.put_if(key, b'{"version": 3, "build_id": "a"}', if_match=etag2)
        assert lost.value.retried and direct.read_bytes(key) == rival

        # the index build flow: its CURRENT move's response is lost
        coders = fit_coders(direct, ("itq",))
        write_parts(direct, coders, range(4))
        proxy.set(match=DropFirstPut("/indexes/lost/CURRENT"))
        s = build_index(DATASET, "itq-test", 32, "lost", settings=cfg)
        assert proxy.match.puts == 2 and proxy.counts["drop_response"] == 4
    assert (s["status"], s["version"]) == ("published", 1), s
    cur = ix.read_current(direct, "lost")
    assert cur.version == 1 and ix.read_build(direct, "lost", 1).n == 4 * ROWS
    assert Searcher(direct, "lost", poll_seconds=0).search(synthetic(range(1))[1][:2], k=5).version == 1


def test_searchers_follow_current_while_refreshes_publish(prefect_server, s3_settings):
    """3 searcher threads load CURRENT and search in a loop (two keep one Searcher that reloads when
    CURRENT moves, one builds a fresh Searcher, i.e. a full load from CURRENT, every time) while two
    refreshes publish v2 and v3. Every answer comes from a complete version: its index holds exactly
    the rows that version's build.json says (N, the parts it covers), all k hits are ids of that
    version; no search raises."""
    cfg = settings_dict(s3_settings)
    store = open_store(s3_settings)
    coders = fit_coders(store, ("itq",))
    write_parts(store, coders, range(4))
    assert build_index(DATASET, "itq-test", 32, "live", settings=cfg)["version"] == 1
    parts_of = {1: 4, 2: 6, 3: 8}  # version -> parts 0..n-1 it holds
    queries = synthetic(range(1))[1][::37][:4] + 0.05
    stop, errors = threading.Event(), []
    seen: collections.Counter = collections.Counter()
    searches = collections.Counter()

    def loop(i: int) -> None:
        s = Searcher(open_store(s3_settings), "live", poll_seconds=0)
        while not stop.is_set():
            try:
                if i == 1:
                    s = Searcher(open_store(s3_settings), "live", poll_seconds=0)  # a full load each time
                res = s.search(queries, k=10, with_metadata=False)
                lv = s._versions[res.version]  # the version this answer came from
                n = parts_of[res.version] * ROWS
                assert lv.version == res.version and lv.ci.ntotal == lv.build.n == n, (res.version, lv.ci.ntotal)
                parts = (res.ids - 1_000_000) // 1000
                assert (res.ids >= 0).all() and parts.max() < parts_of[res.version], res.ids
                with lock:
                    seen[res.version] += 1
                    searches[i] += 1
            except Exception as e:  # noqa: BLE001 - collected, asserted below
                with lock:
                    errors.append(f"thread {i}: {type(e).__name__}: {e}")
            time.sleep(0.02)

    lock = threading.Lock()
    threads = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(3)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 60
        while min(searches[i] for i in range(3)) < 1 and time.monotonic() < deadline and not errors:
            time.sleep(0.05)
        for version, parts in ((2, range(4, 6)), (3, range(6, 8))):
            write_parts(store, coders, parts)
            r = refresh_index("live", settings=cfg)
            assert (r["status"], r["version"]) == ("published", version), r
        t_end = time.monotonic() + 1.0
        while time.monotonic() < t_end:  # let every thread answer on v3
            time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert errors == [], errors[:5]
    assert seen[1] > 0 and seen[3] > 0 and set(seen) <= {1, 2, 3}, seen
    assert min(searches.values()) >= 2, searches
    print(f"\nsearches per version {dict(seen)}, per thread {dict(searches)}")


@pytest.mark.slow  # two whole pipelines at once: ~1-2 min on 2 shared cores
def test_two_pipelines_on_one_dataset_at_once(clean_pipeline, seaweed, tmp_path):
    """Two `codeshard pipeline` runs start together on the same dataset and store. Both finish
    (exit 0); a watcher reading the store throughout sees no torn shard (every visible Parquet
    object complete, every manifest naming its output's checksum); each stage's shards hold every id
    once; each index has exactly one published version, complete, loadable, CURRENT pointing at it
    (a build that lost the CURRENT race was discarded or skipped); the outputs are byte-identical to
    a clean single run."""
    settings = pr.pipeline_settings(seaweed)
    store = open_store(settings)
    pr.register_cnn64(store)
    watcher = Watcher(settings, [f"raw/{pr.DATASET}/", f"features/{pr.DATASET}/", f"codes/{pr.DATASET}/",
                                 "_manifests/"])
    watcher.start()
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    t0 = time.monotonic()
    try:
        procs = [pr.start_pipeline(settings, log) for log in logs]
        rcs = [pr.finish(p, log, store) for p, log in zip(procs, logs)]
    finally:
        watcher.stop()
    assert rcs == [0, 0], "\n\n".join(pr.tail(log) for log in logs)
    assert watcher.violations == [] and watcher.polls > 10, watcher.violations[:5]
    pr.assert_ids_exact(store)
    for name in pr.INDEXES:
        builds = [i.key for i in store.list(layout.index_prefix(name)) if i.key.endswith("/build.json")]
        assert builds == [ix.version_key(name, ix.read_current(store, name).version, ix.BUILD_FILE)], builds
    pr.assert_same_outputs(store, clean_pipeline)
    statuses = [line.strip() for log in logs for line in log.read_text().splitlines() if "(published)" in line
                or "(skipped)" in line or "(superseded)" in line]
    print(f"\ntwo pipelines: {time.monotonic() - t0:.0f}s, {watcher.polls} watcher polls, "
          f"{len(watcher.checked)} objects checked; index outcomes: {statuses}")
