"""Warm-started eigen solves across nearby checkpoints: same certified answers, fewer products."""
import pytest
import torch
from torch import nn

from sam_probe.core.lanczos import top_eigen, warm_start_block
from sam_probe.core.objective import Objective
from sam_probe.core.operators import curvature_operator


def run(n=4, scale=0.01):
    """A 484-parameter tanh MLP at ``n`` nearby weights (like consecutive checkpoints)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(100, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (100,), generator=g)
    objs = []
    for t in range(n):
        p = {k: v.detach() + scale * t * torch.randn(v.shape, generator=g, dtype=v.dtype)
             for k, v in m.named_parameters()}
        objs.append(Objective(m, x, y, "ce", params=p, dtype=torch.float64))
    return objs


@pytest.mark.parametrize("name", ["hessian", "fisher"])
def test_warm_start_same_eigenvalues_fewer_products(name):
    tol = 1e-3
    cold_total = warm_total = 0
    prev = None
    for i, obj in enumerate(run()):
        ref = top_eigen(curvature_operator(obj, name), 5, tol=1e-10)
        cold = top_eigen(curvature_operator(obj, name), 5, tol=tol)
        warm = top_eigen(curvature_operator(obj, name), 5, tol=tol, warm=prev)
        assert cold.all_converged and warm.all_converged
        assert warm.warm_start == (prev is not None) and not cold.warm_start
        for res in (cold, warm):  # each within its certified tolerance of the true eigenvalues
            for a, b in zip(res.eigenvalues, ref.eigenvalues):
                assert abs(a - b) <= tol * abs(b)
        if i:
            cold_total += cold.n_hvp
            warm_total += warm.n_hvp
        prev = warm.eigenvectors
    assert warm_total < cold_total  # deterministic counts (seeded), not times


def test_warm_start_block():
    g = torch.Generator().manual_seed(0)
    W, _ = torch.linalg.qr(torch.randn(50, 3, generator=g, dtype=torch.float64))
    Z = warm_start_block(W, 50, 1, torch.Generator().manual_seed(1), torch.float64, "cpu")
    assert Z.shape == (50, 1)
    inside = W @ (W.T @ Z)
    # half of the start lies in span(W) (unit norm), half is the cold Gaussian direction
    assert float(inside.norm()) > 0.95 and float((Z - inside).norm()) > 0.5
    Z2 = warm_start_block(W, 50, 4, torch.Generator().manual_seed(1), torch.float64, "cpu")
    assert Z2.shape == (50, 4) and torch.linalg.matrix_rank(Z2) == 4
    # unconverged (NaN) columns are ignored; none left means the cold start
    Wn = torch.cat([W[:, :1], torch.full((50, 1), float("nan"), dtype=torch.float64)], 1)
    assert torch.isfinite(warm_start_block(Wn, 50, 1, torch.Generator().manual_seed(1), torch.float64, "cpu")).all()
    cold = warm_start_block(W[:, :0], 50, 2, torch.Generator().manual_seed(1), torch.float64, "cpu")
    assert torch.allclose(cold.norm(dim=0), torch.ones(2, dtype=torch.float64))


def test_warm_start_with_a_block_and_bad_vectors():
    objs = run(2)
    prev = top_eigen(objs[0], 3, tol=1e-6).eigenvectors
    junk = torch.cat([prev, torch.full((prev.shape[0], 1), float("nan"), dtype=torch.float64)], 1)
    cold = top_eigen(objs[1], 3, tol=1e-6, block_size=2)
    warm = top_eigen(objs[1], 3, tol=1e-6, block_size=2, warm=junk)
    assert warm.all_converged
    assert torch.allclose(torch.tensor(warm.eigenvalues), torch.tensor(cold.eigenvalues), rtol=2e-6)


def test_vectors_of_another_parameter_space_give_the_cold_solve():
    obj = run(1)[0]
    cold = top_eigen(obj, 3, tol=1e-6)
    other = top_eigen(obj, 3, tol=1e-6, warm=torch.randn(obj.n_params + 5, 3, dtype=torch.float64))
    assert cold.warm_start is False and other.warm_start is False
    assert other.eigenvalues == cold.eigenvalues and other.n_hvp == cold.n_hvp
