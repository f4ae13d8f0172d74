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


# ---------------------------------------------------------------- order certificate (issue 20, item 0)
TOP = (2.2864, 1.4945, 1.4315, 1.3476)  # the digits MLP's top-4 at step 15 (issue 20)


def householder(n: int, seed: int = 0, bulk: float = 0.3, top=TOP):
    """A dense symmetric ``A = H diag(d) H`` (``H = I - 2uuᵀ``: every entry nonzero) applied in
    O(n): eigenvalues ``d`` (``top`` then a uniform bulk in ``[0, bulk]``), eigenvectors the
    columns of ``H``."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(n, generator=g, dtype=torch.float64)
    u /= u.norm()
    d = torch.cat([torch.tensor(top, dtype=torch.float64), bulk * torch.rand(n - len(top), generator=g,
                                                                          dtype=torch.float64)])

    def H(V):
        return V - 2 * u[:, None] * (u @ V)[None, :]

    def matmat(V):
        return H(d[:, None] * H(V))

    def eigvec(i):
        e = torch.zeros(n, 1, dtype=torch.float64)
        e[i] = 1
        return H(e)[:, 0]

    return matmat, d, eigvec


@pytest.mark.parametrize("seed", [0, 1])
def test_warm_start_whose_span_omits_an_eigenvector_still_returns_lambda3(seed):
    """Previous vectors = exact eigenvectors 1, 2, 4: the k = 3 solve must return λ3 (1.4315), not
    λ4 (1.3476) with a tiny residual, and say that its order check found it."""
    from sam_probe.core.lanczos import lanczos

    n = 20000
    matmat, d, eigvec = householder(n, seed)
    W = torch.stack([eigvec(0), eigvec(1), eigvec(3)], 1)
    # the failure this guards against: without the order check the warm solve stops at λ1, λ2, λ4
    skipped = lanczos(matmat, n, 3, tol=1e-3, warm=W, seed=seed, check=False)
    assert skipped.all_converged and abs(skipped.eigenvalues[2] - TOP[3]) < 1e-3
    for warm in (W, None):
        res = lanczos(matmat, n, 3, tol=1e-3, warm=warm, seed=seed)
        assert res.certified and res.order_checked, res.warnings
        for got, true in zip(res.eigenvalues, TOP[:3]):
            assert abs(got - true) <= 1e-3 * true
        # certificates recomputed independently with the exact operator
        V, lam = res.eigenvectors, torch.tensor(res.eigenvalues, dtype=torch.float64)
        true_res = (matmat(V) - V * lam).norm(dim=0) / lam.abs()
        assert torch.allclose(true_res, torch.tensor(res.residuals, dtype=torch.float64), rtol=1e-6, atol=1e-12)
        assert float((V.T @ eigvec(2)).abs().max()) > 0.999  # λ3's eigenvector is among them
        if warm is not None:
            assert res.warm_start and res.n_missed >= 1  # the check found the eigenvalue the warm start skipped
        assert res.n_certify == 3  # the lean certificate: one explicit product per returned pair


def test_double_eigenvalue_is_returned_twice_by_the_single_vector_solver():
    """A single Krylov vector sees one direction of a double eigenvalue: [9, 9] came back as [9, 4].
    The fresh-block order check finds the second copy."""
    from sam_probe.core.lanczos import lanczos

    n = 3000
    g = torch.Generator().manual_seed(0)
    d = torch.cat([torch.tensor([9.0, 9.0, 4.0], dtype=torch.float64), torch.rand(n - 3, generator=g,
                                                                             dtype=torch.float64)])
    res = lanczos(lambda V: d[:, None] * V, n, 2, tol=1e-6)
    assert res.certified and res.eigenvalues == pytest.approx([9.0, 9.0], rel=1e-6)
    assert res.n_missed >= 1
    V = res.eigenvectors
    assert float(V[:2].norm()) == pytest.approx(2 ** 0.5, rel=1e-6)  # the whole eigenspace span(e1, e2)
    # k = 1 at the double eigenvalue: the value is certified, its eigenvector is not: flagged
    one = lanczos(lambda V: d[:, None] * V, n, 1, tol=1e-6)
    assert one.eigenvalues == pytest.approx([9.0], rel=1e-6) and one.gap_warning and one.cluster
    assert one.gap < 1e-3 and one.subspace_bound == 1.0
    ext = lanczos(lambda V: d[:, None] * V, n, 1, tol=1e-6, extend_cluster=3)
    assert ext.k_requested == 1 and ext.eigenvalues == pytest.approx([9.0, 9.0], rel=1e-6)
    assert not ext.gap_warning and ext.eigenvectors.shape == (n, 2)


def test_cold_start_checks_its_order_too():
    """A cold start at a loose tolerance (which stopped before a close eigenvalue emerged) is
    checked the same way: the result is the true top-k."""
    from sam_probe.core.lanczos import lanczos

    n = 20000
    matmat, d, eigvec = householder(n, 3, bulk=1.2, top=(3.0, 2.0, 1.3, 1.25))
    res = lanczos(matmat, n, 4, tol=1e-2, seed=3)
    assert res.certified
    assert res.eigenvalues == pytest.approx([3.0, 2.0, 1.3, 1.25], rel=1e-2)
