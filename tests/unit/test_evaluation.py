"""encoders/evaluation.py: the OOD report of an LLC coder, and "nothing ever selects on query"."""
from typing import Any

import numpy as np
import pytest

from encoders.coders import CODERS, Coder, FitReport, register
from encoders.evaluation import VARIANTS, Split, evaluate_variant, ood_report
from encoders.llc import LLCCoder, LLCConfig
from encoders.llc_model import pack_signs
from encoders.metrics import hamming_scores
from encoders.ood import auroc, fpr_at_tpr
from tests.synthetic import blobs


# --------------------------------------------------------------------------------------------
# ood_report
# --------------------------------------------------------------------------------------------
class FakeLLC:
    """Duck-typed fitted LLC: row i of x holds i in column 0; distances and MSP are looked up."""

    def __init__(self, dist: list[int], msp: list[float], radius: int) -> None:
        self.dist, self.msp, self.radius, self.d_min = np.array(dist), np.array(msp), radius, 2 * radius + 1
        self.config = LLCConfig(bits=6)

    def class_distances(self, x: np.ndarray) -> np.ndarray:
        d = self.dist[x[:, 0].astype(int)]
        return np.stack([d + 3, d, d + 1], 1)  # nearest class code is column 1

    def ood_flag(self, x: np.ndarray) -> np.ndarray:
        return self.class_distances(x).min(1) > self.radius

    def msp_score(self, x: np.ndarray) -> np.ndarray:
        return self.msp[x[:, 0].astype(int)]


def rows(idx) -> np.ndarray:
    return np.array(idx, dtype=np.float32)[:, None]


def test_ood_report_hand_computed_values():
    # in: nearest distances 0,0,0,1; out: 0,2,3; radius 0 (exact-match flag)
    coder = FakeLLC(dist=[0, 0, 0, 1, 0, 2, 3], msp=[0.9, 0.8, 0.7, 0.6, 0.5, 0.95, 0.1], radius=0)
    r = ood_report(coder, rows([0, 1, 2, 3]), rows([4, 5, 6]))
    # AUROC of -distance: 3 in-rows at 0 each tie one out-row (1/2) and beat two; the in-row at 1
    # beats two -> (3 * 2.5 + 2) / 12
    assert r["llc_auroc"] == pytest.approx(9.5 / 12)
    assert r["msp_auroc"] == pytest.approx(8 / 12)  # every in-row loses only to 0.95
    # 95% TPR needs the last tied block; one out-row (the one at distance 0) is accepted by then
    assert r["llc_fpr95"] == pytest.approx(1 / 3)
    assert r["msp_fpr95"] == pytest.approx(1 / 3)
    # the flag accepts distance 0 only: 3 of 4 in-rows, 1 of 3 out-rows
    assert r["flag_tpr"] == pytest.approx(0.75) and r["flag_fpr"] == pytest.approx(1 / 3)
    assert r["exact_tpr"] == pytest.approx(0.75) and r["exact_fpr"] == pytest.approx(1 / 3)  # radius 0 = exact
    assert (r["n_in"], r["n_out"], r["bits"], r["radius"], r["d_min"]) == (4, 3, 6, 0, 1)


def test_ood_report_uses_encoders_ood_with_in_distribution_positive():
    rng = np.random.default_rng(0)
    dist = rng.integers(0, 4, 60).tolist()
    msp = rng.random(60).tolist()
    coder = FakeLLC(dist, msp, radius=1)
    x_in, x_out = rows(range(40)), rows(range(40, 60))
    r = ood_report(coder, x_in, x_out)
    lab = np.r_[np.ones(40, bool), np.zeros(20, bool)]
    s = -np.array(dist, dtype=float)
    assert r["llc_auroc"] == pytest.approx(auroc(s, lab))
    assert r["llc_fpr95"] == pytest.approx(fpr_at_tpr(s, lab, 0.95))
    assert r["msp_auroc"] == pytest.approx(auroc(np.array(msp), lab))
    d_in = np.array(dist)[:40]
    assert r["exact_tpr"] == pytest.approx(np.mean(d_in == 0))   # accepted only on a class code
    assert r["flag_tpr"] == pytest.approx(np.mean(d_in <= 1))    # accepted within the decoding radius
    # swapping the roles of the two sets mirrors the AUROC
    assert ood_report(coder, x_out, x_in)["llc_auroc"] == pytest.approx(1 - r["llc_auroc"])


