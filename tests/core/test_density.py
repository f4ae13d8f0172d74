"""Stochastic Lanczos quadrature: normalisation, mean = trace / P, exact quadrature."""
import pytest
import torch
from torch import nn

from sam_probe.core.dense import dense_hessian
from sam_probe.core.density import (DensityResult, gauss_quadrature, hessian_density, lanczos_tridiagonal,
                                    slq_density)
from sam_probe.core.objective import Objective
from sam_probe.core.trace import probes, rademacher


def bn_cnn_objective() -> Objective:
    torch.manual_seed(1)
    m = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Tanh(), nn.Flatten(), nn.Linear(18, 3))
    m.train()
    m(torch.randn(16, 1, 5, 5))
    return Objective(m, torch.randn(12, 1, 5, 5), torch.randint(0, 3, (12,)), "ce", dtype=torch.float64)


def test_hessian_density_integrates_to_one_and_mean_matches_trace():
    obj = bn_cnn_objective()
    H = dense_hessian(obj)
    P = obj.n_params
    obj.n_hvp = 0
    res = hessian_density(obj, steps=30, n_probes=8, seed=0)
    assert isinstance(res, DensityResult)
    assert res.n_hvp == obj.n_hvp <= 30 * 8
    assert abs(float(torch.trapezoid(res.density, res.grid)) - 1) < 1e-10
    assert (res.density >= 0).all()
    for w in res.weights:
        assert abs(float(w.sum()) - 1) < 1e-10
    # per probe, Σ τ θ = vᵀHv exactly; averaged it estimates tr(H) / P
    Z = probes(P, 8, torch.Generator().manual_seed(0), torch.float64, "cpu")
    quad = torch.tensor([float((w * t).sum()) for w, t in zip(res.weights, res.nodes)], dtype=torch.float64)
    assert torch.allclose(quad, (Z * (H @ Z)).sum(0) / P, rtol=1e-8, atol=1e-12)
    vals = (Z * (H @ Z)).sum(0) / P
    se = float(vals.std() / 8 ** 0.5)
    assert abs(res.mean - float(torch.trace(H)) / P) <= 3 * se
    # the extreme nodes approximate the extreme eigenvalues
    ev = torch.linalg.eigvalsh(H)
    top = max(float(t.max()) for t in res.nodes)
    assert abs(top - float(ev[-1])) < 1e-6 * abs(float(ev[-1]))
    assert res.grid[0] < float(ev[0]) and res.grid[-1] > float(ev[-1])


def test_quadrature_exact_for_small_spectrum():
    d = torch.tensor([-1.0, 0.5, 2.0, 3.0], dtype=torch.float64)
    n = 40
    diag = d.repeat_interleave(10)
    res = slq_density(lambda V: diag[:, None] * V, n, steps=20, n_probes=3, seed=1)
    for t, w in zip(res.nodes, res.weights):
        assert len(t) == 4  # breakdown after 4 steps: invariant subspace
        assert torch.allclose(t, d, atol=1e-10)
    assert res.n_hvp == 3 * 4
    # Rademacher probes weight each distinct eigenvalue by its multiplicity / n exactly
    assert torch.allclose(torch.stack(res.weights).mean(0), torch.full((4,), 0.25, dtype=torch.float64), atol=1e-12)
    # Gaussian bumps at the 4 eigenvalues, given grid and sigma honoured
    grid = torch.linspace(-2, 4, 601, dtype=torch.float64)
    res2 = slq_density(lambda V: diag[:, None] * V, n, steps=20, n_probes=3, seed=1, grid=grid, sigma=0.05)
    assert torch.equal(res2.grid, grid) and res2.sigma == 0.05
    peaks = grid[1:-1][(res2.density[1:-1] > res2.density[:-2]) & (res2.density[1:-1] > res2.density[2:])]
    assert torch.allclose(peaks, d, atol=0.011)


def test_tridiagonal_matches_eigenvalues_of_random_matrix():
    n = 60
    A = torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    A = A + A.T
    V0 = torch.randn(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for alpha, beta in lanczos_tridiagonal(lambda V: A @ V, V0, n):
        theta, tau = gauss_quadrature(alpha, beta)
        assert torch.allclose(theta, torch.linalg.eigvalsh(A), atol=1e-8)
        assert abs(float(tau.sum()) - 1) < 1e-12


def test_seeded_and_to_dict():
    d = torch.linspace(0, 1, 100, dtype=torch.float64)
    a = slq_density(lambda V: d[:, None] * V, 100, steps=10, n_probes=2, seed=4)
    b = slq_density(lambda V: d[:, None] * V, 100, steps=10, n_probes=2, seed=4)
    assert torch.equal(a.density, b.density)
    out = a.to_dict()
    assert set(out) >= {"grid", "density", "nodes", "weights", "n_hvp", "sigma", "mean"}


def test_lean_slq_without_reorthogonalisation_keeps_the_quadrature():
    """The lean default (three-term recurrence, 3 vectors per probe) against full
    reorthogonalisation on the same probes: the first moments of the quadrature (Σ τ θ^p, which
    the density is built from) and the smoothed density agree, although the lean nodes repeat
    converged Ritz values."""
    g = torch.Generator().manual_seed(0)
    n = 400
    d = torch.cat([torch.tensor([30.0, 20.0, 12.0], dtype=torch.float64), torch.randn(n - 3, generator=g,
                                                                                    dtype=torch.float64)])
    grid = torch.linspace(-6, 32, 800, dtype=torch.float64)
    kw = dict(steps=60, n_probes=4, seed=2, grid=grid, sigma=0.5)
    full = slq_density(lambda V: d[:, None] * V, n, reorth=True, **kw)
    lean = slq_density(lambda V: d[:, None] * V, n, **kw)  # default: no reorthogonalisation, 2 probes at a time
    assert full.n_hvp == lean.n_hvp == 240
    for p in range(1, 9):  # Gauss quadrature of degree 2m-1 in exact arithmetic: the low moments agree
        mf = torch.stack([(w * t ** p).sum() for w, t in zip(full.weights, full.nodes)])
        ml = torch.stack([(w * t ** p).sum() for w, t in zip(lean.weights, lean.nodes)])
        assert torch.allclose(ml, mf, rtol=1e-8), p
    assert float(torch.trapezoid((lean.density - full.density).abs(), grid)) < 1e-3
    assert lean.mean == pytest.approx(full.mean, rel=1e-12)
