"""Edge of stability of gradient descent and of SAM (docs/metrics.md, "Edge of stability").

On a quadratic with top Hessian eigenvalue ``λ``, one gradient step of size ``η``
multiplies the component along the top eigenvector by ``1 - ηλ``: it grows once
``ηλ > 2`` (Cohen et al. 2021 observe full-batch GD to hover at ``λ_max ≈ 2/η``).

SAM's step ``w <- w - η ∇L(w + e)`` multiplies that component by
``1 - ηλ(1 + ρλ/‖g‖)`` for l2-SAM (``e = ρ g/‖g‖``, ``g = ∇L(w)``) and by
``1 - ηλ(1 + ρλ)`` for unnormalised SAM (``e = ρ g``).  The SAM edge is where the
effective ``ηλ_eff`` reaches 2 (Long & Bartlett 2024 for l2-SAM, Agarwala & Dauphin 2023
for USAM):

- l2:   ``λ_edge = ‖g‖/(2ρ) · (√(1 + 8ρ/(η‖g‖)) - 1)`` (below ``2/η``; ``→ 2/η`` as ``ρ → 0``);
- usam: ``λ_edge = (√(1 + 8ρ/η) - 1)/(2ρ)``.
"""
from __future__ import annotations

import math
from typing import Any

SAM_VARIANTS = ("l2", "usam")


def gd_edge(eta: float) -> float:
    """``2/η``."""
    return 2.0 / eta


def sam_effective(eta: float, lam: float, rho: float, variant: str = "l2", grad_norm: float | None = None) -> float:
    """``ηλ(1 + ρλ/‖g‖)`` (l2) or ``ηλ(1 + ρλ)`` (usam): SAM's step along the top eigenvector, edge at 2."""
    if variant == "usam":
        return eta * lam * (1.0 + rho * lam)
    if variant != "l2":
        raise ValueError(f"no SAM edge of stability for variant {variant!r} (l2 or usam)")
    if not grad_norm or grad_norm <= 0:
        return math.inf
    return eta * lam * (1.0 + rho * lam / grad_norm)


def sam_edge(eta: float, rho: float, variant: str = "l2", grad_norm: float | None = None) -> float:
    """The ``λ`` at which :func:`sam_effective` equals 2 (module docstring)."""
    if rho <= 0:
        return gd_edge(eta)
    if variant == "usam":
        return (math.sqrt(1.0 + 8.0 * rho / eta) - 1.0) / (2.0 * rho)
    if variant != "l2":
        raise ValueError(f"no SAM edge of stability for variant {variant!r} (l2 or usam)")
    if not grad_norm or grad_norm <= 0:
        return 0.0
    return grad_norm / (2.0 * rho) * (math.sqrt(1.0 + 8.0 * rho / (eta * grad_norm)) - 1.0)


def edge_of_stability(eta: float | None, lam: float | None, *, sam_rho: float | None = None,
                      sam_variant: str | None = None, grad_norm: float | None = None) -> dict[str, Any]:
    """``{eta_lambda_max, lambda_edge, sam_edge}``: GD's ``ηλ_max`` (edge 2) and ``2/η``; with a SAM
    radius, ``sam_edge = {variant, rho, grad_norm, lambda_edge, eta_lambda_eff}`` (edge 2)."""
    out: dict[str, Any] = {"eta_lambda_max": None, "lambda_edge": None, "sam_edge": None}
    if eta is None or eta <= 0:
        return out
    out["lambda_edge"] = gd_edge(eta)
    if lam is not None and math.isfinite(lam):
        out["eta_lambda_max"] = eta * lam
    if sam_rho and sam_variant in SAM_VARIANTS:
        se = {"variant": sam_variant, "rho": float(sam_rho), "grad_norm": grad_norm,
              "lambda_edge": sam_edge(eta, sam_rho, sam_variant, grad_norm), "eta_lambda_eff": None}
        if lam is not None and math.isfinite(lam):
            se["eta_lambda_eff"] = sam_effective(eta, lam, sam_rho, sam_variant, grad_norm)
        out["sam_edge"] = se
    return out
