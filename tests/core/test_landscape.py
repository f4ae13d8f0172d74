"""2-D loss landscapes against closed forms: a linear least-squares model, where
``L(w + a d1 + b d2) = ||r + a X d1 + b X d2||^2 / N`` exactly, and its Hessian ``2 X'X / N``
whose top-2 eigenvectors are known; filter normalisation checked filter by filter."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sam_probe.analyses import landscape as analysis
from sam_probe.core import landscape as core
from sam_probe.core.objective import Objective

N, D = 30, 6


def _linear():
    g = torch.Generator().manual_seed(3)
    X = torch.randn(N, D, generator=g, dtype=torch.float64) * torch.linspace(0.5, 3.0, D, dtype=torch.float64)
    y = torch.randn(N, 1, generator=g, dtype=torch.float64)
    lin = nn.Linear(D, 1, bias=False).double()
    with torch.no_grad():
        lin.weight.copy_(torch.randn(1, D, generator=g, dtype=torch.float64))
    return lin, X, y


def _cfg(kind: str, grid: int = 5, rng=(-1.0, 1.0), seed: int = 0, **kw):
    opts = {"directions": kind, "grid": grid, "range": f"{rng[0]},{rng[1]}", "bias_bn": "zero", "tol": 1e-8,
            "max_hvp": None, **kw}
    return analysis.configure(opts, type("S", (), {"seed": seed})())


@pytest.mark.parametrize("kind", ["random", "filter-normalized"])
def test_gaussian_landscape_equals_the_closed_form(kind):
    lin, X, y = _linear()
    before = copy.deepcopy(lin.state_dict())
    obj = Objective(lin, X, y, "mse", dtype=torch.float64, chunk_size=7)
    res = analysis.landscape(obj, _cfg(kind, grid=5, rng=(-0.6, 1.0)))
    d1, d2 = core.random_directions(obj.params, kind, 0)
    w = lin.weight.detach()[0]
    r, u1, u2 = X @ w - y[:, 0], X @ d1["weight"][0], X @ d2["weight"][0]
    assert res["alphas"] == pytest.approx([-0.6, -0.2, 0.2, 0.6, 1.0], abs=1e-15)
    for i, a in enumerate(res["alphas"]):
        for j, b in enumerate(res["alphas"]):
            exact = float(((r + a * u1 + b * u2) ** 2).mean())
            assert res["loss"][i][j] == pytest.approx(exact, rel=1e-12)
    assert res["loss_center"] == pytest.approx(float((r ** 2).mean()), rel=1e-12)
    assert res["accuracy"] is None  # regression: no accuracy
    assert res["loss_min"] == min(min(row) for row in res["loss"])
    i, j = divmod(min(range(25), key=lambda k: res["loss"][k // 5][k % 5]), 5)
    assert res["min_at"] == [res["alphas"][i], res["alphas"][j]]
    # one filter (one output row): ||d|| = ||w|| for both kinds here
    assert res["direction_norms"] == pytest.approx([float(w.norm())] * 2, rel=1e-12)
    assert res["param_norm"] == pytest.approx(float(w.norm()), rel=1e-12)
    assert res["eigenvalues"] is None
    assert all(torch.equal(before[k], v) for k, v in lin.state_dict().items())  # weights only read
    assert lin.weight.grad is None


def test_top_eigen_directions_are_the_hessians_top_two_eigenvectors():
    lin, X, y = _linear()
    obj = Objective(lin, X, y, "mse", dtype=torch.float64)
    res = analysis.landscape(obj, _cfg("top-eigen", grid=3, rng=(-0.5, 0.5)))
    H = 2 * X.T @ X / N
    evals, evecs = torch.linalg.eigh(H)
    lam, V = evals.flip(0)[:2], evecs.flip(1)[:, :2]
    assert res["eigenvalues"] == pytest.approx(lam.tolist(), rel=1e-8)
    assert res["n_hvp"] > 0 and max(res["residuals"]) < 1e-6
    assert res["direction_norms"] == pytest.approx([1.0, 1.0], rel=1e-9)
    assert abs(res["cosine"]) < 1e-8
    w = lin.weight.detach()[0]
    g = 2 * X.T @ (X @ w - y[:, 0]) / N
    L0 = float(((X @ w - y[:, 0]) ** 2).mean())
    # the eigenvectors' signs are arbitrary: the first-order terms' sign follows the solver's
    vs = [V[:, k] * torch.sign(V[:, k] @ v) for k, v in enumerate(_solver_vectors(obj))]
    for i, a in enumerate(res["alphas"]):
        for j, b in enumerate(res["alphas"]):
            exact = L0 + a * float(g @ vs[0]) + b * float(g @ vs[1]) + 0.5 * (a * a * lam[0] + b * b * lam[1])
            assert res["loss"][i][j] == pytest.approx(float(exact), rel=1e-8)


def _solver_vectors(obj):
    out: dict = {}
    d1, d2 = analysis.eigen_directions(obj, _cfg("top-eigen"), out)
    return [d1["weight"][0], d2["weight"][0]]


def test_filter_normalisation_is_per_filter_and_zeroes_one_dimensional_tensors():
    g = torch.Generator().manual_seed(0)
    w = {"conv.weight": torch.randn(4, 3, 3, 3, generator=g), "conv.bias": torch.randn(4, generator=g),
         "fc.weight": torch.randn(5, 36, generator=g), "bn.weight": torch.rand(5, generator=g) + 0.5,
         "scale": torch.tensor(2.0)}
    w["fc.weight"][2] = 0.0  # a dead filter: its direction is zero
    d = core.gaussian(w, torch.Generator().manual_seed(1))
    out = core.filter_normalize(d, w)
    for name in ("conv.weight", "fc.weight"):
        wn = w[name].reshape(w[name].shape[0], -1).norm(dim=1)
        on = out[name].reshape(out[name].shape[0], -1).norm(dim=1)
        assert torch.allclose(on, wn, rtol=1e-5, atol=0), name
        # the direction within each filter is d's own (only rescaled)
        cos = torch.nn.functional.cosine_similarity(out[name].reshape(len(wn), -1), d[name].reshape(len(wn), -1))
        assert torch.allclose(cos[wn > 0], torch.ones(int((wn > 0).sum())), atol=1e-5)
    assert out["fc.weight"][2].abs().max() == 0
    for name in ("conv.bias", "bn.weight", "scale"):
        assert out[name].abs().max() == 0 and out[name].shape == w[name].shape
    per = core.filter_normalize(d, w, "per-tensor")  # one filter per 1-D tensor
    for name in ("conv.bias", "bn.weight", "scale"):
        assert float(per[name].norm()) == pytest.approx(float(w[name].norm()), rel=1e-5)
    with pytest.raises(ValueError):
        core.filter_normalize(d, w, "keep")


def test_directions_are_reproducible_by_seed(tiny_model):
    obj = Objective(tiny_model.double(), torch.randn(12, 3, dtype=torch.float64, generator=torch.Generator()
                                                     .manual_seed(0)), torch.arange(12) % 2, "ce",
                    dtype=torch.float64)
    a = analysis.landscape(obj, _cfg("filter-normalized", grid=3, seed=7))
    b = analysis.landscape(obj, _cfg("filter-normalized", grid=3, seed=7))
    c = analysis.landscape(obj, _cfg("filter-normalized", grid=3, seed=8))
    assert a == b and a["loss"] != c["loss"]
    assert a["accuracy"] is not None and len(a["accuracy"]) == 3
    d1, _ = core.random_directions(obj.params, "filter-normalized", 7)
    assert d1["fc1.bias"].abs().max() == 0 and d1["bn.weight"].abs().max() == 0  # Li et al.: zeroed
    r1, r2 = core.random_directions(obj.params, "random", 7)
    assert core.global_norm(r1) == pytest.approx(core.global_norm(obj.params), rel=1e-12)
    assert abs(core.cosine(r1, r2)) < 0.9


def test_configure_refuses_bad_options():
    from sam_probe.errors import SpecError

    with pytest.raises(SpecError, match="--grid"):
        _cfg("random", grid=2)
    with pytest.raises(SpecError, match="--range"):
        _cfg("random", rng=(1, -1))
    with pytest.raises(SpecError, match="--directions"):
        _cfg("hessian")
    cfg = _cfg("random")
    assert cfg["bias_bn"] is None and cfg["tol"] is None  # options that cannot change the numbers: not keyed
    assert _cfg("top-eigen")["tol"] == 1e-8 and _cfg("filter-normalized")["bias_bn"] == "zero"
