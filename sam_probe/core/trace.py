"""Stochastic trace estimation with seeded Rademacher probes.

Hutchinson: ``tr(A) ≈ (1/m) Σ_i z_iᵀ A z_i`` with ``z_i ∈ {±1}^P``; the standard
error is the sample standard deviation of the ``z_iᵀ A z_i`` over ``√m``.

Hutch++ (Meyer, Musco, Musco, Woodruff 2021): for an orthonormal ``Q ∈ R^{P×r}``
independent of the probes, exactly

    tr(A) = tr(Qᵀ A Q) + tr(P⊥ A P⊥),      P⊥ = I - Q Qᵀ,

the first term is computed exactly and the second by Hutchinson with projected
probes ``P⊥ z``.  ``Q`` is either ``orth(A S)`` (the paper; ``2r`` HVPs in all) or,
by default, the Lanczos basis of a Gaussian start vector (Krylov-aware variant,
Chen & Hallman 2023): its ``AQ`` comes with it, so ``r`` HVPs.  Conditional on
``Q`` the estimator is unbiased, so the reported SE is that of the residual
Hutchinson samples alone (honest).

``warm`` (earlier Ritz vectors, e.g. of the previous checkpoint) starts the Krylov
sketch from :func:`~sam_probe.core.lanczos.warm_start_block` instead of a Gaussian
vector; ``Q`` is still independent of the probes, so the estimate stays unbiased.
Every routine takes a :class:`~sam_probe.core.operators.CurvatureOperator` through
:func:`curvature_trace` (``hessian_trace`` is the same function).

Both stop adaptively once ``se / |estimate| <= tol`` (after at least
``min_probes`` probes) or before the HVP count would exceed ``max_hvp``.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

Matmat = Callable[[Tensor], Tensor]
from .names import TRACE_METHODS as METHODS


@dataclass
class TraceResult:
    """Trace estimate with its standard error."""

    estimate: float
    se: float
    n_probes: int
    n_hvp: int
    method: str
    converged: bool
    tol: float = 1e-2
    exact_part: float = 0.0  # tr(QᵀAQ) of Hutch++ (0 for Hutchinson)
    rank: int = 0
    sketch: str = ""  # Hutch++ low-rank part: "krylov" | "gaussian"
    warnings: list[str] = field(default_factory=list)
    curvature: str = "hessian"

    @property
    def relative_se(self) -> float:
        return self.se / abs(self.estimate) if self.estimate else math.inf

    def to_dict(self) -> dict:
        return {
            "estimate": self.estimate, "se": self.se, "relative_se": self.relative_se,
            "n_probes": self.n_probes, "n_hvp": self.n_hvp, "method": self.method,
            "converged": self.converged, "tol": self.tol, "exact_part": self.exact_part,
            "rank": self.rank, "sketch": self.sketch, "warnings": list(self.warnings),
            "curvature": self.curvature,
        }


def rademacher(n: int, b: int, gen: torch.Generator, dtype: torch.dtype, device) -> Tensor:
    """``[n, b]`` independent ±1 entries from the seeded CPU generator ``gen``."""
    z = torch.randint(0, 2, (n, b), generator=gen, dtype=torch.int8)
    return (2 * z - 1).to(device=device, dtype=dtype)


def _adaptive_hutchinson(matmat: Matmat, n: int, project: Callable[[Tensor], Tensor], offset: float,
                         budget: int, tol: float, min_probes: int, block_size: int,
                         gen: torch.Generator, dtype, device) -> tuple[list[float], bool]:
    """Samples ``zᵀ P A P z`` (``P`` = ``project``) until ``se / |offset + mean| <= tol``."""
    samples: list[float] = []
    while True:
        if len(samples) >= max(min_probes, 2):
            mean = sum(samples) / len(samples)
            se = _se(samples)
            if se <= tol * abs(offset + mean):
                return samples, True
        b = min(block_size, budget - len(samples))
        if b <= 0:
            return samples, False
        Z = project(rademacher(n, b, gen, dtype, device))
        AZ = matmat(Z).to(device=device, dtype=dtype)
        samples.extend((Z * AZ).sum(0).double().cpu().tolist())


def _se(samples: list[float]) -> float:
    m = len(samples)
    if m < 2:
        return math.inf
    mean = sum(samples) / m
    return math.sqrt(sum((s - mean) ** 2 for s in samples) / (m - 1) / m)


def _warn(res: TraceResult, max_hvp: int) -> TraceResult:
    if not res.converged:
        res.warnings.append(
            f"{res.method} trace not converged: relative SE {res.relative_se:.2e} > tol={res.tol:g} "
            f"after {res.n_hvp} HVPs (max_hvp={max_hvp})")
    return res


def hutchinson(matmat: Matmat, n: int, *, tol: float = 1e-2, max_hvp: int = 1000, min_probes: int = 10,
               block_size: int = 5, seed: int = 0, dtype: torch.dtype = torch.float64,
               device: torch.device | str = "cpu") -> TraceResult:
    """Hutchinson's estimator with adaptive stopping at relative SE ``tol``."""
    gen = torch.Generator().manual_seed(seed)
    samples, ok = _adaptive_hutchinson(matmat, n, lambda Z: Z, 0.0, max_hvp, tol, min_probes, block_size,
                                       gen, dtype, device)
    est = sum(samples) / len(samples) if samples else math.nan
    return _warn(TraceResult(est, _se(samples), len(samples), len(samples), "hutchinson", ok, tol), max_hvp)


