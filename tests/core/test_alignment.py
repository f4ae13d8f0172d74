"""Alignment: chi_k against explicit dense projections, exact second-order dL on a quadratic, eta*_emp."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from sam_probe.core.alignment import alignment, chi, eta_star_empirical, loss_changes, minibatch_indices
from sam_probe.core.objective import Objective



@pytest.fixture(autouse=True)
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def tanh_mlp():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    return m, torch.randn(24, 4), torch.randint(0, 3, (24,))


def flat_loss(model, X, y, loss="ce"):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]

    def L(w):
        params, o = {}, 0
        for n, s in zip(names, shapes):
            k = int(np.prod(s))
            params[n] = w[o:o + k].reshape(s)
            o += k
        out = functional_call(model, params, (X,))
        return F.cross_entropy(out, y) if loss == "ce" else (out.reshape(-1) - y).pow(2).mean()

    return L


def dense(L, w, k):
    H = torch.autograd.functional.hessian(L, w)
    H = 0.5 * (H + H.T)
    evals, evecs = torch.linalg.eigh(H)
    return H, evals.flip(0)[:k], evecs.flip(1)[:, :k]


def grad_at(L, w):
    w = w.detach().clone().requires_grad_(True)
    return torch.autograd.grad(L(w), w)[0]


def test_chi_matches_explicit_projection():
    model, X, y = tanh_mlp()
    obj = Objective(model, X, y, "ce", dtype=torch.float64)
    w = obj.flat_params()
    L = flat_loss(model, X, y)
    _, evals, V = dense(L, w, 3)
    Pk = V @ V.T
    w_prev = w + 0.01 * torch.randn(w.shape, generator=torch.Generator().manual_seed(5))
    res = alignment(obj, V, evals.tolist(), eta=0.05, batch_size=8, seed=3, rho=0.05, variant="l2",
                    prev_params=w_prev, eta_grid=[])

    g = grad_at(L, w)
    idx = minibatch_indices(len(X), 8, 3)
    gb = grad_at(flat_loss(model, X[idx], y[idx]), w)
    gs = grad_at(L, w + 0.05 * g / g.norm())
    upd = w - w_prev
    for name, v in {"full": g, "minibatch": gb, "sam": gs, "update": upd}.items():
        expect = float((Pk @ v).norm() / v.norm())
        assert res.chi[name] == pytest.approx(expect, rel=1e-10, abs=1e-12), name
        assert res.chi_sq[name] == pytest.approx(expect ** 2, rel=1e-10, abs=1e-12)
    assert 0 < res.chi["full"] < 1
    d = res.to_dict()
    assert {"k", "eigenvalues", "chi", "chi_sq", "dL", "dL_pred", "eta", "eta_star", "eta_lambda_max"} <= set(d)
    assert d["k"] == 3 and d["eta_lambda_max"] == pytest.approx(0.05 * float(evals[0]))
    assert d["eta_star"] is None and d["eta_lambda_usam"] is None
    # the second-order prediction is accurate for a small step on the MLP
    small = loss_changes(obj, g, V, 1e-3)
    for name in ("dom", "bulk", "full"):
        assert small[0][name] == pytest.approx(small[1][name], rel=1e-3)


def test_minibatch_is_seeded():
    assert torch.equal(minibatch_indices(100, 10, 7), minibatch_indices(100, 10, 7))
    assert not torch.equal(minibatch_indices(100, 10, 7), minibatch_indices(100, 10, 8))
    assert math.isnan(chi(torch.eye(3)[:, :1], torch.zeros(3)))


def test_update_skipped_without_previous_and_bad_basis_refused():
    model, X, y = tanh_mlp()
    obj = Objective(model, X, y, "ce", dtype=torch.float64)
    P = obj.n_params
    V = torch.linalg.qr(torch.randn(P, 2, generator=torch.Generator().manual_seed(0)))[0]
    res = alignment(obj, V, [2.0, 1.0], vectors=("full", "update"), eta_grid=[])
    assert set(res.chi) == {"full"}
    with pytest.raises(ValueError, match="orthonormal"):
        alignment(obj, 2 * V, [2.0, 1.0], eta_grid=[])


def test_dL_predictions_exact_on_quadratic():
    torch.manual_seed(1)
    model = nn.Linear(5, 1).double()
    X, y = torch.randn(40, 5), torch.randn(40)
    obj = Objective(model, X, y, "mse", dtype=torch.float64)
    w = obj.flat_params()
    _, evals, V = dense(flat_loss(model, X, y, "mse"), w, 2)
    res = alignment(obj, V, evals.tolist(), eta=0.7, variant="usam", rho=0.1, vectors=("full",), eta_grid=[])
    for name in ("dom", "bulk", "full"):
        assert res.dL[name] == pytest.approx(res.dL_pred[name], rel=1e-9, abs=1e-12), name
    lam = float(evals[0])
    assert res.eta_lambda_usam == pytest.approx(0.7 * lam * (1 + 0.1 * lam))


def test_eta_star_on_diagonal_quadratic():
    """L = 1/N ||Xw - y||² with H = diag(4, 1): after w -> w - ηg the gradient is (I - ηH) g, so
    chi_1 falls while |1 - 4η| < |1 - η| and rises after: the sign flips at η = 2/(4+1) = 0.4."""
    N, lam = 10, torch.tensor([4.0, 1.0])
    Q = torch.linalg.qr(torch.randn(N, 2, generator=torch.Generator().manual_seed(0)))[0]
    X = Q * torch.sqrt(N / 2 * lam)
    y = torch.randn(N, generator=torch.Generator().manual_seed(1))
    model = nn.Linear(2, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.7, -1.3]]))
    obj = Objective(model, X, y, "mse", dtype=torch.float64)
    V = torch.eye(2)[:, :1]
    grid = np.linspace(0.03, 0.99, 33)  # 0.39, 0.42 around 0.4
    e_star, deltas = eta_star_empirical(obj, obj.grad_flat(), V, grid)
    assert e_star == pytest.approx(0.42)
    assert all(d < 0 for d, e in zip(deltas, grid) if e < 0.4)
    assert all(d > 0 for d, e in zip(deltas, grid) if e > 0.4)
    res = alignment(obj, V, [4.0], eta=0.1, vectors=("full",), eta_grid=grid)
    assert res.eta_star == pytest.approx(0.42) and res.eta_lambda_max == pytest.approx(0.4)
    assert eta_star_empirical(obj, obj.grad_flat(), V, [0.1, 0.2])[0] is None


def test_eta_lambda_max_names_its_operator_and_only_the_hessian_meets_the_edge_of_stability():
    from sam_probe.core.lanczos import top_eigen
    from sam_probe.core.operators import curvature_operator

    model, X, y = tanh_mlp()
    obj = Objective(model, X, y, "ce", dtype=torch.float64)
    for name, label, eos in (("hessian", "Hessian", True), ("ef", "empirical Fisher", False), ("ggn", "GGN", False)):
        eig = top_eigen(curvature_operator(obj, name), 2, tol=1e-8)
        r = alignment(obj, eig.eigenvectors, eig.eigenvalues, eta=0.1, vectors=("full",), eta_grid=[],
                      curvature=name).to_dict()
        assert (r["lambda_of"], r["edge_of_stability"]) == (label, eos)
        assert r["eta_lambda_max"] == pytest.approx(0.1 * max(eig.eigenvalues))
