"""The generalised Gauss-Newton matrix ``G = (1/N) Σ_i J_iᵀ H_ℓ,i J_i`` (``docs/metrics.md``).

``H_ℓ`` is the loss object's output Hessian (:meth:`~sam_probe.core.losses.Loss.output_hessian_product`):
in closed form for ``ce``, ``lm``, ``mse``, ``bce`` (class axis, ignored labels and the next-token shift
handled by the loss), by double backward in output space for any other loss.  PSD for convex ``ℓ``.
"""
from __future__ import annotations

from typing import Any

from torch import Tensor

from .errors import CurvatureError
from .output_space import OutputSpaceOperator
from .protocols import ObjectiveLike


class GGNOperator(OutputSpaceOperator):
    """``G`` (module docstring); ``closed_form=False`` forces the autograd output Hessian for any loss."""

    def __init__(self, obj: ObjectiveLike, closed_form: bool | None = None):
        super().__init__("ggn", obj)
        ok = self.loss.closed_form
        self.closed_form = ok if closed_form is None else bool(closed_form)
        if self.closed_form and not ok:
            raise CurvatureError(f"no closed-form output Hessian for the loss {self.loss.name!r}",
                                 option="curvature", value="ggn")

    def output_product(self, out: Tensor, y: Tensor | None, JV: Tensor, offset: int, x: Any = None) -> Tensor:
        if self.closed_form:
            return self.loss.output_hessian_product(out, y, JV, x)
        return self.loss.autograd_output_hessian_product(out, y, JV, x)
