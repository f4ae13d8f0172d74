"""The order check of :func:`~sam_probe.core.lanczos.lanczos`: is there an eigenvalue beyond ``θ_k``
that the solve did not see?  A probabilistic certificate from a fresh random start.

After the solve, ``Y`` (``k`` orthonormal Ritz vectors, ``θ_1 … θ_k``) is fixed and the rest of
the spectrum is that of the deflated operator ``H₂ = (I − YYᵀ) A (I − YYᵀ)`` on ``span(Y)⊥``.
A missed eigenvalue beyond ``θ_k`` is then the extreme eigenvalue of ``H₂``.  Plain Lanczos
(three-term recurrence, deflated against ``Y`` at every product, no other stored vectors) runs on
``H₂`` from a seeded Gaussian ``q₁`` uniform on the unit sphere of ``span(Y)⊥`` (dimension ``n``).

**Why a small residual is not enough.**  The extreme Ritz pair ``(ξ, x)`` of the first steps is a
Rayleigh quotient of an almost random vector: in ``10⁷`` dimensions its residual is about
``‖A‖_F / sqrt(n)``, far below ``10⁻² |θ_k|``, while ``ξ`` sits in the bulk of the spectrum.  A
residual says that *an* eigenvalue lies near ``ξ``, not the largest.

**The bound used instead** (after van Dorsselaer, Hochstenbach & van der Vorst, 2000).  Let
``χ_m(λ) = Π_i (λ − ξ_i)`` be the characteristic polynomial of the ``m × m`` Lanczos matrix
``T_m`` (its roots: the Ritz values ``ξ_i``).  In exact arithmetic ``χ_m(H₂) q₁ = β_1 ⋯ β_m q_{m+1}``
(``β_j``: the off-diagonal coefficients, the last one the norm of the next residual), so for
every eigenpair ``(λ, v)`` of ``H₂``, ``|vᵀq₁| |χ_m(λ)| ≤ β_1 ⋯ β_m``.  For a fixed unit vector ``v``
and ``q₁`` uniform on the sphere, ``P(|vᵀq₁| < t) ≤ t sqrt(2n/π)``.  So with probability at least
``1 − δ`` (``t = δ sqrt(π / 2n)``) the top eigenvalue of ``H₂`` satisfies
``|χ_m(λ_max)| ≤ β_1 ⋯ β_m / t``; beyond the largest Ritz value ``|χ_m|`` increases, so
``λ_max(H₂) ≤ U``, the root of ``Σ_i log(U − ξ_i) = Σ_j log β_j − log t`` above ``ξ_1``.  The event
that fails is one fixed event (a small component of ``q₁`` on one fixed eigenvector), so checking
the bound after every step costs no extra probability.  ``SA`` mirrors it (``L`` below the
smallest Ritz value); ``LM`` bounds both ends, each at ``δ / 2``.

Outcomes: ``pass`` when the bound is within ``order_tol |θ_k|`` of ``θ_k`` (``U ≤ θ_k + order_tol
|θ_k|`` for ``LA``; ``order_tol = max(tol, 10⁻²)`` by default): with probability ``≥ 1 − δ`` no
eigenvalue beyond ``θ_k`` was missed by more than that (asking for ``tol`` itself costs little
more on a well separated boundary and without bound on a cluster at ``θ_k``: the polynomial must
grow by ``1/t`` between the cluster and the threshold).  ``miss`` when a Ritz value of ``H₂`` lies
beyond ``θ_k + tol |θ_k|`` (a certain finding: a Ritz value never exceeds ``λ_max(H₂)``); a second
pass regenerates the same sequence and returns its extreme Ritz vector, so the solve can take that
eigenvalue in (``m - 1`` more products).
``budget`` when the products allowed run out first.  When the Krylov space of ``q₁`` becomes
invariant (``β_m ≈ 0``), its Ritz values are eigenvalues of ``H₂`` and ``U = ξ_1``.

The bound holds in exact arithmetic; in floating point the recurrence loses orthogonality only
once a Ritz value converges to about ``sqrt(ε)``, below the level this check needs.  Memory: three
parameter-sized vectors (``q_{j-1}, q_j`` and the product) beside ``Y``; four during a second pass.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from . import inner
from .vectors import VectorCount, VectorStore

DELTA = 1e-3  # failure probability of the order check (the bound at each end uses δ, LM's at δ/2)
ORDER_TOL = 1e-2  # the resolution of the order: no eigenvalue beyond θ_k (1 + max(tol, ORDER_TOL)) is missed


@dataclass
class CheckOutcome:
    """What the order check found (module docstring)."""

    status: str  # "pass", "miss" or "budget"
    products: int  # operator products used (a miss's second pass included)
    guard: float | None = None  # ξ: the extreme Ritz value of H₂ (wanted end)
    guard_residual: float | None = None  # its absolute residual estimate β_m |s_m|
    bound: float | None = None  # U: no eigenvalue of H₂ beyond it, with probability ≥ 1 − δ
    delta: float = DELTA
    vector: Tensor | None = None  # miss: the extreme Ritz vector of H₂ ([n], unit length)
    order_tol: float | None = None  # the resolution of the pass


def beyond(ritz: list[float], log_betas: float, log_t: float, upper: bool = True) -> float:
    """``U > max(ritz)`` with ``Σ log(U − ξ_i) = log_betas − log_t`` (``upper``), or
    ``L < min(ritz)`` with ``Σ log(ξ_i − L) = …``: the level no eigenvalue with a component of
    at least ``t`` in the start vector can pass (module docstring).  ``log_betas = -inf``
    (an invariant Krylov space) gives the extreme Ritz value itself."""
    xs = [x if upper else -x for x in ritz]
    top = max(xs)
    rhs = log_betas - log_t
    if rhs == -math.inf:
        return top if upper else -top
    m = len(xs)
    lo, hi = 0.0, math.exp(rhs / m)  # every U − ξ_i >= U − top: at top + exp(rhs/m) the sum is >= rhs
    while sum(math.log(top + hi - x) for x in xs) < rhs:  # rounding guard
        hi *= 2
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid <= lo or mid >= hi:
            break
        if sum(math.log(top + mid - x) for x in xs) < rhs:
            lo = mid
        else:
            hi = mid
    return top + hi if upper else -(top + hi)


def deflated_check(matmat: Callable[[Tensor], Tensor], Y: VectorStore, theta_k: float, which: str, tol: float,
                   n: int, gen: torch.Generator, max_products: int, dtype: torch.dtype,
                   device: torch.device | str, count: VectorCount | None = None,
                   delta: float = DELTA, separation: float = 0.0, order_tol: float | None = None) -> CheckOutcome:
    """Lanczos on ``(I − YYᵀ) A (I − YYᵀ)`` from a fresh Gaussian drawn from ``gen`` until the
    bound passes, a Ritz value lies beyond ``θ_k``, or ``max_products`` products are spent
    (module docstring).  ``n``: the local length of a vector; ``Y``: the ``k`` Ritz vectors.

    ``order_tol`` (default ``max(tol, ORDER_TOL)``): the pass asks ``U`` within ``order_tol |θ_k|``
    of ``θ_k``; a Ritz value beyond ``θ_k`` by more than ``tol |θ_k|`` is a miss whatever it is.
    ``separation``: once the order is shown, go on until the bound is that far inside ``θ_k``
    (what the Davis–Kahan bound of the caller needs), for at most as many more steps as the
    order took (at least 4), and not at all once the guard ``ξ`` is within ``separation`` of
    ``θ_k`` (``U`` lies beyond ``ξ``, and ``ξ`` only moves outward): a cluster at the boundary
    never gets there."""
    from .lanczos import _gaussian, _key

    count = count if count is not None else VectorCount()
    N = inner.size(n) - len(Y)  # dimension of span(Y)⊥
    if N <= 0:
        return CheckOutcome("pass", 0, delta=0.0)
    two_sided = which == "LM"
    log_t = math.log(delta / (2 if two_sided else 1)) + 0.5 * math.log(math.pi / (2 * N))
    ot = max(tol, ORDER_TOL) if order_tol is None else float(order_tol)
    edge = _key(theta_k, which)  # θ_k's distance toward the wanted end; beyond it by r |θ_k|: edge + r |θ_k|

    state = gen.get_state()

    def start() -> Tensor:
        q = _gaussian(n, 1, gen, dtype, device)[:, 0]
        Y.orthogonalise(q[:, None])
        return q.div_(inner.norm(q))

    def step(q: Tensor, q_prev: Tensor | None, beta_prev: float) -> tuple[Tensor, float, float]:
        """``(w, α, β)``: one deflated Lanczos step; ``w`` (unnormalised) is the next direction."""
        w = matmat(q[:, None]).to(device=device, dtype=dtype)[:, 0]
        Y.orthogonalise(w[:, None])
        alpha = inner.dot(q, w)
        w.add_(q, alpha=-alpha)
        if q_prev is not None:
            w.add_(q_prev, alpha=-beta_prev)
        c = inner.dot(q, w)  # one local reorthogonalisation against q (rounding in α)
        w.add_(q, alpha=-c)
        return w, alpha + c, inner.norm(w)

    alphas: list[float] = []
    betas: list[float] = []
    count.add(1)
    q = start()
    q_prev: Tensor | None = None
    status, guard, guard_res, bound = "budget", None, None, None
    s_ext: Tensor | None = None
    passed_at = 0  # steps when the order was shown
    while len(alphas) < min(max_products, N):
        count.add(1)
        w, a, b = step(q, q_prev, betas[-1] if betas else 0.0)
        alphas.append(a)
        betas.append(b)
        ritz, S = _ritz_values(alphas, betas)
        m = len(alphas)
        scale = max(abs(x) for x in ritz + [theta_k])
        invariant = b <= 1e-10 * max(scale, 1e-300) or m == N
        log_betas = -math.inf if invariant else sum(math.log(x) for x in betas)
        if which == "LA":
            j, bound = m - 1, beyond(ritz, log_betas, log_t, upper=True)
        elif which == "SA":
            j, bound = 0, beyond(ritz, log_betas, log_t, upper=False)
        else:  # both ends; the one of larger magnitude
            j = m - 1 if abs(ritz[-1]) >= abs(ritz[0]) else 0
            bound = max(beyond(ritz, log_betas, log_t, upper=True), beyond(ritz, log_betas, log_t, upper=False),
                        key=abs)
        guard, guard_res = ritz[j], b * abs(float(S[-1, j]))
        inside = _key(bound, which)
        if _key(guard, which) > edge + tol * abs(theta_k):  # a Ritz value beyond θ_k: a missed eigenvalue
            status, s_ext = "miss", S[:, j].clone()
        elif inside <= edge + ot * abs(theta_k):
            passed_at = passed_at or m
            # ξ only moves outward as m grows (the eigenvalues of T_m interlace those of T_{m+1}) and U lies
            # beyond ξ: once θ_k − ξ is short of the separation asked for, no later step can reach it
            out_of_reach = edge - _key(guard, which) < separation
            if edge - inside >= separation or m - passed_at >= max(4, passed_at) or out_of_reach:
                status = "pass"
        if status != "budget" or invariant:
            del w
            count.sub(1)
            break
        if q_prev is not None:
            count.sub(1)
        q_prev, q = q, w.div_(b)
    count.sub(1 + (q_prev is not None))
    del q, q_prev
    if status == "budget" and passed_at:
        status = "pass"  # the order was shown; the separation asked for was not reached
    products = len(alphas)
    vector = None
    if status == "miss" and s_ext is not None and products + (products - 1) <= max_products:
        gen.set_state(state)
        vector = _second_pass(step, start, s_ext, betas, count)
        products += len(alphas) - 1
    return CheckOutcome(status, products, guard, guard_res, bound, delta, vector, ot)


def _ritz_values(alphas: list[float], betas: list[float]) -> tuple[list[float], Tensor]:
    """Eigenvalues (ascending) and eigenvectors of the Lanczos matrix ``T_m`` (float64)."""
    T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if len(alphas) > 1:
        off = torch.tensor(betas[:len(alphas) - 1], dtype=torch.float64)
        T += torch.diag(off, 1) + torch.diag(off, -1)
    evals, S = torch.linalg.eigh(T)
    return evals.tolist(), S


def _second_pass(step, start, s: Tensor, betas: list[float], count: VectorCount) -> Tensor:
    """``x = Σ_j s_j q_j`` over the Lanczos vectors regenerated from the same seed (the caller
    restored the generator; the recorded ``β`` keep the sequence the same), normalised:
    ``len(s) - 1`` products."""
    count.add(2)
    q = start()
    x = q.mul(float(s[0]))
    q_prev: Tensor | None = None
    for j in range(1, len(s)):
        count.add(1)
        w, _, _ = step(q, q_prev, betas[j - 2] if j > 1 else 0.0)
        x.add_(w.div_(betas[j - 1]), alpha=float(s[j]))
        if q_prev is not None:
            count.sub(1)
        q_prev, q = q, w
    count.sub(2 + (q_prev is not None))
    return x.div_(inner.norm(x))
