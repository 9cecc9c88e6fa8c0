"""encoders/compat.py, compat_losses.py, compat_matrix.py: prototypes, Dual-Tuning / BCT losses, tie-aware AP, matrix, gain, gate."""
import dataclasses

import numpy as np
import pytest
import torch
from torch import nn


from encoders import compat as C
from encoders.backbones import SmallCNN


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------- prototypes

def test_old_prototypes_are_class_means_including_unseen_classes():
    f = np.array([[0, 0], [2, 0], [0, 4], [10, 10]], np.float32)
    y = np.array([0, 0, 1, 2])  # say the old model only knew classes 0 and 1
    p = C.old_prototypes(f, y, 3)
    torch.testing.assert_close(p, torch.tensor([[1.0, 0.0], [0.0, 4.0], [10.0, 10.0]]))


def test_old_prototypes_missing_class_raises():
    with pytest.raises(ValueError, match=r"classes \[1\]"):
        C.old_prototypes(np.zeros((2, 3), np.float32), np.array([0, 2]), 3)


# ---------------------------------------------------------------- losses

PROTOS = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])


def test_prototype_loss_zero_when_on_own_prototype():
    x = PROTOS.clone() * 3.0  # normalised distances: 0 to own, >= sqrt(2) to the others
    y = torch.arange(3)
    assert C.prototype_loss(x, y, PROTOS, margin=0.2).item() == 0.0


def test_prototype_loss_positive_when_on_wrong_prototype():
    x = PROTOS[[1, 2, 0]].clone()
    y = torch.arange(3)
    assert C.prototype_loss(x, y, PROTOS, margin=0.2).item() > 0.2


def test_prototype_loss_margin_and_unnormalised_mode():
    x = torch.tensor([[0.5, 0.0]])  # own prototype 0 at distance 0.5; nearest other at ~1.118
    y = torch.tensor([0])
    assert C.prototype_loss(x, y, PROTOS, margin=0.1, normalize=False).item() == 0.0
    assert C.prototype_loss(x, y, PROTOS, margin=1.0, normalize=False).item() > 0.0


def _nets():
    torch.manual_seed(0)
    new = nn.Linear(4, 2)
    old_cls, new_cls = nn.Linear(2, 3), nn.Linear(2, 5)
    return new, old_cls, new_cls


def test_influence_and_mutual_gradients_reach_new_model_only():
    new, old_cls, new_cls = _nets()
    x = torch.randn(8, 4)
    y = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])  # 3 and 4 unknown to the old classifier
    old_feats = torch.randn(8, 2, requires_grad=True)
    loss = (C.influence_loss(new(x), y, old_cls)
            + C.mutual_structural_loss(new(x), old_feats, y, old_cls, new_cls))
    loss.backward()
    assert new.weight.grad is not None and new.weight.grad.abs().sum() > 0
    assert new_cls.weight.grad is not None and new_cls.weight.grad.abs().sum() > 0
    assert old_cls.weight.grad is None  # frozen old classifier
    assert old_feats.grad is None  # stored old features are constants


def test_prototype_loss_gradient_to_features_only():
    feats = torch.randn(6, 2, requires_grad=True)
    protos = PROTOS.clone().requires_grad_(True)
    C.prototype_loss(feats, torch.tensor([0, 1, 2, 0, 1, 2]), protos, margin=5.0).backward()
    assert feats.grad.abs().sum() > 0 and protos.grad is None


def test_influence_loss_ignores_classes_the_old_model_lacks():
    _, old_cls, _ = _nets()
    f = torch.randn(4, 2)
    assert C.influence_loss(f, torch.tensor([3, 4, 3, 4]), old_cls).item() == 0.0
    assert C.influence_loss(f, torch.tensor([0, 1, 2, 0]), old_cls).item() > 0.0


def test_synthesize_classifier_extends_old_rows_with_prototypes():
    torch.manual_seed(0)
    old = nn.Linear(2, 2)
    protos = torch.tensor([[1.0, 0.0], [0.0, 1.0], [3.0, 4.0]])
    ext = C.synthesize_classifier(old, protos)
    assert ext.out_features == 3 and not any(p.requires_grad for p in ext.parameters())
    torch.testing.assert_close(ext.weight[:2], old.weight.detach())
    torch.testing.assert_close(ext.weight[2], torch.tensor([0.6, 0.8]) * old.weight.detach().norm(dim=1).mean())
    torch.testing.assert_close(ext.bias[2], old.bias.detach().mean())
    from encoders.backbones import ClassifierHead
    head = ClassifierHead(2, 2)
    assert C.single_linear(head) is head.fc and C.single_linear(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))) is None


