"""Dense Hessian by HVPs against identity blocks (reference for tests and small models).

``H = [H e_1, ..., H e_P]`` in blocks of ``block_size`` columns (``P`` HVPs in all),
symmetrised as ``(H + Hᵀ) / 2`` to remove rounding asymmetry.  Use a float64
:class:`~sam_probe.core.objective.Objective` for a reference; ``P`` above a few
thousand is slow and ``P²`` memory.
"""
from __future__ import annotations

import torch
from torch import Tensor


def dense_hessian(obj, block_size: int = 64, symmetrize: bool = True) -> Tensor:
    """The ``[P, P]`` Hessian of ``obj`` in its dtype (``P`` counted HVPs)."""
    P = obj.n_params
    H = torch.empty(P, P, dtype=obj.dtype, device=obj.device)
    with obj.reuse_graph():
        for s in range(0, P, block_size):
            e = min(s + block_size, P)
            E = torch.zeros(P, e - s, dtype=obj.dtype, device=obj.device)
            E[torch.arange(s, e), torch.arange(e - s)] = 1
            H[:, s:e] = obj.hvp_block(E)
    return 0.5 * (H + H.T) if symmetrize else H


def dense_eigh(H: Tensor, which: str = "LA", k: int | None = None) -> tuple[Tensor, Tensor]:
    """Eigenpairs of a symmetric ``H`` ordered like :func:`~sam_probe.core.lanczos.lanczos`
    (``LA`` descending, ``SA`` ascending, ``LM`` by ``|λ|`` descending); the first ``k``."""
    from .lanczos import order

    evals, evecs = torch.linalg.eigh(H)
    idx = order(evals, which)[:k]
    return evals[idx], evecs[:, idx]