def hutchpp(matmat: Matmat, n: int, *, tol: float = 1e-2, max_hvp: int = 1000, rank: int = 20,
            sketch: str = "krylov", min_probes: int = 10, block_size: int = 5, seed: int = 0,
            dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu",
            warm: Tensor | None = None) -> TraceResult:
    """Hutch++: exact ``tr(QᵀAQ)`` on a rank-``rank`` subspace + adaptive Hutchinson on the rest.

    ``sketch="gaussian"``: ``Q = orth(A S)`` as in the paper (``2·rank`` HVPs);
    ``sketch="krylov"``: ``Q`` = Lanczos basis of a Gaussian start vector, whose
    products ``AQ`` are already known (``rank`` HVPs, and it captures the top of the
    spectrum far better per HVP).  Either way ``Q`` is independent of the probes.
    ``warm``: start the Krylov sketch from earlier Ritz vectors (module docstring).
    """
    if sketch not in ("krylov", "gaussian"):
        raise ValueError(f"sketch must be 'krylov' or 'gaussian', got {sketch!r}")
    from .lanczos import krylov_basis

    gen = torch.Generator().manual_seed(seed)
    cost = 1 if sketch == "krylov" else 2
    r = max(0, min(rank, n, (max_hvp - 2) // cost))
    Q = torch.zeros(n, 0, dtype=dtype, device=device)
    exact, used = 0.0, 0
    if r and sketch == "krylov":
        Q, AQ = krylov_basis(matmat, n, r, seed=seed + 7919, dtype=dtype, device=device, warm=warm)
        exact, used = float((Q * AQ).sum().double()), Q.shape[1]
    elif r:
        S = torch.randn(n, r, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
        Q, _ = torch.linalg.qr(matmat(S).to(device=device, dtype=dtype))
        exact, used = float((Q * matmat(Q).to(device=device, dtype=dtype)).sum().double()), 2 * r
    method = "hutch++"
    if Q.shape[1] >= n:
        return TraceResult(exact, 0.0, 0, used, method, True, tol, exact, Q.shape[1], sketch)

    def project(Z: Tensor) -> Tensor:
        return Z - Q @ (Q.T @ Z)

    samples, ok = _adaptive_hutchinson(matmat, n, project, exact, max_hvp - used, tol, min_probes, block_size,
                                       gen, dtype, device)
    est = exact + (sum(samples) / len(samples) if samples else math.nan)
    return _warn(TraceResult(est, _se(samples), len(samples), used + len(samples), method, ok, tol, exact,
                             Q.shape[1], sketch), max_hvp)


def curvature_trace(op, method: str = "hutch++", *, tol: float = 1e-2, max_hvp: int = 1000, seed: int = 0,
                    reuse_graph: bool = True, **kwargs) -> TraceResult:
    """Trace of a :class:`~sam_probe.core.operators.CurvatureOperator` (an objective: its Hessian),
    in its dtype/device and context; ``kwargs`` go to :func:`hutchpp` / :func:`hutchinson`."""
    from .operators import as_operator

    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    op = as_operator(op)
    if method == "hutchinson":
        kwargs.pop("warm", None)  # no sketch to warm
    fn = hutchpp if method == "hutch++" else hutchinson
    ctx = op.context() if reuse_graph else contextlib.nullcontext()
    with ctx:
        res = fn(op.matmat, op.P, tol=tol, max_hvp=max_hvp, seed=seed, dtype=op.dtype, device=op.device, **kwargs)
    res.curvature = op.name
    return res


hessian_trace = curvature_trace