def test_projection_maps_wide_to_old_dim():
    m = C.ProjectedBackbone(SmallCNN(embed_dim=32), 32, 8)
    assert m(torch.zeros(2, 1, 28, 28)).shape == (2, 8)


# ---------------------------------------------------------------- AP, matrix, gate

def test_ap_perfect_and_worst():
    g = np.array([0, 0, 1, 1])
    ap, t1 = C.average_precision_from_scores(np.array([[4.0, 3.0, 2.0, 1.0]]), np.array([0]), g)
    assert ap[0] == pytest.approx(1.0) and t1[0] == 1.0
    ap, t1 = C.average_precision_from_scores(np.array([[1.0, 2.0, 3.0, 4.0]]), np.array([0]), g)
    assert ap[0] == pytest.approx((1 / 3 + 2 / 4) / 2) and t1[0] == 0.0


def test_ap_is_tie_aware():
    # all tied: expected AP over the 6 orders of {R, R, N}... here 2 relevant of 4
    g = np.array([0, 1, 0, 1])
    ap, t1 = C.average_precision_from_scores(np.zeros((1, 4)), np.array([0]), g)
    import itertools
    aps = []
    for perm in set(itertools.permutations([1, 0, 1, 0])):
        hits = np.cumsum(perm)
        aps.append(sum(hits[i] / (i + 1) for i in range(4) if perm[i]) / 2)
    assert ap[0] == pytest.approx(np.mean(aps))
    assert t1[0] == pytest.approx(0.5)
    # argsort order would not matter
    ap2, _ = C.average_precision_from_scores(np.zeros((1, 4)), np.array([0]), g[::-1])
    assert ap2[0] == pytest.approx(ap[0])


def _report(oo, nn_, no, t_oo=0.5, t_nn=0.6, t_no=0.55):
    return C.CompatReport({"M(old,old)": oo, "M(new,new)": nn_, "M(new,old)": no},
                          {"M(old,old)": t_oo, "M(new,new)": t_nn, "M(new,old)": t_no}, 0.0, 10, 100)


def test_update_gain_arithmetic():
    r = _report(0.5, 0.9, 0.6)
    assert r.update_gain == pytest.approx(0.25)
    assert r.update_gain_top1 == pytest.approx(0.5)
    assert np.isnan(_report(0.5, 0.5, 0.6).update_gain)


def test_gate_reasons_name_the_failing_cell():
    ok, why = _report(0.52, 0.8, 0.6).gate()
    assert ok and "gate passed" in why
    ok, why = _report(0.52, 0.8, 0.41).gate()
    assert not ok and "M(new,old)=0.4100 <= M(old,old)=0.5200" in why and "M(new,new)" not in why
    ok, why = _report(0.52, 0.5, 0.6).gate()
    assert not ok and "M(new,new)=0.5000 <= M(old,old)=0.5200" in why
    ok, why = _report(0.52, 0.5, 0.5).gate()
    assert not ok and "M(new,old)" in why and "M(new,new)" in why


def test_gate_flip_rate_bound_refuses_a_model_that_breaks_queries():
    r = C.CompatReport({"M(old,old)": 0.5, "M(new,new)": 0.8, "M(new,old)": 0.6},
                       {"M(old,old)": 0.8, "M(new,new)": 0.9, "M(new,old)": 0.7}, 0.21, 10, 100)
    assert r.gate()[0]  # no bound: mAP alone decides
    ok, why = dataclasses.replace(r, max_negative_flip_rate=0.2).gate()
    assert not ok and why == "gate failed: negative flips 0.2100 > 0.2000"
    ok, why = dataclasses.replace(r, max_negative_flip_rate=0.25).gate()
    assert ok and "negative flips 0.2100 <= 0.2500" in why


def test_compat_matrix_independent_space_fails_gate_and_flips():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 8)) * 4
    gl, ql = np.repeat(np.arange(3), 30), np.repeat(np.arange(3), 5)
    old_g = centers[gl] + rng.normal(size=(90, 8))
    old_q = centers[ql] + rng.normal(size=(15, 8))
    rot = np.linalg.qr(rng.normal(size=(8, 8)))[0]  # same structure, unrelated coordinates
    new_g, new_q = old_g @ rot * 2, old_q @ rot * 2
    r = C.compat_matrix({"old": old_q, "new": new_q}, {"old": old_g, "new": new_g}, ql, gl,
                        C.cosine_scores)
    assert r.map["M(old,old)"] == pytest.approx(r.map["M(new,new)"], abs=1e-6)
    assert r.map["M(new,old)"] < r.map["M(old,old)"]
    assert not r.gate()[0] and r.negative_flip_rate > 0
    d = r.as_dict()
    assert d["gate_passed"] is False and set(d["map"]) == {"M(old,old)", "M(new,new)", "M(new,old)"}


