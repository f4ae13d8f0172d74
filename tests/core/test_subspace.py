"""Eigenspace overlaps against dense eigenvectors; chance level; compressed storage."""
import pytest
import torch

from sam_probe.core.dense import dense_eigh, dense_matrix
from sam_probe.core.objective import Objective
from sam_probe.core.operators import curvature_operator
from sam_probe.core.subspace import (chance_overlap, overlap_matrix, subspace_overlap, subspace_persistence,
                                     subspace_result)
from test_operators import data, mlp


def checkpoints(n=3):
    """Nearby weights of one tiny MLP, like consecutive checkpoints."""
    x, y = data("ce")
    base = mlp()
    g = torch.Generator().manual_seed(9)
    objs = []
    for t in range(n):
        params = {k: v.detach() + 0.15 * t * torch.randn(v.shape, generator=g, dtype=v.dtype)
                  for k, v in base.named_parameters()}
        objs.append(Objective(base, x, y, "ce", params=params, dtype=torch.float64))
    return objs


@pytest.mark.parametrize("name", ["hessian", "ggn"])
def test_overlaps_equal_those_of_dense_eigenvectors(name):
    objs = checkpoints()
    k = 3
    dense = [dense_eigh(dense_matrix(curvature_operator(o, name)), "LA", k)[1] for o in objs]
    ref = torch.tensor([[float((a.T @ b).pow(2).sum()) / k for b in dense] for a in dense], dtype=torch.float64)
    res, bases = subspace_persistence([curvature_operator(o, name) for o in objs], [0, 10, 20], k, tol=1e-10)
    assert res.curvature == name and res.k == k and len(bases) == 3
    assert torch.allclose(torch.tensor(res.overlap, dtype=torch.float64), ref, atol=1e-8)
    assert torch.allclose(torch.diagonal(torch.tensor(res.overlap, dtype=torch.float64)), torch.ones(3, dtype=torch.float64))
    assert 0 < ref[0, 2] < 1  # the spaces did move
    assert res.chance == k / objs[0].n_params
    d = res.to_dict()
    assert {"steps", "k", "overlap", "chance", "eigenvalues"} <= d.keys() and d["steps"] == [0, 10, 20]
    assert d["previous"][1] == pytest.approx(float(ref[1, 0]), abs=1e-8)
    # stored as float16 (the store's compression): overlaps within float16 precision
    again = subspace_result(res.steps, [b.half() for b in bases], res.eigenvalues)
    assert torch.allclose(torch.tensor(again.overlap, dtype=torch.float64), ref, atol=5e-3)


def test_overlap_properties_and_chance_level():
    g = torch.Generator().manual_seed(0)
    P, k = 400, 4
    A, _ = torch.linalg.qr(torch.randn(P, k, generator=g, dtype=torch.float64))
    R, _ = torch.linalg.qr(torch.randn(k, k, generator=g, dtype=torch.float64))
    assert subspace_overlap(A, A @ R) == pytest.approx(1.0, abs=1e-12)  # a rotation inside: the same space
    assert subspace_overlap(A, 3.0 * A) == pytest.approx(1.0, abs=1e-12)  # bases re-orthonormalised
    B = torch.randn(P, k, generator=g, dtype=torch.float64)
    B = B - A @ (A.T @ B)
    assert subspace_overlap(A, B) == pytest.approx(0.0, abs=1e-12)
    rand = [subspace_overlap(A, torch.randn(P, k, generator=g, dtype=torch.float64)) for _ in range(300)]
    mean = sum(rand) / len(rand)
    se = (sum((r - mean) ** 2 for r in rand) / (len(rand) - 1) / len(rand)) ** 0.5
    assert abs(mean - chance_overlap(k, P)) <= 4 * se
    M = overlap_matrix([A, A @ R, B])
    assert torch.allclose(M, M.T) and M[0, 1] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="non-finite"):
        subspace_overlap(A, torch.full((P, k), float("nan"), dtype=torch.float64))
    with pytest.raises(ValueError, match="different spaces"):
        subspace_overlap(A, A[:10])


