"""A curvature operator as a ``scipy.sparse.linalg.LinearOperator`` (for scipy's and curvlinops users' solvers).

``A`` is symmetric, so ``Aᵀ x = A x``: ``rmatvec``/``rmatmat`` and the adjoint are the operator itself.
Every product (a vector or a block ``[P, b]``) is one :meth:`~CurvatureOperator.matmat` of ``A``,
counted in ``n_matvec``; inputs are cast to the operator's dtype and device, outputs come back as
numpy arrays of :attr:`LinearOperator.dtype` (float64 unless the operator is float32 and no dtype is given).

scipy calls the operator once per product, outside any context: wrap the solver in
``with op.context():`` to let the Hessian keep its gradient graph across products, e.g.
``with op.context(): eigsh(op.to_scipy(), k=2)``.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch


def _numpy_dtype(op_dtype: torch.dtype, dtype: Any) -> np.dtype:
    if dtype is not None:
        dt = np.dtype(dtype)
        if dt not in (np.float32, np.float64):
            raise ValueError(f"to_scipy(dtype={dtype!r}): choose float32 or float64")
        return dt
    return np.dtype(np.float32) if op_dtype == torch.float32 else np.dtype(np.float64)


def to_scipy(op: Any, dtype: Any = None) -> Any:
    """``op`` (a :class:`~sam_probe.core.operator_base.CurvatureOperator`) as a ``LinearOperator`` of shape ``(P, P)``."""
    from scipy.sparse.linalg import LinearOperator

    out_dtype = _numpy_dtype(op.dtype, dtype)

    def product(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        if np.iscomplexobj(x):  # real operator: (A x) = A Re x + i A Im x
            return product(x.real) + 1j * product(x.imag)
        V = torch.as_tensor(np.array(x, dtype=np.float64 if op.dtype == torch.float64 else np.float32, copy=True))
        vec = V.dim() == 1
        out = op.matmat(V.reshape(op.P, -1))
        out = out.detach().to("cpu", torch.float64 if out_dtype == np.float64 else torch.float32).numpy()
        return out[:, 0] if vec else out

    class _Symmetric(LinearOperator):
        def __init__(self) -> None:
            super().__init__(dtype=out_dtype, shape=(op.P, op.P))
            self.operator = op  # the curvature operator (its n_matvec counts the products)

        def _matvec(self, x):
            return product(x.reshape(-1))

        def _matmat(self, X):
            return product(X)

        _rmatvec = _matvec
        _rmatmat = _matmat

        def _adjoint(self):
            return self

        _transpose = _adjoint

        def __repr__(self) -> str:
            return f"<{op.P}x{op.P} scipy LinearOperator of {op.name} ({np.dtype(self.dtype).name})>"

    return _Symmetric()