def test_code_compat_matrix_on_lsh_codes():
    from encoders.coders import make_coder

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 16)) * 4
    gl, ql = np.repeat(np.arange(3), 40), np.repeat(np.arange(3), 6)
    old_g = (centers[gl] + rng.normal(size=(120, 16))).astype(np.float32)
    old_q = (centers[ql] + rng.normal(size=(18, 16))).astype(np.float32)
    coder = make_coder("lsh", bits=32)
    coder.fit(old_g, gl)
    # a "new" model equal to the old one: every cell equals M(old,old)
    r = C.code_compat_matrix(coder, 32, {"old": old_q, "new": old_q},
                             {"old": coder.encode(old_g), "new": coder.encode(old_g)}, ql, gl, chunk=5)
    assert r.extra["bits"] == 32 and r.as_dict()["bits"] == 32
    assert len(set(round(v, 12) for v in r.map.values())) == 1 and r.map["M(old,old)"] > 0.5
    # same model: flips come only from independently broken top-1 ties, p(1-p) <= 1/4 per query
    assert 0.0 <= r.negative_flip_rate <= 0.25
    with pytest.raises(ValueError, match="bits"):
        C.code_compat_matrix(coder, 8, {"old": old_q, "new": old_q},
                             {"old": coder.encode(old_g), "new": coder.encode(old_g)}, ql, gl)


def test_compat_matrix_rejects_unprojected_new_queries():
    with pytest.raises(ValueError, match="project"):
        C.compat_matrix({"old": np.zeros((2, 4)), "new": np.zeros((2, 6))},
                        {"old": np.zeros((3, 4)), "new": np.zeros((3, 6))},
                        np.zeros(2), np.zeros(3), C.cosine_scores)


def test_train_compatible_rejects_unknown_method():
    with pytest.raises(ValueError, match="method"):
        C.train_compatible(SmallCNN(8), 8, np.zeros((2, 4), np.float32), nn.Linear(4, 2),
                           np.zeros((2, 28, 28), np.uint8), np.array([0, 1]),
                           np.zeros((2, 28, 28), np.uint8), np.array([0, 1]), 2, method="magic")


def test_train_compatible_tiny_run_outputs_old_space():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (64, 8, 8), dtype=np.uint8)
    y = np.arange(64) % 4
    old_f = rng.normal(size=(64, 6)).astype(np.float32)
    old_cls = nn.Linear(6, 2)  # the old model knew 2 of the 4 classes
    before = old_cls.weight.detach().clone()
    cfg = C.CompatConfig(epochs=1, batch_size=32)
    for method in C.METHODS:
        model, head, rep = C.train_compatible(SmallCNN(embed_dim=10), 10, old_f, old_cls, x, y,
                                              x[:16], y[:16], 4, method=method, config=cfg,
                                              val_old_features=old_f[:16])
        assert model(torch.zeros(1, 1, 8, 8)).shape == (1, 6) and head.out_features == 4
        assert len(rep.val_accuracy) == 1
    torch.testing.assert_close(old_cls.weight, before)


def test_gate_decides_on_val_never_on_query_and_bounds_flips_by_default():
    from encoders.compat import DEFAULT_MAX_FLIP_RATE, CompatReport, decide_gate

    m = {"M(old,old)": 0.5, "M(new,new)": 0.8, "M(new,old)": 0.6}
    rep = CompatReport(dict(m), dict(m), negative_flip_rate=0.4, n_queries=10, n_gallery=20)
    assert rep.max_negative_flip_rate == DEFAULT_MAX_FLIP_RATE  # bounded unless switched off
    with pytest.raises(ValueError, match="never on the query split"):
        decide_gate(rep, "query")
    d = decide_gate(rep, "val")
    assert not d.passed and "negative flips 0.4000 >" in d.reason and d.split == "val"
    assert d.as_dict()["negative_flip_rate"] == 0.4 and d.as_dict()["max_negative_flip_rate"] == DEFAULT_MAX_FLIP_RATE
    assert decide_gate(rep, "val", None).passed  # None switches the bound off explicitly


def test_update_tasks_gate_on_val_rows():
    """The gate task decides on the val matrix: measure_compatibility('val') uses val queries and the
    train gallery; the query split is only ever asked for the reported matrix."""
    import inspect

    import flows.update_model as fu
    import tasks.update as tu

    src = inspect.getsource(fu.update_model)
    assert 'measure_compatibility(cfg, dataset, old_model_id, new_model_id, "val")' in src
    assert "decide_update_gate(on_val," in src and "if decision.passed:" in src
    body = inspect.getsource(tu.measure_compatibility.fn)
    assert '_rows(imgs, old, "val")' in body and '_rows(imgs, old, "train")' in body
