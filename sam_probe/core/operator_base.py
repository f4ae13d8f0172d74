"""The base of every curvature operator: a symmetric ``P × P`` matrix seen only through products.

:class:`CurvatureOperator` applies to blocks ``[P, b]`` (:meth:`~CurvatureOperator.matmat`, counted in
``n_matvec``); :meth:`~CurvatureOperator.restrict` gives a diagonal block (:class:`BlockOperator`);
:class:`MatrixOperator` wraps a dense matrix (tests, references).

Inexact products.  An operator whose products are estimates (finite-difference Hessian products,
the MC Fisher as an estimate of its expectation) says so with ``exact = False`` and estimates its
error: after each :meth:`~CurvatureOperator.matmat`, :attr:`~CurvatureOperator.last_product_error`
holds ``[b]`` estimates of ``‖(A V)_j − (A_exact V)_j‖₂`` (``None`` when products are exact up to
rounding), and :meth:`~CurvatureOperator.product_error` computes them for given vectors.  A solver
certifies a Ritz pair ``(θ, y)``, ``‖y‖ = 1``, only if ``‖A y − θ y‖ + product_error(y) ≤ tol · |θ|``.
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import Tensor


# ------------------------------------------------------------------ base
class CurvatureOperator:
    """A symmetric ``P × P`` matrix seen through :meth:`matmat` (``[P, b] -> [P, b]``).

    ``n_matvec`` counts the vectors it was applied to; ``name`` says which matrix
    (``hessian``, ``ggn``, ``fisher``, ``ef``, ``ggn[fc1.weight]`` for a block, ...);
    :meth:`context` is entered by the solvers around all their products (the Hessian
    keeps its gradient graph inside it).
    """

    def __init__(self, name: str, P: int, dtype: torch.dtype, device: torch.device, space=None):
        self.name = name
        self.curvature = name.split("[", 1)[0]
        self.P = int(P)
        self.dtype = dtype
        self.device = torch.device(device)
        self.space = space  # ParamSpace of the full operator (None for blocks and plain matrices)
        self.n_matvec = 0
        self.last_product_error: Tensor | None = None  # [b] error estimates of the last matmat (inexact only)

    exact = True  # products exact up to rounding (module docstring)

    @property
    def n_params(self) -> int:
        return self.P

    def _matmat(self, V: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def matmat(self, V: Tensor) -> Tensor:
        """``A V`` for ``V`` of shape ``[P, b]`` (or ``[P]``), counted in :attr:`n_matvec`."""
        if V.dim() == 1:
            return self.matmat(V.reshape(-1, 1))[:, 0]
        if V.dim() != 2 or V.shape[0] != self.P:
            raise ValueError(f"V must be [P={self.P}, b], got {tuple(V.shape)}")
        V = V.to(device=self.device, dtype=self.dtype)
        out = self._matmat(V)
        self.n_matvec += V.shape[1]
        return out

    __call__ = matmat

    def product_error(self, V: Tensor) -> Tensor:
        """``[b]`` estimates of ``‖(A V)_j − (A_exact V)_j‖₂`` (zeros for exact operators; else one
        product of ``V``, counted)."""
        if V.dim() == 1:
            V = V.reshape(-1, 1)
        if self.exact:
            return torch.zeros(V.shape[1], dtype=torch.float64)
        self.matmat(V)
        err = self.last_product_error
        return torch.full((V.shape[1],), float("inf"), dtype=torch.float64) if err is None else err

    def context(self) -> contextlib.AbstractContextManager:
        """Entered around a solver's products (nothing to keep by default)."""
        return contextlib.nullcontext()

    def to_scipy(self, dtype=None):
        """This operator as a ``scipy.sparse.linalg.LinearOperator`` (shape ``(P, P)``, symmetric: ``rmatvec`` is
        ``matvec``; each product one :meth:`matmat`); see :mod:`sam_probe.core.scipy_ops`."""
        from .scipy_ops import to_scipy

        return to_scipy(self, dtype)

    def restrict(self, sel: str | Sequence[str] | slice | Tensor, label: str | None = None) -> "BlockOperator":
        """The diagonal block ``A[S, S]``: ``S`` = the entries of the named parameter
        tensor(s), a flat ``slice`` or an index tensor; its products cost one product of ``A``."""
        index, default = _index_of(self, sel)
        return BlockOperator(self, index, label or default)


def _index_of(op: CurvatureOperator, sel) -> tuple[Tensor, str]:
    if isinstance(sel, slice):
        idx = torch.arange(op.P)[sel]
        return idx, f"{idx[0].item() if len(idx) else 0}:{idx[-1].item() + 1 if len(idx) else 0}"
    if isinstance(sel, Tensor):
        idx = sel.reshape(-1).long().cpu()
        return idx, f"{len(idx)} entries"
    names = [sel] if isinstance(sel, str) else list(sel)
    if op.space is None:
        raise ValueError(f"{op.name}: restrict by parameter name needs an operator on a parameter space")
    slices = op.space.slices()
    unknown = [n for n in names if n not in slices]
    if unknown or not names:
        raise ValueError(f"unknown parameter tensors {unknown}; known: {', '.join(slices)}")
    idx = torch.cat([torch.arange(slices[n].start, slices[n].stop) for n in names])
    return idx, ",".join(names)


class BlockOperator(CurvatureOperator):
    """``A[S, S]`` of a parent operator: ``U ↦ (A E U)[S]`` with ``E`` the embedding of ``S``.

    Of a model-sharded parent (``shard_group``, :mod:`sam_probe.core.sharded`), ``index`` selects this
    rank's entries of ``S`` in its shard (none, for a small tensor whose rows are all on other ranks),
    and the block acts on shards too: its products are collective, like the parent's."""

    def __init__(self, parent: CurvatureOperator, index: Tensor, label: str):
        group = getattr(parent, "shard_group", None)
        if len(index) == 0 and group is None:
            raise ValueError("empty block")
        super().__init__(f"{parent.name}[{label}]", len(index), parent.dtype, parent.device)
        self.shard_group = group  # the solvers sum inner products over it (core/inner.py); None: one process
        self.curvature = parent.curvature
        self.parent = parent
        self.index = index.to(parent.device)
        self.label = label

    @property
    def exact(self) -> bool:  # type: ignore[override]
        return self.parent.exact

    def _matmat(self, U: Tensor) -> Tensor:
        V = torch.zeros(self.parent.P, U.shape[1], dtype=self.dtype, device=self.device)
        V[self.index] = U
        out = self.parent.matmat(V)[self.index]
        self.last_product_error = self.parent.last_product_error  # of the whole product: an upper bound
        return out

    def context(self):
        return self.parent.context()


class MatrixOperator(CurvatureOperator):
    """A dense symmetric matrix as an operator (tests, references)."""

    def __init__(self, A: Tensor, name: str = "matrix"):
        super().__init__(name, A.shape[0], A.dtype, A.device)
        self.A = A

    def _matmat(self, V: Tensor) -> Tensor:
        return self.A @ V
