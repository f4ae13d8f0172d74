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
