"""``H − G``: the part of the Hessian the generalised Gauss-Newton matrix drops.

``H = G + (1/N) Σ_i Σ_c (∂ℓ_i/∂f_c) ∇²_w f_c(x_i)`` (``docs/metrics.md``), so ``H − G`` is the second
term, the *functional Hessian* of Singh et al. (2021): zero for models linear in ``w``, indefinite
otherwise, and where the Hessian's negative eigenvalues come from.  One Hessian product
(:class:`~sam_probe.core.hessian.HessianOperator`) and one GGN product per vector.
"""
from __future__ import annotations

import contextlib

from torch import Tensor

from .ggn import GGNOperator
from .hessian import HessianOperator
from .operator_base import CurvatureOperator
from .protocols import ObjectiveLike


class HessianMinusGGNOperator(CurvatureOperator):
    """``H − G`` of an objective (module docstring)."""

    def __init__(self, obj: ObjectiveLike, reuse_graph: bool = True):
        super().__init__("hessian-ggn", obj.space.size, obj.dtype, obj.device, obj.space)
        self.hessian = HessianOperator(obj, reuse_graph=reuse_graph)
        self.ggn = GGNOperator(obj)

    @property
    def exact(self) -> bool:  # type: ignore[override]
        return self.hessian.exact

    def _matmat(self, V: Tensor) -> Tensor:
        out = self.hessian.matmat(V) - self.ggn.matmat(V)
        self.last_product_error = self.hessian.last_product_error
        return out

    def context(self):
        stack = contextlib.ExitStack()
        stack.enter_context(self.hessian.context())
        stack.enter_context(self.ggn.context())
        return stack
