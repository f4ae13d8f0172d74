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

Memory (parameter-sized vectors): Hutchinson holds its probe block and its products,
``2b``; Hutch++ also its sketch ``Q`` (``r`` rows of a
:class:`~sam_probe.core.vectors.VectorStore`, whose products are never kept: ``tr(QᵀAQ)``
is summed as they come), ``r + 2b``.  Without a memory plan ``r + 2b <= c`` (``r = 6``,
``b = 1``; ``c`` = :data:`~sam_probe.core.vectors.WORK_VECTORS`); a plan with room gives
``r = rank`` (default 20) and ``b = block_size`` (default 5).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

Matmat = Callable[[Tensor], Tensor]
from . import inner
from .names import TRACE_METHODS as METHODS
from .vectors import WORK_VECTORS, VectorCount


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
    out = torch.empty(n, b, dtype=dtype, device=device)
    out.copy_(z)
    return out.mul_(2).sub_(1)


def probes(n: int, b: int, gen: torch.Generator, dtype: torch.dtype, device) -> Tensor:
    """``b`` Rademacher probes drawn one column at a time from ``gen``: the i-th probe of a seed
    is the same whatever the block sizes it is drawn in (so memory never changes an estimate)."""
    out = torch.empty(n, b, dtype=dtype, device=device)
    for j in range(b):  # the same draws as rademacher(n, 1, gen), without a second float copy
        out[:, j].copy_(torch.randint(0, 2, (n,), generator=gen, dtype=torch.int8))
    return out.mul_(2).sub_(1)


def _adaptive_hutchinson(matmat: Matmat, n: int, project: Callable[[Tensor], Tensor], offset: float,
                         budget: int, tol: float, min_probes: int, block_size: int,
                         gen: torch.Generator, dtype, device,
                         count: VectorCount | None = None) -> tuple[list[float], bool, int]:
    """Samples ``zᵀ P A P z`` (``P`` = ``project``, in place) until ``se / |offset + mean| <= tol``,
    tested after every sample (so the estimate does not depend on ``block_size``, only the products
    spent on a last block do); returns the samples, whether the rule was met and the products used."""
    samples: list[float] = []
    count = count if count is not None else VectorCount()
    used = 0

    def met(m: int) -> bool:
        if m < max(min_probes, 2):
            return False
        part = samples[:m]
        return _se(part) <= tol * abs(offset + sum(part) / m)

    while True:
        b = min(block_size, budget - used)
        if b <= 0:
            return samples, False, used
        with count.hold(2 * b):
            Z = project(probes(n, b, gen, dtype, device))
            AZ = matmat(Z).to(device=device, dtype=dtype)
            new = coldots(Z, AZ).tolist()
            del Z, AZ
        used += b
        for x in new:
            samples.append(x)
            if met(len(samples)):
                return samples, True, used


def coldots(A: Tensor, B: Tensor) -> Tensor:
    """``[aⱼ · bⱼ]`` of the columns of ``A, B [P, b]`` (float64, CPU), without a ``[P, b]`` temporary
    (summed over the shards when the model is sharded, :mod:`.inner`)."""
    return inner.coldots(A, B)


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
               device: torch.device | str = "cpu", count: VectorCount | None = None) -> TraceResult:
    """Hutchinson's estimator with adaptive stopping at relative SE ``tol`` (``2 · block_size`` vectors)."""
    gen = inner.generator(seed)
    samples, ok, used = _adaptive_hutchinson(matmat, n, lambda Z: Z, 0.0, max_hvp, tol, min_probes, block_size,
                                             gen, dtype, device, count)
    est = sum(samples) / len(samples) if samples else math.nan
    return _warn(TraceResult(est, _se(samples), len(samples), used, "hutchinson", ok, tol), max_hvp)


