"""Spectral density by stochastic Lanczos quadrature (SLQ).

For a unit probe ``v = z / ||z||`` (Rademacher ``z``), ``m`` Lanczos steps from ``v``
give a tridiagonal ``T_m = S diag(θ) Sᵀ``; the Gauss quadrature nodes ``θ_i`` and
weights ``τ_i = S_{1i}²`` (``Σ τ_i = 1``) satisfy ``Σ τ_i f(θ_i) ≈ vᵀ f(A) v``, exactly
for polynomials of degree ``< 2m``.  In particular ``Σ τ_i θ_i = vᵀ A v``, whose mean
over probes estimates ``tr(A) / P``.  Averaging ``n_probes`` runs and smoothing each
node with a Gaussian of width ``σ``,

    φ(t) = (1/n_probes) Σ_l Σ_i τ_i^l  N(t; θ_i^l, σ²),

is then normalised numerically to integrate to 1 on the grid (Lin, Saad, Yang 2016;
Ghorbani, Krishnan, Xiao 2019).  The probes run together as one block of HVPs,
each with its own three-term recurrence and full reorthogonalisation against its
own basis.  A probe whose recurrence breaks down (``β ≈ 0``) found an invariant
subspace; its quadrature is then exact and it stops early.  Any
:class:`~sam_probe.core.operators.CurvatureOperator` works (:func:`curvature_density`;
``hessian_density`` is the same function).

Memory (parameter-sized vectors): with full reorthogonalisation each probe keeps its
basis, ``b · m + 2b`` for ``b`` probes run together; without it (``reorth=False``, the
lean default when no memory plan allows the bases) each probe keeps only its last two
Lanczos vectors and its product, ``3b``, with ``b = ⌊c / 3⌋ = 2`` probes at a time
(``c`` = :data:`~sam_probe.core.vectors.WORK_VECTORS`).  Without reorthogonalisation the
recurrence loses orthogonality once Ritz values converge and repeats them ("ghosts"),
but the Gauss quadrature it defines stays accurate for the moments SLQ uses (the
weights of a ghost and its original add up; Meurant & Strakoš 2006), and
``Σ τ_i θ_i = vᵀ A v`` holds exactly either way.

Model-sharded operators (``--shard-model``): every norm and inner product goes through
:mod:`sam_probe.core.inner` (outside a sharded group the plain local ones, bit for bit), so on the
same global probes every rank gets one process's tridiagonals; each rank draws its rows of the
probes from its own stream, so the probes (not the method) depend on the number of ranks.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from . import inner
from .trace import coldots, probes
from .vectors import WORK_VECTORS, VectorCount

Matmat = Callable[[Tensor], Tensor]


@dataclass
class DensityResult:
    """Smoothed spectral density on ``grid`` and the raw quadrature of every probe."""

    grid: Tensor  # [G]
    density: Tensor  # [G], integrates to 1 (trapezoid rule)
    nodes: list[Tensor]  # per probe: Ritz values θ_i
    weights: list[Tensor]  # per probe: τ_i, summing to 1
    n_hvp: int
    sigma: float
    steps: int
    curvature: str = "hessian"

    @property
    def mean(self) -> float:
        """``(1/n_probes) Σ_l Σ_i τ_i θ_i ≈ tr(A) / P``."""
        return float(torch.stack([(w * t).sum() for w, t in zip(self.weights, self.nodes)]).mean())

    def to_dict(self) -> dict:
        return {
            "grid": self.grid.tolist(), "density": self.density.tolist(),
            "nodes": [t.tolist() for t in self.nodes], "weights": [w.tolist() for w in self.weights],
            "n_hvp": self.n_hvp, "sigma": self.sigma, "steps": self.steps, "mean": self.mean,
            "curvature": self.curvature,
        }


def lanczos_tridiagonal(matmat: Matmat, V0: Tensor, steps: int, *, reorth: bool = True,
                        count: VectorCount | None = None) -> list[tuple[Tensor, Tensor]]:
    """``steps`` Lanczos steps from each column of ``V0 [P, b]`` (normalised here), all
    columns sharing each block HVP; returns per column ``(α [m], β [m-1])`` of ``T_m``.

    ``reorth``: full reorthogonalisation of each column against its own basis (kept,
    ``b · m`` vectors); otherwise the plain three-term recurrence (``3b`` vectors).

    Model-sharded (inside :func:`~sam_probe.core.inner.sharded`): ``V0`` holds this rank's rows of the
    probes and every norm and inner product is summed over the ranks (:mod:`.inner`), so every rank
    gets the ``(α, β)`` of the whole probes (one process's, up to the products' rounding)."""
    P, b = V0.shape
    steps = min(steps, inner.size(P))
    count = count if count is not None else VectorCount()
    held = [0]

    def hold(x: int) -> None:
        held[0] += x
        count.add(x)

    def drop(x: int) -> None:
        held[0] -= x
        count.sub(x)

    try:
        q = V0 / inner.colnorms(V0)[None, :]
        hold(b)
        basis: list[Tensor] = []  # reorth: [b, P] per step, allocated as the steps happen
        q_prev: Tensor | None = None
        alphas = torch.zeros(b, steps, dtype=torch.float64)
        betas = torch.zeros(b, steps, dtype=torch.float64)
        length = [steps] * b
        active = list(range(b))
        prev_beta = torch.zeros(b, dtype=V0.dtype, device=V0.device)
        for j in range(steps):
            if reorth:
                basis.append(q.T.contiguous())
                hold(b)
            if len(active) == b:
                W = matmat(q).to(q)
            else:
                W = torch.zeros_like(q)
                W[:, active] = matmat(q[:, active]).to(q)
            hold(b)
            a = coldots(W, q).to(q)
            alphas[active, j] = a[active].double().cpu()
            for c in range(b):
                W[:, c].add_(q[:, c], alpha=-float(a[c]))
                if q_prev is not None:
                    W[:, c].add_(q_prev[:, c], alpha=-float(prev_beta[c]))
            if reorth:
                for _ in range(2):  # full reorthogonalisation, each column against its own basis
                    for Bi in basis:
                        d = inner.coldots(Bi.T, W)  # the columns are independent: one reduction per Bi
                        for c in range(b):
                            W[:, c].add_(Bi[c], alpha=-float(d[c]))
            else:  # local: once more against the last two vectors (no extra memory)
                d = inner.coldots(q, W)
                for c in range(b):
                    W[:, c].add_(q[:, c], alpha=-float(d[c]))
                if q_prev is not None:
                    d = inner.coldots(q_prev, W)
                    for c in range(b):
                        W[:, c].add_(q_prev[:, c], alpha=-float(d[c]))
            beta = inner.colnorms(W)
            if j == steps - 1:
                break
            still = []
            for c in active:
                if float(beta[c]) <= 1e-10 * max(float(alphas[c, :j + 1].abs().max()), 1e-300):
                    length[c] = j + 1  # invariant subspace: quadrature exact
                else:
                    still.append(c)
            active = still
            if not active:
                break
            betas[active, j] = beta[active].double().cpu()
            prev_beta = beta
            for c in active:
                W[:, c].div_(beta[c])
            if reorth:
                q = W
                drop(b)
            else:
                if q_prev is not None:
                    drop(b)
                q_prev, q = q, W
        return [(alphas[c, :length[c]], betas[c, :length[c] - 1]) for c in range(b)]
    finally:
        count.sub(held[0])


def gauss_quadrature(alpha: Tensor, beta: Tensor) -> tuple[Tensor, Tensor]:
    """Nodes ``θ`` (eigenvalues of ``T``) and weights ``τ = S_{1·}²`` of a tridiagonal ``T``."""
    T = torch.diag(alpha) + torch.diag(beta, 1) + torch.diag(beta, -1)
    theta, S = torch.linalg.eigh(T)
    return theta, S[0] ** 2


def smoothed_density(nodes: list[Tensor], weights: list[Tensor], grid: Tensor, sigma: float) -> Tensor:
    """``Σ_l Σ_i τ_i N(t; θ_i, σ²) / n_probes`` on ``grid``, normalised to unit trapezoid integral."""
    t = torch.cat(nodes)
    w = torch.cat(weights) / len(nodes)
    phi = (w[None, :] * torch.exp(-0.5 * ((grid[:, None] - t[None, :]) / sigma) ** 2)).sum(1)
    phi = phi / (sigma * (2 * torch.pi) ** 0.5)
    area = torch.trapezoid(phi, grid)
    return phi / area if area > 0 else phi


def slq_density(matmat: Matmat, n: int, *, steps: int = 80, n_probes: int = 5, sigma: float | None = None,
                grid: Tensor | None = None, n_grid: int = 1000, seed: int = 0,
                dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu",
                reorth: bool | None = None, block: int | None = None, max_vectors: int | None = None,
                count: VectorCount | None = None) -> DensityResult:
    """SLQ density with ``n_probes`` seeded Rademacher probes and ``steps`` Lanczos steps each.

    Default ``σ`` = 1% of the Ritz-value range; default grid: ``n_grid`` points over
    ``[min θ - 5σ, max θ + 5σ]``.  HVPs: at most ``steps · n_probes``.  ``reorth`` (default:
    when ``max_vectors``, default ``c``, holds every probe's basis) and ``block`` (probes run
    together) set the memory (module docstring); the probes (:func:`~sam_probe.core.trace.probes`)
    are the same either way.

    Model-sharded (inside :func:`~sam_probe.core.inner.sharded`): ``n`` is this rank's length, each
    rank draws its rows of the probes from its own stream (:func:`~sam_probe.core.inner.generator`),
    and every rank gets the same quadrature (of those global probes).
    """
    gen = inner.generator(seed)
    count = count if count is not None else VectorCount()
    vectors = WORK_VECTORS if max_vectors is None else int(max_vectors)
    if reorth is None:
        reorth = n_probes * (min(steps, inner.size(n)) + 2) <= vectors
    if block is None:
        block = n_probes if reorth else max(1, min(n_probes, vectors // 3))
    counter = [0]

    def counted(V: Tensor) -> Tensor:
        counter[0] += V.shape[1]
        return matmat(V)

    nodes, weights = [], []
    for a in range(0, n_probes, block):
        bb = min(block, n_probes - a)
        with count.hold(bb):
            V0 = probes(n, bb, gen, dtype, device)  # the same probes whatever the block
            tri = lanczos_tridiagonal(counted, V0, steps, reorth=reorth, count=count)
            del V0
        for alpha, beta in tri:
            th, tau = gauss_quadrature(alpha, beta)
            nodes.append(th)
            weights.append(tau)
    allt = torch.cat(nodes)
    lo, hi = float(allt.min()), float(allt.max())
    span = hi - lo if hi > lo else max(abs(hi), 1.0)
    if sigma is None:
        sigma = 0.01 * span
    if grid is None:
        grid = torch.linspace(lo - 5 * sigma, hi + 5 * sigma, n_grid, dtype=torch.float64)
    grid = grid.to(torch.float64).cpu()
    dens = smoothed_density(nodes, weights, grid, sigma)
    return DensityResult(grid, dens, nodes, weights, counter[0], float(sigma), steps)


def curvature_density(op, *, steps: int = 80, n_probes: int = 5, seed: int = 0, reuse_graph: bool = True,
                      **kwargs) -> DensityResult:
    """:func:`slq_density` of a :class:`~sam_probe.core.operators.CurvatureOperator` (an
    objective: its Hessian), in its dtype/device and context (a model-sharded operator's inner
    products summed over its ranks, :mod:`.inner`)."""
    from .operators import as_operator
    from .precision import solver_dtype

    from .lanczos import _plan_of

    op = as_operator(op)
    plan = _plan_of(op)
    if plan is not None and "max_vectors" not in kwargs:
        kwargs["max_vectors"] = max(WORK_VECTORS, int(getattr(plan, "solver_vectors", 0) or 0))
    ctx = op.context() if reuse_graph else contextlib.nullcontext()
    with inner.over(op), ctx:
        res = slq_density(op.matmat, op.P, steps=steps, n_probes=n_probes, seed=seed,
                          dtype=solver_dtype(op.dtype), device=op.device, **kwargs)
    res.curvature = op.name
    return res


hessian_density = curvature_density
