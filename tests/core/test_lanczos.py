"""Lanczos eigenpairs against dense float64 Hessians and analytic diagonal operators."""
import pytest
import torch
from torch import nn

from sam_probe.core.dense import dense_eigh, dense_hessian
from sam_probe.core.lanczos import EigenResult, krylov_basis, lanczos, top_eigen
from nets import DiagLinear
from sam_probe.core.objective import Objective


def objective(name: str) -> Objective:
    if name == "mlp":
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
        return Objective(m, torch.randn(20, 4), torch.randint(0, 3, (20,)), "ce", dtype=torch.float64)
    if name.startswith("cnn"):
        torch.manual_seed(1)
        m = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Tanh(), nn.Flatten(), nn.Linear(18, 3))
        m.train()
        m(torch.randn(16, 1, 5, 5))
        m[1].weight.data.uniform_(0.5, 1.5)
        m[1].bias.data.normal_()
        return Objective(m, torch.randn(12, 1, 5, 5), torch.randint(0, 3, (12,)), "ce",
                         bn_mode=name.split("-")[1], dtype=torch.float64)
    torch.manual_seed(2)
    return Objective(DiagLinear(5), torch.randn(30, 5), torch.randn(30, 1), "mse", dtype=torch.float64)


MODELS = ["mlp", "cnn-eval", "cnn-train", "diag"]


def rel_err(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float(((a - b).abs() / b.abs()).max())


@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
@pytest.mark.parametrize("name", MODELS)
def test_matches_dense_hessian(name, which):
    obj = objective(name)
    H = dense_hessian(obj)
    k = 3
    ref, ref_vecs = dense_eigh(H, which, k)
    obj.n_hvp = 0
    res = top_eigen(obj, k, which=which, tol=1e-9, seed=1)
    assert isinstance(res, EigenResult) and all(res.converged) and not res.warnings
    assert rel_err(res.eigenvalues, ref) < 1e-6
    assert res.n_hvp == obj.n_hvp
    # residuals are honest: recompute ||Hv - λv|| / |λ| with the dense Hessian
    V, lam = res.eigenvectors, torch.tensor(res.eigenvalues, dtype=torch.float64)
    true = (H @ V - V * lam).norm(dim=0) / lam.abs()
    assert (true - torch.tensor(res.residuals, dtype=torch.float64)).abs().max() < 1e-11
    assert (true <= 1e-9 + 1e-11).all()
    assert torch.allclose(V.T @ V, torch.eye(k, dtype=torch.float64), atol=1e-10)
    assert (ref_vecs.T @ V).abs().diagonal().min() > 1 - 1e-6  # same eigenvectors up to sign


def test_negative_eigenvalues_found():
    obj = objective("diag")
    ref, _ = dense_eigh(dense_hessian(obj), "SA", 2)
    assert ref[0] < 0
    res = top_eigen(obj, 2, which="SA", tol=1e-10)
    assert res.eigenvalues[0] < 0 and rel_err(res.eigenvalues, ref) < 1e-6


def diag_operator(d: torch.Tensor):
    return lambda V: d[:, None].to(V) * V


@pytest.mark.parametrize("block_size", [1, 2, 4])
@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
def test_diagonal_analytic(which, block_size):
    n = 400
    g = torch.Generator().manual_seed(3)
    spikes = torch.tensor([50.0, 40.0, 30.0, 25.0, -45.0, -35.0])
    d = torch.cat([spikes, torch.rand(n - 6, generator=g) * 2 - 1]).double()
    expect = {"LA": [50.0, 40.0, 30.0, 25.0], "SA": [-45.0, -35.0], "LM": [50.0, -45.0, 40.0, -35.0, 30.0]}[which]
    res = lanczos(diag_operator(d), n, len(expect), which=which, tol=1e-10, block_size=block_size, max_basis=16)
    assert all(res.converged), res.warnings
    assert rel_err(res.eigenvalues, expect) < 1e-12
    # eigenvectors are the coordinate axes
    idx = [int((d - e).abs().argmin()) for e in expect]
    assert torch.allclose(res.eigenvectors[idx, range(len(idx))].abs(), torch.ones(len(idx), dtype=torch.float64))


def test_thick_restart_and_seed_reproducible():
    n = 600
    d = torch.linspace(-1, 1, n, dtype=torch.float64)
    d[:3] = torch.tensor([1.3, 1.2, 1.1], dtype=torch.float64)
    a = lanczos(diag_operator(d), n, 3, tol=1e-8, max_basis=10, seed=5, max_hvp=2000)
    b = lanczos(diag_operator(d), n, 3, tol=1e-8, max_basis=10, seed=5, max_hvp=2000)
    assert a.n_restarts > 0 and all(a.converged)
    assert rel_err(a.eigenvalues, [1.3, 1.2, 1.1]) < 1e-10
    assert a.eigenvalues == b.eigenvalues and a.n_hvp == b.n_hvp


def test_max_hvp_too_small_flags_and_warns():
    n = 300
    d = torch.linspace(0.5, 1.0, n, dtype=torch.float64)
    res = lanczos(diag_operator(d), n, 4, tol=1e-10, max_hvp=8)
    assert res.n_hvp <= 8
    assert not all(res.converged) and res.warnings and "max_hvp=8" in res.warnings[0]
    for r, c in zip(res.residuals, res.converged):
        assert c == (r <= 1e-10)
    out = res.to_dict()
    assert out["converged"] == res.converged and "eigenvectors" not in out


def test_float32_operator():
    n = 300
    d = torch.cat([torch.tensor([9.0, 7.0, 5.0]), torch.rand(n - 3, generator=torch.Generator().manual_seed(0))])
    res = lanczos(diag_operator(d), n, 3, tol=1e-4, dtype=torch.float32)
    assert res.eigenvectors.dtype == torch.float32 and all(res.converged)
    assert rel_err(res.eigenvalues, [9.0, 7.0, 5.0]) < 1e-5


def test_whole_space_small_operator():
    d = torch.tensor([3.0, -2.0, 1.0, 0.5], dtype=torch.float64)
    res = lanczos(diag_operator(d), 4, 4, which="LM", tol=1e-12)
    assert rel_err(res.eigenvalues, [3.0, -2.0, 1.0, 0.5]) < 1e-12 and all(res.converged)


def test_krylov_basis():
    n = 50
    A = torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    A = A + A.T
    Q, AQ = krylov_basis(lambda V: A @ V, n, 12, block_size=3)
    assert Q.shape == (n, 12) and torch.allclose(Q.T @ Q, torch.eye(12, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(AQ, A @ Q, atol=1e-12)
