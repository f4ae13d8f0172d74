"""``gradnorm`` against an independent autograd computation (float64, a tiny BatchNorm net)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from sam_probe.analyses import gradnorm
from sam_probe.analyses.base import schema_of
from sam_probe.core.objective import Objective


def _data(n: int = 13):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, generator=g, dtype=torch.float64), torch.randint(0, 2, (n,), generator=g)


def test_norms_equal_direct_autograd(tiny_model):
    model = tiny_model.double()
    before = copy.deepcopy(model.state_dict())
    X, y = _data()
    obj = Objective(model, X, y, "ce", dtype=torch.float64, chunk_size=4)  # 4 chunks, the last short
    res = gradnorm.gradient_norms(obj)

    ref = copy.deepcopy(model).eval()  # independent: one plain forward and backward of the mean loss
    loss = F.cross_entropy(ref(X), y)
    grads = dict(zip([n for n, _ in ref.named_parameters()], torch.autograd.grad(loss, list(ref.parameters()))))
    total = torch.sqrt(sum((g ** 2).sum() for g in grads.values()))
    assert res["loss"] == pytest.approx(float(loss.detach()), rel=1e-12)
    assert res["grad_norm"] == pytest.approx(float(total), rel=1e-12)
    assert res["grad_max_abs"] == pytest.approx(max(float(g.abs().max()) for g in grads.values()), rel=1e-12)
    w_norm = torch.sqrt(sum((p.detach() ** 2).sum() for p in ref.parameters()))
    assert res["param_norm"] == pytest.approx(float(w_norm), rel=1e-12)
    assert res["relative"] == pytest.approx(float(total / w_norm), rel=1e-12)
    assert res["n_params"] == sum(g.numel() for g in grads.values()) == 34
    assert [p["name"] for p in res["per_tensor"]] == list(grads)
    for p in res["per_tensor"]:
        assert p["norm"] == pytest.approx(float(grads[p["name"]].norm()), rel=1e-12)
        assert p["n_params"] == grads[p["name"]].numel()
    modules = {m["name"]: m for m in res["per_module"]}
    assert list(modules) == ["fc1", "bn", "fc2"]
    for m, entry in modules.items():
        own = [g for n, g in grads.items() if n.startswith(m + ".")]
        assert entry["norm"] == pytest.approx(float(torch.sqrt(sum((g ** 2).sum() for g in own))), rel=1e-12)
        assert entry["n_params"] == sum(g.numel() for g in own)
    # the squared parts add up to ||g||^2 (tensors and modules alike)
    assert sum(p["norm"] ** 2 for p in res["per_module"]) == pytest.approx(res["grad_norm"] ** 2, rel=1e-12)
    # nothing of the user's model touched: weights, buffers (BatchNorm statistics), .grad
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())


def test_a_model_at_a_minimum_has_zero_gradient():
    """Null control: a linear least-squares model fitted exactly has g = 0 (the estimator is not biased up)."""
    X = torch.randn(20, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    lin = torch.nn.Linear(3, 1, bias=False).double()
    w_true = torch.tensor([[0.5, -1.0, 2.0]], dtype=torch.float64)
    with torch.no_grad():
        lin.weight.copy_(w_true)
    res = gradnorm.gradient_norms(Objective(lin, X, X @ w_true.T, "mse", dtype=torch.float64))
    assert res["grad_norm"] < 1e-14 and res["loss"] < 1e-28
    assert res["per_module"] == [{"name": "(model)", "norm": res["grad_norm"], "n_params": 3}]


def test_schema_is_derived_from_the_result_type():
    assert gradnorm.ANALYSIS.schema == schema_of(gradnorm.Result)
    assert set(gradnorm.ANALYSIS.schema) == set(gradnorm.Result.__annotations__)
    assert gradnorm.configure({"per_layer": None}, None) == {}  # no option changes the numbers: one unit key


def test_schema_of_refuses_an_undescribed_key():
    from typing import TypedDict

    class Bad(TypedDict):
        x: float

    with pytest.raises(TypeError, match="Annotated"):
        schema_of(Bad)