def test_ood_report_refuses_an_empty_side():
    coder = FakeLLC([0, 1], [0.5, 0.5], radius=0)
    with pytest.raises(ValueError, match="in- and out-of-distribution"):
        ood_report(coder, rows([0, 1]), np.zeros((0, 1), np.float32))


def test_ood_report_on_a_real_llc_coder(one_torch_thread):
    centers = np.random.default_rng(123).normal(scale=4.0, size=(6, 10))
    x, y = blobs(centers[:4], 100, 0)  # classes 0-3 in distribution
    vx, vy = blobs(centers[:4], 30, 1)
    x_in, _ = blobs(centers[:4], 50, 2)
    x_out, _ = blobs(centers[4:], 50, 3)  # two classes never seen
    coder = LLCCoder(LLCConfig(bits=6, hidden=16, epochs_class=15, epochs_instance=10, batch_size=64,
                               lr=1e-2, patience=20))
    coder.fit(x, y, (vx, vy))
    r = ood_report(coder, x_in, x_out)
    for k in ("llc_auroc", "llc_fpr95", "msp_auroc", "msp_fpr95", "flag_tpr", "flag_fpr"):
        assert 0.0 <= r[k] <= 1.0, k
    assert r["radius"] == coder.radius and r["d_min"] == coder.d_min
    assert r["flag_tpr"] == pytest.approx((coder.class_distances(x_in).min(1) <= coder.radius).mean())
    assert r["flag_fpr"] == pytest.approx(1 - coder.ood_flag(x_out).mean())
    assert r["flag_tpr"] > 0.9  # well-separated blobs: in-distribution codes decode


# --------------------------------------------------------------------------------------------
# evaluate_variant: fit sees train (+ val for selection), never query
# --------------------------------------------------------------------------------------------
FIT_CALLS: list[dict[str, Any]] = []


class SpyCoder(Coder):
    """Sign of the first `bits` features, Hamming search; records every argument `fit` receives."""

    symmetric = True

    def __init__(self, bits: int = 8, seed: int = 0) -> None:
        self.bits = bits

    @property
    def lengths(self) -> tuple[int, ...]:
        return (self.bits,)

    def fit(self, train, labels, val=None) -> FitReport:
        FIT_CALLS.append({"train": train, "labels": labels, "val": val})
        return FitReport(fit_s=0.0)

    def encode(self, x: np.ndarray) -> np.ndarray:
        return pack_signs(x[:, : self.bits])

    def scores(self, queries, codes, bits=None) -> np.ndarray:
        return hamming_scores(self.encode(queries), codes)

    def state(self) -> dict[str, Any]:
        return {"method": self.method, "bits": self.bits}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "SpyCoder":
        return cls(state["bits"])


@pytest.fixture
def spy(monkeypatch):
    register("spy-fit")(SpyCoder)
    monkeypatch.setitem(VARIANTS, "spy-per-length", ("spy-fit", {}, True))
    monkeypatch.setitem(VARIANTS, "spy-one-model", ("spy-fit", {}, False))
    FIT_CALLS.clear()
    yield FIT_CALLS
    CODERS.pop("spy-fit", None)
    FIT_CALLS.clear()