# ------------------------------------------- degenerate and near-degenerate k boundaries (issue 27, item 4)
def swapped_pair(n=400, rel_gap=2e-4, seed=0):
    """Two "checkpoints" whose two top eigenvalues are ``10`` and ``10 (1 - rel_gap)`` with the
    eigenvectors swapped between them: the true top-1 eigenspaces are orthogonal (overlap 0),
    the top-2 eigenspaces equal (overlap 1).  Dense, in a random orthonormal basis."""
    from sam_probe.core.operators import MatrixOperator

    g = torch.Generator().manual_seed(seed)
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    bulk = torch.rand(n - 2, generator=g, dtype=torch.float64) * 5
    a, b = 10.0, 10.0 * (1 - rel_gap)
    d1 = torch.cat([torch.tensor([a, b], dtype=torch.float64), bulk])
    d2 = torch.cat([torch.tensor([b, a], dtype=torch.float64), bulk])
    mats = [(V * d) @ V.T for d in (d1, d2)]
    return [MatrixOperator(0.5 * (M + M.T)) for M in mats], V


@pytest.mark.parametrize("warm", [True, False])
def test_near_degenerate_boundary_is_extended_to_the_cluster(warm):
    ops, V = swapped_pair()
    res, bases = subspace_persistence(ops, [0, 1], 1, tol=1e-3, warm_start=warm)
    # the top-1 eigenspace is not determined at tol 1e-3 (gap 2e-4): k is taken to the whole cluster
    assert res.k_used == [2, 2] and res.k_requested == 1 and res.k == 2
    assert res.overlap[0][1] == pytest.approx(1.0, abs=1e-6)  # the 2-dim cluster space persists (exactly)
    assert [b.shape[1] for b in bases] == [2, 2]
    assert any("cluster" in w for w in res.warnings)
    d = res.to_dict()
    assert d["k_used"] == [2, 2] and d["gap_warning"] == [False, False] and "gap" in d and "cluster" in d
    # without extension the boundary is flagged instead of reported as a clean overlap
    flagged, _ = subspace_persistence(ops, [0, 1], 1, tol=1e-3, warm_start=warm, extend_cluster=0)
    assert flagged.gap_warning == [True, True] and flagged.k_used == [1, 1]
    assert all(c and abs(c[0] - c[1]) <= 1e-2 * c[0] for c in flagged.cluster)
    assert any("not determined" in w for w in flagged.warnings)


def test_resolved_boundary_gives_the_true_overlap():
    """Tight enough residuals resolve a relative gap of 2e-4: the top-1 eigenvectors are found
    and their true overlap, 0, is reported (warm and cold alike)."""
    ops, V = swapped_pair()
    for warm in (True, False):
        res, bases = subspace_persistence(ops, [0, 1], 1, tol=1e-8, warm_start=warm)
        assert res.k_used == [1, 1] and res.gap_warning == [False, False]
        assert res.overlap[0][1] == pytest.approx(0.0, abs=1e-6)
        assert float((bases[0].T @ V[:, 0]).abs()) == pytest.approx(1.0, abs=1e-8)
        assert float((bases[1].T @ V[:, 1]).abs()) == pytest.approx(1.0, abs=1e-8)


def test_double_eigenvalue_block_size():
    """A double top eigenvalue: --block-size 2 finds the eigenspace at once; k = 2 is the cluster."""
    from sam_probe.core.operators import MatrixOperator

    n = 300
    g = torch.Generator().manual_seed(1)
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    d = torch.cat([torch.tensor([9.0, 9.0], dtype=torch.float64), torch.rand(n - 2, generator=g, dtype=torch.float64) * 4])
    op = MatrixOperator((V * d) @ V.T)
    for b in (1, 2):
        res, bases = subspace_persistence([op, op], [0, 1], 2, tol=1e-8, block_size=b)
        assert res.eigenvalues[0] == pytest.approx([9.0, 9.0], rel=1e-8)
        assert res.k_used == [2, 2] and res.gap_warning == [False, False]
        assert float((bases[0].T @ V[:, :2]).pow(2).sum()) == pytest.approx(2.0, abs=1e-8)
