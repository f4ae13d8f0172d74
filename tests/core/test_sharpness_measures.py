"""Worst-case and average-case sharpness against exact answers on quadratics and a brute-force grid."""
import itertools
import math

import pytest
import torch
from torch import nn

from nets import DiagLinear
from sam_probe.core.dense import dense_hessian
from sam_probe.core.objective import Objective
from sam_probe.core.perturb import sam_sharpness
from sam_probe.core.sharpness_measures import (apgd, apgd_checkpoints, average_case_sharpness, project,
                                               value_and_grad, worst_case_sharpness)


def regression(n=40, seed=0) -> Objective:
    """Linear regression with mse: L is exactly quadratic in w (H = 2/N Xᵀ X on [x, 1])."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g, dtype=torch.float64) * torch.tensor([3, 2, 1, 0.5, 0.3, 0.1]).double()
    y = torch.randn(n, 1, generator=g, dtype=torch.float64)
    return Objective(nn.Linear(6, 1).double(), x, y, "mse", dtype=torch.float64)


def trust_region_max(g: torch.Tensor, H: torch.Tensor, rho: float) -> float:
    """max_{||e|| <= rho} gᵀe + ½ eᵀHe for λ_max(H) > 0 (boundary solution, secular equation by bisection)."""
    lam, U = torch.linalg.eigh(H)
    gh = U.T @ g
    lo, hi = float(lam[-1]), float(lam[-1]) + float(g.norm()) / rho + 1.0
    for _ in range(200):
        mu = 0.5 * (lo + hi)
        if float((gh / (mu - lam)).norm()) > rho:
            lo = mu
        else:
            hi = mu
    e = U @ (gh / (hi - lam))
    return float(g @ e + 0.5 * e @ H @ e)


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("rho", [0.05, 0.5, 2.0])
def test_l2_worst_case_reaches_the_trust_region_maximum(rho, adaptive):
    obj = regression()
    H, g = dense_hessian(obj), obj.grad_flat()
    w = obj.flat_params()
    T = w.abs() + 0.01 if adaptive else torch.ones_like(w)
    exact = trust_region_max(T * g, T[:, None] * H * T[None, :], rho)
    r = worst_case_sharpness(obj, rho, adaptive=adaptive, steps=20)
    assert 0.98 * exact <= r.value <= exact * (1 + 1e-10)
    assert r.value >= r.start_value
    if not adaptive:  # the start is the one-step SAM point
        assert r.start_value == pytest.approx(sam_sharpness(obj, rho), rel=1e-12)
    assert r.perturbation_norm <= rho and r.steps == 20 and 0 <= r.last_improvement <= 20
    assert r.n_grad == 22  # at w, at the SAM point, 20 steps
    d = r.to_dict()
    assert {"worst_case_sharpness", "worst_case_steps", "worst_case_last_improvement"} <= d.keys()


def test_linf_worst_case_on_a_box_never_exceeds_the_best_vertex():
    """A convex quadratic attains its max over the box at a vertex: enumerate all 2^7."""
    obj = regression()
    H, g = dense_hessian(obj), obj.grad_flat()
    rho = 0.3
    best = max(float(g @ e + 0.5 * e @ H @ e) for e in
               (rho * torch.tensor(s, dtype=torch.float64) for s in itertools.product((-1, 1), repeat=7)))
    r = worst_case_sharpness(obj, rho, variant="linf", steps=20)
    assert 0.98 * best <= r.value <= best * (1 + 1e-10)
    assert r.perturbation_norm <= rho


def test_indefinite_quadratic_and_every_iterate_in_the_ball():
    """h(d) = gᵀd + ½ dᵀAd with A indefinite: the exact trust-region max; no evaluated point outside."""
    gen = torch.Generator().manual_seed(3)
    Q, _ = torch.linalg.qr(torch.randn(12, 12, generator=gen, dtype=torch.float64))
    A = (Q * torch.linspace(-5, 3, 12, dtype=torch.float64)) @ Q.T
    g = torch.randn(12, generator=gen, dtype=torch.float64)
    rho = 0.7
    seen = []

    def fun(d):
        seen.append(float(d.norm()))
        return float(g @ d + 0.5 * d @ A @ d), g + A @ d

    r = apgd(fun, g, rho, "l2", 30)
    exact = trust_region_max(g, A, rho)
    assert 0.98 * exact <= r.value <= exact * (1 + 1e-12)
    assert max(seen) <= rho and len(seen) == 31


def test_indefinite_network_against_a_grid():
    """Depth-2 diagonal linear net (P = 2, indefinite Hessian): ascent vs a fine polar grid of the disc."""
    torch.manual_seed(0)
    m = DiagLinear(1).double()
    with torch.no_grad():
        m.u.fill_(0.3)
        m.v.fill_(-0.2)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(30, 1, generator=g, dtype=torch.float64)
    obj = Objective(m, x, 0.5 * x, "mse", dtype=torch.float64)
    assert float(torch.linalg.eigvalsh(dense_hessian(obj)).min()) < 0 < float(torch.linalg.eigvalsh(dense_hessian(obj)).max())
    rho = 0.5
    w, L0 = obj.flat_params(), obj.loss()
    grid = max(obj.loss(w + torch.tensor([r * math.cos(a), r * math.sin(a)], dtype=torch.float64)) - L0
               for r in torch.linspace(0, rho, 41).tolist() for a in torch.linspace(0, 2 * math.pi, 361).tolist())
    res = worst_case_sharpness(obj, rho, steps=30)
    assert 0.98 * grid <= res.value <= grid * 1.001  # the grid is itself a lower bound of the max
    assert res.perturbation_norm <= rho


def test_m_sharpness_is_the_weighted_mean_of_sub_batch_maxima():
    obj = regression(n=30)
    r = worst_case_sharpness(obj, 0.5, m=12, steps=10)
    parts = [(worst_case_sharpness(obj.subset(torch.arange(s, min(s + 12, 30))), 0.5, steps=10).value,
              min(12, 30 - s) / 30) for s in range(0, 30, 12)]
    assert r.value == pytest.approx(sum(v * wgt for v, wgt in parts), rel=1e-12)
    assert r.m == 12


def test_average_case_matches_half_rho2_trace_over_p():
    """Quadratic L: E[L(w+d) - L(w)] = ½ ρ²/P tr(H) exactly (the linear term has mean 0)."""
    obj = regression()
    H = dense_hessian(obj)
    rho = 0.5
    exact = 0.5 * rho ** 2 / obj.n_params * float(torch.trace(H))
    r = average_case_sharpness(obj, rho, samples=400, seed=0)
    assert abs(r.value - exact) <= 4 * r.se
    assert r.to_dict()["average_case_se"] == r.se > 0
    assert average_case_sharpness(obj, rho, samples=5, seed=2).value == average_case_sharpness(obj, rho, samples=5, seed=2).value
    with pytest.raises(ValueError, match="2 samples"):
        average_case_sharpness(obj, rho, samples=1)


def test_helpers():
    obj = regression()
    L, g = value_and_grad(obj, obj.flat_params())
    assert L == pytest.approx(obj.loss(), rel=1e-14) and torch.allclose(g, obj.grad_flat(), atol=1e-14)
    assert apgd_checkpoints(20) == [5, 9, 12, 14, 16, 18, 19, 20]  # p = 0.22, 0.41, 0.57, 0.70, 0.80, ...
    d = torch.full((5,), 10.0, dtype=torch.float64)
    assert float(project(d, 1.0, "l2").norm()) <= 1.0 and float(project(d, 1.0, "linf").abs().max()) == 1.0
    with pytest.raises(ValueError, match="variant"):
        worst_case_sharpness(obj, 0.1, variant="asam")