def make_splits(d: int = 16) -> dict[str, Split]:
    rng = np.random.default_rng(0)

    def split(n: int, offset: float) -> Split:  # offsets make every split's rows distinct values
        return Split((rng.normal(size=(n, d)) + offset).astype(np.float32), rng.integers(0, 3, n))

    s = {"train": split(60, 0.0), "val": split(20, 100.0), "query": split(10, 1000.0)}
    s["database"] = split(40, -100.0)
    return s


@pytest.mark.parametrize("variant, n_fits", [("spy-per-length", 2), ("spy-one-model", 1)])
def test_evaluate_variant_never_fits_on_query(spy, variant, n_fits):
    s = make_splits()
    rows = evaluate_variant(variant, [8, 16] if n_fits == 2 else [8], s["train"], s["val"], s["query"],
                            s["database"])
    assert len(spy) == n_fits and len(rows) == n_fits
    q = s["query"].x
    for call in spy:
        assert call["train"] is s["train"].x and call["labels"] is s["train"].labels
        assert call["val"][0] is s["val"].x and call["val"][1] is s["val"].labels
        for arr in (call["train"], call["val"][0]):
            assert not np.shares_memory(arr, q)
            # no query row anywhere in what fit saw (query rows are ~1000, the rest <= ~104)
            assert not np.isin(q.view(np.uint32), arr.view(np.uint32)).any()
    assert all(r.method == variant for r in rows)


# --------------------------------------------------------------------------------------------
# one method's failure is a row; seeds give mean ± std; the literature's mAP@R normaliser
# --------------------------------------------------------------------------------------------
def test_a_method_that_cannot_run_gets_a_row_and_the_others_are_reported():
    from encoders.evaluation import evaluate_seeds

    s = make_splits()
    # LLC at 1 bit cannot give 3 classes distinct codes: it raises inside fit
    bad = evaluate_seeds("llc", [1], s["train"], s["val"], s["query"], s["database"], seeds=[0], params={})
    assert len(bad) == 1 and bad[0].note.startswith("not run: ValueError") and bad[0].map != bad[0].map
    both = evaluate_seeds("llc", [1, 8], s["train"], s["val"], s["query"], s["database"], seeds=[0])
    assert both[0].note.startswith("not run") and both[1].note == "" and both[1].map > 0  # per length
    good = evaluate_seeds("itq", [8], s["train"], s["val"], s["query"], s["database"], seeds=[0])
    assert good[0].map > 0 and good[0].note == ""


def test_llc_val_rows_of_classes_without_train_rows_are_left_out_not_fatal():
    x, y = blobs(np.eye(4, 8, dtype=np.float32) * 4, 60, seed=0)
    keep = y < 3
    c = LLCCoder(bits=6, epochs_class=2, epochs_instance=2)
    c.fit(x[keep], y[keep], (x, y))  # val holds class 3, train does not: was "classes unseen in phase 1"
    assert c.encode(x).shape == (len(x), 1)


def test_seeds_are_aggregated_to_mean_and_std():
    from encoders.evaluation import evaluate_seeds

    s = make_splits()
    rows = evaluate_seeds("lsh", [8], s["train"], s["val"], s["query"], s["database"], seeds=[0, 1, 2])
    one = [evaluate_variant("lsh", [8], s["train"], s["val"], s["query"], s["database"], seed=k)[0].map
           for k in (0, 1, 2)]
    assert rows[0].n_seeds == 3
    assert rows[0].map == pytest.approx(np.mean(one), abs=1e-5)
    assert rows[0].map_std == pytest.approx(np.std(one, ddof=1), abs=1e-5)


def test_literature_map_at_r_normalises_by_relevant_retrieved():
    from encoders.evaluation import retrieval_metrics

    # one query, 2000 items ranked by score; relevant at ranks 1 and 3 inside the top 1000, one more at 1500
    scores = -np.arange(2000, dtype=np.float32)[None, :]
    db = np.zeros(2000, int)
    db[[0, 2, 1499]] = 7
    m = retrieval_metrics(lambda sl: scores[sl], np.array([7]), db)
    top = (1 / 1 + 2 / 3)
    assert m["map_at_1000_lit"] == pytest.approx(top / 2)            # the papers' CalcTopMap
    assert m["map_at_1000"] == pytest.approx(top / 3)                # normaliser min(R, relevant)
    assert m["map"] == pytest.approx((top + 3 / 1500) / 3)


