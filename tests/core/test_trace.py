"""Hutchinson and Hutch++ against exact traces."""
import pytest
import torch
from torch import nn

from sam_probe.core.dense import dense_hessian
from sam_probe.core.objective import Objective
from sam_probe.core.trace import TraceResult, hessian_trace, hutchinson, hutchpp, rademacher


def bn_cnn_objective(bn_mode: str) -> Objective:
    torch.manual_seed(1)
    m = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Tanh(), nn.Flatten(), nn.Linear(18, 3))
    m.train()
    m(torch.randn(16, 1, 5, 5))
    return Objective(m, torch.randn(12, 1, 5, 5), torch.randint(0, 3, (12,)), "ce", bn_mode=bn_mode,
                     dtype=torch.float64)


def mlp_objective() -> Objective:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    return Objective(m, torch.randn(20, 4), torch.randint(0, 3, (20,)), "ce", dtype=torch.float64)


def spiked_matrix(n=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    lam = torch.cat([torch.tensor([40.0, 25.0, 10.0, 8.0, 5.0], dtype=torch.float64),
                     torch.rand(n - 5, generator=g, dtype=torch.float64) * 0.5 - 0.1])
    return (U * lam) @ U.T


METHODS = [("hutchinson", {}), ("hutch++", {"rank": 10}), ("hutch++", {"rank": 10, "sketch": "gaussian"})]


@pytest.mark.parametrize("method,kw", METHODS, ids=["hutchinson", "hutch++krylov", "hutch++gauss"])
@pytest.mark.parametrize("name", ["mlp", "cnn-eval", "cnn-train"])
def test_hessian_trace_within_3_se(name, method, kw):
    obj = mlp_objective() if name == "mlp" else bn_cnn_objective(name.split("-")[1])
    exact = float(torch.trace(dense_hessian(obj)))
    for seed in range(3):
        obj.n_hvp = 0
        res = hessian_trace(obj, method, tol=0.05, max_hvp=400, seed=seed, exact_fallback=False, **kw)
        assert isinstance(res, TraceResult) and res.method == method
        assert res.n_hvp == obj.n_hvp
        assert res.se > 0 and abs(res.estimate - exact) <= 3 * res.se, (seed, res, exact)


@pytest.mark.parametrize("seed", range(4))
def test_spiked_matrix_all_methods(seed):
    A = spiked_matrix(seed=seed)
    mm = lambda V: A @ V  # noqa: E731
    exact = float(torch.trace(A))
    h = hutchinson(mm, A.shape[0], tol=0.02, seed=seed)
    hp = hutchpp(mm, A.shape[0], tol=0.02, seed=seed, rank=10)
    assert h.converged and hp.converged
    from scipy.stats import t as student_t

    for r in (h, hp):  # the SE is itself estimated from n_probes draws: Student's t, 99.9% two-sided
        assert abs(r.estimate - exact) <= student_t.ppf(0.9995, r.n_probes - 1) * r.se, (r, exact)
        assert r.se / abs(r.estimate) <= 0.02
    assert hp.n_hvp < h.n_hvp  # the spikes are removed exactly
    assert hp.exact_part > 80 and hp.rank == 10


def test_hutchpp_exact_when_rank_covers_space():
    A = spiked_matrix(n=20)
    r = hutchpp(lambda V: A @ V, 20, rank=20)
    assert r.se == 0 and abs(r.estimate - float(torch.trace(A))) < 1e-10 and r.n_hvp == 20


def test_seeded_and_rademacher():
    A = spiked_matrix()
    a = hutchinson(lambda V: A @ V, 300, tol=0.05, seed=3)
    b = hutchinson(lambda V: A @ V, 300, tol=0.05, seed=3)
    assert a.estimate == b.estimate and a.n_probes == b.n_probes
    z = rademacher(1000, 3, torch.Generator().manual_seed(0), torch.float32, "cpu")
    assert set(z.unique().tolist()) == {-1.0, 1.0}


@pytest.mark.parametrize("fn", [hutchinson, hutchpp])
def test_max_hvp_too_small(fn):
    A = spiked_matrix()
    r = fn(lambda V: A @ V, 300, tol=1e-4, max_hvp=30)
    assert r.n_hvp <= 30 and not r.converged and r.warnings and "not converged" in r.warnings[0]
    assert r.to_dict()["converged"] is False


def test_small_operator_whose_trace_is_near_zero_gets_the_exact_trace():
    """An indefinite 40 x 40 matrix with trace ~0: no number of probes reaches a 1% relative SE, so
    within max_hvp >= 2P the estimate is replaced by the exact sum of e_i' A e_i (P more products)."""
    from sam_probe.core.operator_base import MatrixOperator
    from sam_probe.core.trace import curvature_trace

    g = torch.Generator().manual_seed(0)
    d = torch.linspace(-3, 3, 40, dtype=torch.float64) + 1e-3
    Q, _ = torch.linalg.qr(torch.randn(40, 40, generator=g, dtype=torch.float64))
    A = Q @ torch.diag(d) @ Q.T
    for method in ("hutch++", "hutchinson"):
        r = curvature_trace(MatrixOperator(A), method, tol=1e-2, max_hvp=1000)
        assert r.method == "exact" and r.converged and r.se == 0 and r.n_hvp <= 80, r
        assert r.estimate == pytest.approx(float(torch.trace(A)), abs=1e-12)
    # a large budget relative to P is what allows it: with max_hvp < 2P the estimator reports its own result
    r = curvature_trace(MatrixOperator(A), "hutchinson", tol=1e-2, max_hvp=60)
    assert r.method == "hutchinson" and not r.converged and r.warnings