def hutchpp(matmat: Matmat, n: int, *, tol: float = 1e-2, max_hvp: int = 1000, rank: int = 20,
            sketch: str = "krylov", min_probes: int = 10, block_size: int = 5, seed: int = 0,
            dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu",
            warm: Tensor | None = None, where=None, count: VectorCount | None = None) -> TraceResult:
    """Hutch++: exact ``tr(QᵀAQ)`` on a rank-``rank`` subspace + adaptive Hutchinson on the rest.

    ``sketch="krylov"``: ``Q`` = Lanczos basis of a Gaussian start vector (``rank`` HVPs; it
    captures the top of the spectrum far better per HVP than a Gaussian sketch);
    ``sketch="gaussian"``: ``Q = orth(A S)`` as in the paper (``2·rank`` HVPs).  Either way ``Q``
    is independent of the probes.  ``warm``: start the Krylov sketch from earlier Ritz vectors
    (module docstring).  Memory: ``rank + 2 · block_size`` vectors (``Q`` on ``where``: the
    device, ``"cpu"`` or a directory of memory-mapped files).
    """
    if sketch not in ("krylov", "gaussian"):
        raise ValueError(f"sketch must be 'krylov' or 'gaussian', got {sketch!r}")
    from .lanczos import _gaussian, _orthonormalise_block, krylov_sketch
    from .vectors import VectorStore

    count = count if count is not None else VectorCount()
    gen = inner.generator(seed)
    cost = 1 if sketch == "krylov" else 2
    N = inner.size(n)  # the dimension (n: a vector's local length)
    r = max(0, min(rank, N, (max_hvp - 2) // cost))
    Q = VectorStore(n, dtype, device, where, count)
    exact, used = 0.0, 0
    if r and sketch == "krylov":
        Q, exact, used = krylov_sketch(matmat, n, r, seed=seed + 7919, dtype=dtype, device=device, warm=warm,
                                       where=where, count=count)
    elif r:
        for a in range(0, r, max(1, block_size)):  # Q = orth(A S), S Gaussian, block by block
            bb = min(block_size, r - a)
            with count.hold(2 * bb):
                AS = matmat(_gaussian(n, bb, gen, dtype, device)).to(device=device, dtype=dtype)
                Z, _ = _orthonormalise_block(AS, Q, gen)
                Q.append(Z)
                del AS, Z
        for j in range(len(Q)):  # exact part tr(Qᵀ A Q), one product per row
            with count.hold(1 if Q.local else 2):
                q = Q.row(j)[:, None]
                exact += inner.dot(q[:, 0], matmat(q).to(device=device, dtype=dtype)[:, 0])
        used = r + len(Q)
    method = "hutch++"
    if len(Q) >= N:
        return TraceResult(exact, 0.0, 0, used, method, True, tol, exact, len(Q), sketch)

    def project(Z: Tensor) -> Tensor:
        Q.orthogonalise(Z, 1)  # one Gram–Schmidt sweep: Z ← (I − Q Qᵀ) Z
        return Z

    samples, ok, probed = _adaptive_hutchinson(matmat, n, project, exact, max_hvp - used, tol, min_probes,
                                               block_size, gen, dtype, device, count)
    rank_q = len(Q)
    Q.close()
    est = exact + (sum(samples) / len(samples) if samples else math.nan)
    return _warn(TraceResult(est, _se(samples), len(samples), used + probed, method, ok, tol, exact,
                             rank_q, sketch), max_hvp)


def trace_plan(memory_plan=None, rank: int = 20, block_size: int = 5, max_vectors: int | None = None
               ) -> tuple[int, int]:
    """``(rank, block_size)`` of Hutch++ within ``max_vectors`` (else the memory plan's solver
    vectors, else ``c``): the full ``rank``/``block_size`` when ``rank + 2 block_size`` fits, else
    one probe at a time and the rank that fits beside it (at least 2)."""
    vectors = max_vectors if max_vectors is not None else \
        max(WORK_VECTORS, int(getattr(memory_plan, "solver_vectors", 0) or 0)) if memory_plan is not None \
        else WORK_VECTORS
    if rank + 2 * block_size <= vectors:
        return rank, block_size
    b = 1
    return max(2, min(rank, vectors - 2 * b)), b


def curvature_trace(op, method: str = "hutch++", *, tol: float = 1e-2, max_hvp: int = 1000, seed: int = 0,
                    reuse_graph: bool = True, max_vectors: int | None = None, exact_fallback: bool = True,
                    **kwargs) -> TraceResult:
    """Trace of a :class:`~sam_probe.core.operators.CurvatureOperator` (an objective: its Hessian),
    in its dtype/device and context (float32 arithmetic for a half-precision operator, whose
    products' rounding, ``c u`` relative (:mod:`sam_probe.core.precision`), is not in ``se``);
    ``kwargs`` go to :func:`hutchpp` / :func:`hutchinson`.

    Unless given, Hutch++'s ``rank`` and ``block_size`` (and Hutchinson's block) come from
    :func:`trace_plan` of the objective's memory plan (``max_vectors`` overrides it).

    When ``2P ≤ max_hvp`` (and ``exact_fallback``), the estimator gets at most ``P`` products and,
    if it has not reached ``tol`` by then, the exact trace replaces it (:func:`exact_trace`)."""
    from .lanczos import _plan_of
    from .operators import as_operator
    from .precision import solver_dtype

    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    op = as_operator(op)
    plan = _plan_of(op)
    if method == "hutchinson":
        kwargs.pop("warm", None)  # no sketch to warm
        kwargs.pop("where", None)
        if "block_size" not in kwargs:
            kwargs["block_size"] = trace_plan(plan, 0, 5, max_vectors)[1] if max_vectors is not None or plan \
                is not None else min(5, WORK_VECTORS // 2)
    elif "rank" not in kwargs and "block_size" not in kwargs:
        kwargs["rank"], kwargs["block_size"] = trace_plan(plan, 20, 5, max_vectors)
    fn = hutchpp if method == "hutch++" else hutchinson
    ctx = op.context() if reuse_graph else contextlib.nullcontext()
    with inner.over(op), ctx:
        N = inner.size(op.P)  # the dimension (op.P: the local length on a model-sharded rank)
        small = exact_fallback and 2 * N <= max_hvp  # an exact trace (N products) is affordable: never spend more on estimates
        res = fn(op.matmat, op.P, tol=tol, max_hvp=N if small else max_hvp, seed=seed,
                 dtype=solver_dtype(op.dtype), device=op.device, **kwargs)
        if small and not res.converged:
            res = exact_trace(op.matmat, op.P, spent=res.n_hvp, tol=tol, block_size=kwargs.get("block_size") or 4,
                              dtype=solver_dtype(op.dtype), device=op.device)
    res.curvature = op.name
    return res


def exact_trace(matmat, n: int, *, spent: int = 0, tol: float = 1e-2, block_size: int = 4,
                dtype: torch.dtype = torch.float64, device: Any = "cpu") -> TraceResult:
    """``tr(A) = Σ_i e_iᵀ A e_i`` from ``n`` products with unit vectors, ``block_size`` at a time
    (exact up to rounding: ``se = 0``).  :func:`curvature_trace` falls back to it when ``2n ≤ max_hvp``
    and the estimator did not reach ``tol`` within ``n`` products (e.g. a trace near zero, whose
    relative error no number of probes can make small); ``spent`` products are counted in ``n_hvp``."""
    b = max(1, int(block_size))
    total = 0.0
    me, sizes = inner.rank(), inner.sizes(n)  # one process: 0, [n]; sharded: each rank's unit vectors in turn
    for owner, n_o in enumerate(sizes):
        for start in range(0, n_o, b):
            m = min(b, n_o - start)
            E = torch.zeros(n, m, dtype=dtype, device=device)
            idx = torch.arange(m, device=device)
            if owner == me:
                E[start + idx, idx] = 1
            AE = matmat(E)
            if owner == me:
                total += float(AE[start + idx, idx].double().sum())
            del E, AE
    N = sum(sizes)
    total = float(inner.allsum(torch.tensor([total], dtype=torch.float64))[0])
    return TraceResult(estimate=total, se=0.0, n_probes=N, n_hvp=spent + N, method="exact", converged=True, tol=tol)


hessian_trace = curvature_trace