def test_ceiling_and_isolation_rows_run_on_the_same_splits():
    from encoders.evaluation import DERIVED, evaluate_seeds

    x, y = blobs(np.eye(4, 16, dtype=np.float32) * 3, 150, seed=1)
    perm = np.random.default_rng(0).permutation(len(y))
    cut = {"train": perm[:300], "val": perm[300:400], "query": perm[400:450], "database": perm[450:]}
    s = {k: Split(x[i], y[i]) for k, i in cut.items()}
    tiny = {"epochs_embed": 1, "epochs_level0": 1, "epochs_all": 1, "codebook_size": 16, "levels": 2,
            "hidden": 0, "dim": 8}
    for v in ("float-cos", "drq-emb", "drq-emb+pq", "drq-emb+rq"):
        rows = evaluate_seeds(v, [8], s["train"], s["val"], s["query"], s["database"], seeds=[0],
                              params=None if v == "float-cos" else tiny)
        assert rows and all(r.note == "" and 0 <= r.map <= 1 for r in rows), (v, rows)
    assert set(DERIVED) >= {"float-cos", "drq-emb", "drq-emb+pq", "drq-emb+rq", "gsl-emb", "gsl-none-emb"}


def test_evaluate_task_on_a_43_class_import_with_tiny_classes_reports_every_method(tmp_path):
    """#16's failing case at the task level: an imported 43-class set whose tiny classes (1, 2, 3 rows)
    get splits by the small-class rule; llc runs (no 'classes unseen in phase 1'), a length llc cannot
    serve gets a row saying why, and the other methods are reported."""
    import pyarrow as pa

    from infra import layout
    from infra.datasets import assign_splits
    from infra.settings import Settings
    from infra.shards import features_table, write_table
    from infra.store import open_store
    from tasks.evaluate import evaluate_method

    sizes = [1, 2, 3] + [40] * 40
    y = np.repeat(np.arange(43), sizes)
    x = (np.eye(43, 48, dtype=np.float32)[y] * 4 + np.random.default_rng(0).normal(size=(len(y), 48))).astype(np.float32)
    split = assign_splits(y, np.zeros(len(y), bool), seed=0, query_per_class=5, train_per_class=25, val_per_class=8)
    for c in range(43):  # the rule: no class has val or query rows without train rows
        sc = split[y == c]
        assert (sc == "train").any() or not ((sc == "val") | (sc == "query")).any()
    assert sorted(split[y == 2]) == ["query", "train", "val"] and list(split[y == 0]) == ["train"]
    cfg = Settings.load(store=f"file://{tmp_path}/store")
    store = open_store(cfg)
    ids = np.arange(len(y), dtype=np.int64) + 1000
    write_table(store, layout.raw_key("tiny43", 0), pa.table({"id": ids, "label": y.astype(np.int32),
                                                               "split": split.tolist()}))
    write_table(store, layout.features_key("tiny43", "m", 0), features_table(ids, x))
    llc = evaluate_method.fn(cfg, "tiny43", "m", "llc", [4, 8], params={"epochs_class": 2, "epochs_instance": 2})
    assert [r["bits"] for r in llc] == [4, 8]
    assert llc[0]["note"].startswith("not run: ValueError")  # 4 bits cannot name 43 classes: a row saying why
    assert llc[1]["note"] == "" and llc[1]["map"] > 1 / 43  # 2 epochs: above chance, not a quality claim
    itq = evaluate_method.fn(cfg, "tiny43", "m", "itq", [8])
    assert itq[0]["note"] == "" and itq[0]["map"] > 1 / 43  # the other methods are reported beside it
