"""What an inexact operator's own error does to the numbers computed from it.

An operator with ``exact = False`` (the MC Fisher as an estimate of the Fisher, finite-difference
Hessian products; :mod:`sam_probe.core.operator_base`) gives its products with an error a solver does
not see: a Ritz pair ``(θ, y)`` of the computed matrix ``Â`` with a tiny residual may be far from an
eigenpair of ``A``.  Against ``A``, ``‖A y − θ y‖ ≤ ‖Â y − θ y‖ + ‖(A − Â) y‖``, so the certified
relative residual is the solver's plus ``product_error(y) / |θ|``; for the MC Fisher, ``θ``'s
sampling standard error is ``quadratic_form_error(y)`` and a trace's is ``trace_sampling_error()``
(``docs/metrics.md``, "MC Fisher error").  These functions add that to a result and warn when the
operator's error, not the solver's, decides (warnings rendered in the current error style:
:func:`sam_probe.errors.render`).
"""
from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from ..errors import render
from .errors import opt


def eigen_errors(op: Any, eigenvalues: list[float], eigenvectors: Tensor, residuals: list[float],
                 tol: float) -> dict[str, Any]:
    """For an inexact ``op``: ``residuals`` with ``product_error / |θ|`` added (what is certified against
    the exact operator), ``product_residuals`` (that part), ``converged`` (``≤ tol``), ``eigenvalue_se``
    (sampled operators) and ``warnings``; ``{}`` for exact operators (``k`` extra products, counted)."""
    if getattr(op, "exact", True) or not eigenvalues:
        return {}
    V = eigenvectors[:, :len(eigenvalues)]
    perr = [float(e) for e in op.product_error(V)]
    part = [e / abs(t) if t else math.inf for e, t in zip(perr, eigenvalues)]
    total = [r + p for r, p in zip(residuals, part)]
    out: dict[str, Any] = {"residuals": total, "product_residuals": part, "converged": [t <= tol for t in total]}
    warnings = []
    if hasattr(op, "quadratic_form_error"):
        out["eigenvalue_se"] = [float(e) for e in op.quadratic_form_error(V)]
    bad = [i + 1 for i, (r, p) in enumerate(zip(residuals, part)) if r + p > tol and p > r]
    if bad:
        what = "sampling error of the MC Fisher" if hasattr(op, "mc_samples") else "error of the products"
        fix = (f"raise {opt('mc_samples')} or use {opt('curvature', 'ggn')}, its expectation" if hasattr(op, "mc_samples")
               else f"use {opt('dtype', 'float32' if _half(op) else 'float64')}")
        warnings.append(render(f"eigenpairs {bad}: the {what} (relative {max(part):.2g}) exceeds {opt('tol', f'{tol:g}')}; "
                        f"they are not certified ({fix})"))
    if warnings:
        out["warnings"] = warnings
    return out


def _half(op: Any) -> bool:
    from .precision import is_half

    return is_half(getattr(op, "dtype", "float32"))


def trace_errors(op: Any, estimate: float, se: float, tol: float) -> dict[str, Any]:
    """For a sampled ``op`` (``trace_sampling_error``): ``trace_se`` combining the estimator's SE and the
    sampling error in quadrature, ``trace_sampling_se`` (that part) and a warning when it dominates."""
    if getattr(op, "exact", True) or not hasattr(op, "trace_sampling_error"):
        return {}
    mc = op.trace_sampling_error()
    out: dict[str, Any] = {"trace_se": math.hypot(se, mc), "trace_sampling_se": mc}
    if mc > se and estimate and math.hypot(se, mc) > tol * abs(estimate):
        out["warnings"] = [render(f"the trace's standard error is mostly the MC Fisher's sampling error ({mc:.3g} "
                                  f"of {math.hypot(se, mc):.3g}); raise {opt('mc_samples')} or use "
                                  f"{opt('curvature', 'ggn')}")]
    return out
