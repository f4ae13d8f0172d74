"""Dense matrices of curvature operators (references for tests and small models).

``A = [A e_1, ..., A e_P]`` in blocks of ``block_size`` columns (``P`` products in all),
symmetrised as ``(A + Aᵀ) / 2`` to remove rounding asymmetry.  Use a float64
:class:`~sam_probe.core.objective.Objective` for a reference; ``P`` above a few
thousand is slow and ``P²`` memory.
"""
from __future__ import annotations

import torch
from torch import Tensor


def dense_matrix(op, block_size: int = 64, symmetrize: bool = True) -> Tensor:
    """The ``[P, P]`` matrix of a :class:`~sam_probe.core.operators.CurvatureOperator` (an
    objective: its Hessian) in its dtype, inside its context (``P`` counted products)."""
    from .operators import as_operator

    op = as_operator(op)
    P = op.P
    A = torch.empty(P, P, dtype=op.dtype, device=op.device)
    with op.context():
        for s in range(0, P, block_size):
            e = min(s + block_size, P)
            E = torch.zeros(P, e - s, dtype=op.dtype, device=op.device)
            E[torch.arange(s, e), torch.arange(e - s)] = 1
            A[:, s:e] = op.matmat(E)
    return 0.5 * (A + A.T) if symmetrize else A


def dense_hessian(obj, block_size: int = 64, symmetrize: bool = True) -> Tensor:
    """The ``[P, P]`` Hessian of ``obj`` in its dtype (``P`` counted HVPs)."""
    return dense_matrix(obj, block_size, symmetrize)


def dense_eigh(H: Tensor, which: str = "LA", k: int | None = None) -> tuple[Tensor, Tensor]:
    """Eigenpairs of a symmetric ``H`` ordered like :func:`~sam_probe.core.lanczos.lanczos`
    (``LA`` descending, ``SA`` ascending, ``LM`` by ``|λ|`` descending); the first ``k``."""
    from .lanczos import order

    evals, evecs = torch.linalg.eigh(H)
    idx = order(evals, which)[:k]
    return evals[idx], evecs[:, idx]
