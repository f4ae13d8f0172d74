"""Dense matrices of curvature operators (references for tests and small models).

``A = [A e_1, ..., A e_P]`` in blocks of ``block_size`` columns (``P`` products in all),
symmetrised as ``(A + Aᵀ) / 2`` to remove rounding asymmetry.  Use a float64
:class:`~sam_probe.core.objective.Objective` for a reference; ``P`` above a few
thousand is slow and ``P²`` memory.

A model-sharded operator (:mod:`sam_probe.core.sharded`: vectors are this rank's shards) gives the
whole ``[N, N]`` matrix on every rank, its entries ordered rank after rank (each rank's shard in
turn): a symmetric permutation of one process's matrix (the same eigenvalues and trace).  The unit
vectors are walked owner by owner (every rank applies each product, a collective), each rank fills
the rows it holds and one all-reduce sums the ``N²`` entries.
"""
from __future__ import annotations

import torch
from torch import Tensor


def dense_matrix(op, block_size: int = 64, symmetrize: bool = True) -> Tensor:
    """The ``[P, P]`` matrix of a :class:`~sam_probe.core.operators.CurvatureOperator` (an
    objective: its Hessian) in its dtype, inside its context (``P`` counted products)."""
    from .operators import as_operator

    from . import inner

    op = as_operator(op)
    if getattr(op, "shard_group", None) is not None:  # vectors are shards (module docstring)
        with inner.over(op):
            return _dense_sharded(op, block_size, symmetrize)
    P = op.P
    A = torch.empty(P, P, dtype=op.dtype, device=op.device)
    with op.context():
        for s in range(0, P, block_size):
            e = min(s + block_size, P)
            E = torch.zeros(P, e - s, dtype=op.dtype, device=op.device)
            E[torch.arange(s, e), torch.arange(e - s)] = 1
            A[:, s:e] = op.matmat(E)
    return 0.5 * (A + A.T) if symmetrize else A


def _dense_sharded(op, block_size: int, symmetrize: bool) -> Tensor:
    """The whole matrix of a model-sharded operator on every rank (module docstring)."""
    from . import inner

    n = op.P  # this rank's length
    me, sizes = inner.rank(), inner.sizes(n)
    starts = [sum(sizes[:r]) for r in range(len(sizes))]
    N = sum(sizes)
    A = torch.zeros(N, N, dtype=torch.float64)  # N <= a few thousand: float64 on the CPU for the reduction
    with op.context():
        for owner, n_o in enumerate(sizes):
            for s in range(0, n_o, block_size):
                m = min(block_size, n_o - s)
                E = torch.zeros(n, m, dtype=op.dtype, device=op.device)
                if owner == me:
                    E[torch.arange(s, s + m), torch.arange(m)] = 1
                AE = op.matmat(E)
                col = starts[owner] + s
                A[starts[me]:starts[me] + n, col:col + m] = AE.double().cpu()
                del E, AE
    A = inner.allsum(A).to(dtype=op.dtype, device=op.device)
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
