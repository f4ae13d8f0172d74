"""The order check (core/order_check.py): a bound from a fresh random start, not a residual.

In high dimension the first Ritz pair of a random vector has a residual of about
``‖A‖_F / sqrt(n)``: far below ``10⁻² |θ_k|`` while it sits in the bulk.  A check that accepted a
small residual passed after one product and certified a warm start that had skipped ``λ_3``.
"""
import math

import pytest
import torch

from sam_probe.core import inner
from sam_probe.core.lanczos import lanczos
from sam_probe.core.order_check import DELTA, beyond, deflated_check
from sam_probe.core.vectors import WORK_VECTORS, VectorCount, VectorStore

N = 400_000


def spectrum(top, seed=0, mids=20):
    """``N`` eigenvalues: ``top``, ``mids`` values in [2, 6.5] and a bulk in [-0.05, 0.05] (a diagonal operator)."""
    g = torch.Generator().manual_seed(seed)
    d = (torch.rand(N, generator=g, dtype=torch.float64) - 0.5) * 0.1
    d[:len(top)] = torch.tensor(top, dtype=torch.float64)
    d[len(top):len(top) + mids] = 2 + 4.5 * torch.rand(mids, generator=g, dtype=torch.float64)
    return d


def test_a_warm_start_that_skips_lambda3_in_high_dimension_is_caught():
    d = spectrum([10.0, 9.0, 8.0, 7.0])
    matmat = lambda V: d[:, None] * V  # noqa: E731
    E = torch.zeros(N, 3, dtype=torch.float64)
    E[0, 0] = E[1, 1] = E[3, 2] = 1  # the previous vectors: eigenvectors 1, 2 and 4
    # the null this test must beat: the solve alone stops at λ1, λ2, λ4 with small residuals
    alone = lanczos(matmat, N, 3, tol=1e-3, warm=E, check=False)
    assert alone.all_converged and alone.eigenvalues[2] == pytest.approx(7.0, rel=1e-3)
    # ... and without the check it must not call that certified: residuals yes, order no, and a warning says so
    assert not alone.order_checked and not alone.certified and alone.n_check_products == 0
    assert any("order of the 3 eigenvalues not checked" in w for w in alone.warnings)
    # and a residual-based guard would pass at once: one step from a fresh Gaussian
    g = torch.randn(N, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    g[:4] = 0
    g /= g.norm()
    xi = float(g @ (d * g))
    assert float((d * g - xi * g).norm()) < 1e-2 * 7.0
    count = VectorCount()
    res = lanczos(matmat, N, 3, tol=1e-3, warm=E, count=count)
    assert res.certified and res.n_missed >= 1
    assert res.eigenvalues == pytest.approx([10.0, 9.0, 8.0], rel=1e-3)
    assert 7.0 <= res.guard_bound < 8.0 and res.order_confidence == 1 - DELTA
    assert res.n_check_products > 1 and count.peak <= 3 + WORK_VECTORS


def test_a_double_eigenvalue_in_high_dimension_is_returned_twice():
    d = spectrum([9.0, 9.0, 4.0])
    res = lanczos(lambda V: d[:, None] * V, N, 2, tol=1e-6)
    assert res.certified and res.eigenvalues == pytest.approx([9.0, 9.0], rel=1e-6)
    # at 1e-4 the solve stops before rounding grows the second copy in its single-vector Krylov space:
    # the fresh check is what finds it
    for seed in range(3):
        res = lanczos(lambda V: d[:, None] * V, N, 2, tol=1e-4, seed=seed)
        assert res.certified and res.eigenvalues == pytest.approx([9.0, 9.0], rel=1e-4)
        assert res.n_missed >= 1


def test_a_separated_boundary_gets_a_bound_between_the_next_eigenvalue_and_theta_k():
    d = spectrum([10.0, 9.0, 8.0, 5.0])
    res = lanczos(lambda V: d[:, None] * V, N, 3, tol=1e-3)
    assert res.certified and res.n_missed == 0
    nxt = float(d[3:].max())  # λ4 of the operator
    assert res.guard == pytest.approx(nxt, rel=1e-2)  # the guard is λ4, not a Rayleigh quotient of the bulk
    assert nxt <= res.guard_bound < 8.0
    assert res.subspace_bound is not None and res.subspace_bound < 0.1 and not res.gap_warning
    assert res.order_tol == 1e-2  # the default resolution: max(tol, 1e-2)
    strict = lanczos(lambda V: d[:, None] * V, N, 3, tol=1e-3, order_tol=1e-3)
    assert strict.certified and strict.order_tol == 1e-3 and strict.guard_bound <= 8.0 * (1 + 1e-3)


def test_a_cluster_at_theta_k_passes_at_the_order_resolution_and_flags_the_eigenspace():
    d = spectrum([10.0, 9.0, 8.0, 8.0])  # λ3 = λ4: k = 3 cuts a double eigenvalue
    res = lanczos(lambda V: d[:, None] * V, N, 3, tol=1e-3)
    assert res.certified and res.eigenvalues == pytest.approx([10.0, 9.0, 8.0], rel=1e-3)
    assert res.guard == pytest.approx(8.0, rel=1e-3) and res.guard_bound <= 8.0 * (1 + 1e-2)
    assert res.gap_warning  # the 3-dimensional eigenspace is not determined


def test_a_separation_the_guard_rules_out_ends_the_check_at_the_order():
    """θ_k = 8 with λ4 = 7.96 next: a Davis–Kahan separation of 0.5 is out of reach (U lies beyond the
    guard ξ ≤ λ4, and ξ only grows), so the check stops where the order passed (the products of
    separation 0), not after as many steps again; a reachable separation (0.02) still goes on."""
    d = spectrum([10.0, 9.0, 8.0, 7.96])
    Y = VectorStore(N, torch.float64, "cpu")
    Y.append(torch.eye(N, 3, dtype=torch.float64))  # the exact top-3 eigenvectors
    runs = {sep: deflated_check(lambda W: d[:, None] * W, Y, 8.0, "LA", 1e-3, N, inner.generator(3), 400,
                                torch.float64, "cpu", separation=sep) for sep in (0.0, 0.5, 0.02)}
    assert all(r.status == "pass" for r in runs.values())
    assert runs[0.5].products == runs[0.0].products  # the null (continuing anyway) spends up to twice these
    assert 8.0 - runs[0.5].guard < 0.5 and runs[0.5].bound > runs[0.5].guard
    assert runs[0.02].products > runs[0.0].products


def test_beyond_solves_the_polynomial_equation():
    # one Ritz value: U - ξ = exp(log β - log t)
    assert beyond([2.0], math.log(0.5), math.log(1e-3)) == pytest.approx(2.0 + 500.0)
    assert beyond([2.0], math.log(0.5), math.log(1e-3), upper=False) == pytest.approx(2.0 - 500.0)
    ritz = [-1.0, 0.5, 3.0]
    U = beyond(ritz, 2.0, -1.0)
    assert U > 3.0 and sum(math.log(U - x) for x in ritz) == pytest.approx(3.0)
    assert beyond(ritz, -math.inf, -1.0) == 3.0  # an invariant Krylov space: the Ritz value is exact


@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
def test_the_bound_contains_the_rest_of_the_spectrum_over_seeds(which):
    """Dense symmetric 300 x 300, Y = its two extreme eigenvectors at the wanted end: over 40 seeds
    the bound is never inside the deflated operator's extreme eigenvalue, and a pass is never given
    when an eigenvalue of the deflated operator lies beyond θ_k (here: it always does, a control)."""
    n = 300
    g = torch.Generator().manual_seed(1)
    M = torch.randn(n, n, generator=g, dtype=torch.float64)
    A = (M + M.T) / 2
    lam, V = torch.linalg.eigh(A)
    order = {"LA": torch.argsort(lam, descending=True), "SA": torch.argsort(lam),
             "LM": torch.argsort(lam.abs(), descending=True)}[which]
    Y = VectorStore(n, torch.float64, "cpu")
    Y.append(V[:, order[:2]].clone())
    rest = lam[order[2:]]
    ext = float(rest[0])  # the deflated operator's eigenvalue at the wanted end
    for seed in range(40):
        # θ_k between the 3rd and the 4th: the 3rd is missed (the control: never a pass)
        theta_k = float(lam[order[2]] + lam[order[3]]) / 2
        if which == "LM":
            theta_k = math.copysign(float(lam[order[2]].abs() + lam[order[3]].abs()) / 2, float(lam[order[1]]))
        out = deflated_check(lambda W: A @ W, Y, theta_k, which, 1e-3, n, inner.generator(seed), 200,
                             torch.float64, "cpu")
        assert out.status == "miss" and out.vector is not None
        assert abs(float(V[:, order[2]] @ out.vector)) > 0.5  # its Ritz vector leans on the missed one
        # θ_k the true 2nd: the check passes, and its bound contains the rest of the spectrum
        out = deflated_check(lambda W: A @ W, Y, float(lam[order[1]]), which, 1e-3, n,
                             inner.generator(seed), 300, torch.float64, "cpu")
        assert out.status == "pass"
        if which == "LA":
            assert out.bound >= ext - 1e-9
        elif which == "SA":
            assert out.bound <= ext + 1e-9
        else:
            assert abs(out.bound) >= abs(ext) - 1e-9
