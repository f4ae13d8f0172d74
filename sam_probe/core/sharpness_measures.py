"""Worst-case and average-case sharpness (Andriushchenko et al. 2023; Foret et al. 2021; Kwon et al. 2021).

With ``T = |w| + η`` elementwise when ``adaptive`` (every entry, biases too) and ``T = 1``
otherwise, ``e = T δ`` (docs/metrics.md, "Sharpness measures"):

- worst case  ``S_max(ρ) = max_{||δ||_p ≤ ρ} L(w + T δ) - L(w)``, ``p ∈ {2, ∞}``, by projected
  gradient ascent in ``δ`` (Auto-PGD, Croce & Hein 2020: momentum 0.75, step size
  ``2ρ`` halved at the checkpoints ``0.22, 0.41, 0.57, ...`` of the run when fewer than
  75% of the steps since the last checkpoint increased the value, or when neither the step
  size nor the best value changed; restarts from the best point), started from the
  one-step SAM point ``δ₀ = ρ T g / ||T g||`` (l2) or ``ρ sign(g)`` (linf).  Steps move
  along ``∇_δ / ||∇_δ||`` (l2) or ``sign(∇_δ)`` (linf); every iterate is projected onto the
  ball, so no evaluated point lies outside it.  The best value seen is reported: a lower
  bound of the true maximum (exact on quadratics in the l2 ball up to the step budget).
  ``steps``: ascent steps after the start (one loss and gradient each),
  ``last_improvement``: the step that found the best value (0: the SAM point itself).
- m-sharpness: the selection is cut into consecutive sub-batches of ``m`` samples, each
  maximised with its own ``δ``; the value is the sample-weighted mean over sub-batches and
  ``last_improvement`` the latest over them.
- average case  ``S_avg(ρ) = E_{δ ~ N(0, ρ²/P · I)} L(w + T δ) - L(w)`` (so ``E||δ||² = ρ²``),
  the mean over ``samples`` seeded draws with its standard error.

Model-sharded objectives (``--shard-model``, :mod:`.sharded`): every vector here is this
rank's shard; norms, maxima and the test for a zero start go through :mod:`.inner` (summed
or maximised over the ranks), so every rank takes the same steps and the ascent equals one
process's.  Gaussian directions are drawn shard by shard from :func:`.inner.generator`
(each rank its own stream), so the average case depends on the ranks only through its draws.
m-sharpness: each sub-batch is a subset of the sharded objective (the same shards, its own samples).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from . import inner

NORMS = ("l2", "linf")
FunGrad = Callable[[Tensor], tuple[float, Tensor]]


# ------------------------------------------------------------ objective access
def value_and_grad(obj, w: Tensor) -> tuple[float, Tensor]:
    """``(L(w), ∇L(w))`` of an objective at flat ``w`` in one pass per chunk (hooks only:
    ``chunks``, ``outputs``, ``loss_sum_from_outputs``, ``mode``, ``_reduce``, ``denominator``); a
    model-sharded objective's own (``w`` and the gradient: this rank's shards)."""
    from torch.func import grad_and_value

    if _sharded(obj):
        return obj.value_and_grad(w)
    p = obj.space.unflatten(w.to(device=obj.device, dtype=obj.dtype))

    def chunk_loss(q, x, y):
        return obj.loss_sum_from_outputs(obj.outputs(q, x), y, x)

    gv = grad_and_value(chunk_loss)
    acc = torch.zeros(obj.space.size + 1, dtype=obj.dtype, device=obj.device)  # [∇Σℓ, Σℓ]
    with obj.mode():
        for x, y in obj.chunks():
            g, v = gv(p, x, y)
            acc[:-1] += obj.space.flatten(g)
            acc[-1] += v.detach()
    if hasattr(obj, "n_grad"):
        obj.n_grad += 1
    acc = obj._reduce(acc) / obj.denominator
    return float(acc[-1]), acc[:-1]


def _sharded(obj) -> bool:
    return getattr(obj, "shard_group", None) is not None


def _flat_weights(obj) -> Tensor:
    """``w`` flat (a model-sharded objective: this rank's shard)."""
    return obj.flat_params() if _sharded(obj) else obj.space.flatten(obj.params)


def _any_nonzero(v: Tensor) -> bool:
    """Whether any entry of the whole vector (all ranks' shards) is non-zero."""
    local = bool((v != 0).any())
    if not inner.active():
        return local
    return bool(inner.allmax(torch.tensor([float(local)], dtype=torch.float64))[0] > 0)


def _max_abs(v: Tensor) -> float:
    """``max |v_i|`` over the whole vector (all ranks' shards; 0 for an empty one)."""
    local = v.abs().max().reshape(1).to(torch.float64) if v.numel() else torch.zeros(1, dtype=torch.float64)
    return float(inner.allmax(local)[0]) if inner.active() else float(local[0])


def adaptive_scale(w: Tensor, eta: float) -> Tensor:
    """``T = |w| + η`` elementwise."""
    return w.abs() + eta


# ------------------------------------------------------------------ ascent
def apgd_checkpoints(steps: int) -> list[int]:
    """Auto-PGD's step-size checkpoints ``ceil(p_j · steps)``, ``p = 0.22, 0.41, 0.57, ...``."""
    p = [0.0, 0.22]
    while p[-1] < 1:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    marks = (math.ceil(round(q * steps, 9)) for q in p[1:])
    return sorted({min(steps, c) for c in marks if c >= 1})


def project(d: Tensor, rho: float, norm: str) -> Tensor:
    """Projection onto ``{||d||_p ≤ ρ}`` (the result never lies outside, rounding included)."""
    if norm == "linf":
        return d.clamp(-rho, rho)
    n = inner.norm(d)
    if n > rho:
        d = d * (rho / n)
        while inner.norm(d) > rho:
            d = d * (1 - 4 * torch.finfo(d.dtype).eps)
    return d


def _direction(g: Tensor, norm: str) -> Tensor:
    if norm == "linf":
        return torch.sign(g)
    n = inner.norm(g)
    return g / n if n > 0 else torch.zeros_like(g)


@dataclass
class AscentResult:
    value: float
    delta: Tensor
    start_value: float
    steps: int
    last_improvement: int
    values: list[float]


def apgd(fun: FunGrad, g0: Tensor, rho: float, norm: str = "l2", steps: int = 20, *, seed: int = 0,
         momentum: float = 0.75, success: float = 0.75) -> AscentResult:
    """Maximise ``h(δ)`` over ``||δ||_p ≤ ρ`` from the one-step point ``ρ · dir(g0)``.

    ``fun(δ) -> (h(δ), ∇h(δ))``; ``g0 = ∇h(0)`` (a seeded random direction when it is 0).
    """
    if norm not in NORMS:
        raise ValueError(f"worst-case variant must be one of {', '.join(NORMS)}, got {norm!r}")
    if rho <= 0:
        raise ValueError("rho must be positive")
    d0 = _direction(g0, norm)
    if not _any_nonzero(d0):
        gen = inner.generator(seed)
        d0 = _direction(torch.randn(g0.shape, generator=gen, dtype=torch.float64).to(g0), norm)
    x = project(rho * d0, rho, norm)
    f, g = fun(x)
    start = f
    best_f, best_x, best_g, last = f, x, g, 0
    values = [f]
    eta = 2.0 * rho
    checkpoints = set(apgd_checkpoints(steps)) if steps > 0 else set()
    x_prev = x
    n_up, last_ck, eta_ck, best_ck = 0, 0, eta, best_f
    used = 0
    for k in range(1, steps + 1):
        z = project(x + eta * _direction(g, norm), rho, norm)
        x_new = z if k == 1 else project(x + momentum * (z - x) + (1 - momentum) * (x - x_prev), rho, norm)
        f_new, g_new = fun(x_new)
        used = k
        values.append(f_new)
        if f_new > f:
            n_up += 1
        x_prev, x, f, g = x, x_new, f_new, g_new
        if f_new > best_f:
            best_f, best_x, best_g, last = f_new, x_new, g_new, k
        if k in checkpoints:
            if n_up < success * (k - last_ck) or (eta == eta_ck and best_f == best_ck):
                eta /= 2
                x_prev = x = best_x
                f, g = best_f, best_g
            n_up, last_ck, eta_ck, best_ck = 0, k, eta, best_f
    return AscentResult(best_f, best_x, start, used, last, values)


# ----------------------------------------------------------------- results
@dataclass
class WorstCaseResult:
    """Worst-case sharpness (module docstring); ``to_dict`` gives the result keys."""

    value: float
    steps: int
    last_improvement: int
    start_value: float
    rho: float
    variant: str
    adaptive: bool
    eta: float
    m: int | None
    n_grad: int
    perturbation_norm: float

    def to_dict(self) -> dict[str, Any]:
        return {"worst_case_sharpness": self.value, "worst_case_steps": self.steps,
                "worst_case_last_improvement": self.last_improvement, "worst_case_start": self.start_value,
                "worst_case_rho": self.rho, "worst_case_variant": self.variant, "adaptive": self.adaptive,
                "adaptive_eta": self.eta, "worst_case_m": self.m, "worst_case_n_grad": self.n_grad,
                "worst_case_delta_norm": self.perturbation_norm}


@dataclass
class AverageCaseResult:
    """Average-case sharpness with its standard error over ``samples`` draws."""

    value: float
    se: float
    samples: int
    rho: float
    adaptive: bool
    eta: float
    seed: int

    def to_dict(self) -> dict[str, Any]:
        return {"average_case_sharpness": self.value, "average_case_se": self.se,
                "average_case_samples": self.samples, "average_case_rho": self.rho, "adaptive": self.adaptive,
                "adaptive_eta": self.eta}


# ----------------------------------------------------------------- measures
def _sub_batches(obj, m):
    from .perturb import sub_batches

    return sub_batches(obj, m)


def worst_case_sharpness(obj, rho: float = 0.05, *, variant: str = "l2", adaptive: bool = False,
                         eta: float = 0.01, m: int | None = None, steps: int = 20, seed: int = 0) -> WorstCaseResult:
    """``max_{||δ||_p ≤ ρ} L(w + T δ) - L(w)`` by Auto-PGD from the SAM point (module docstring).

    ``variant``: ``l2`` or ``linf`` ball; ``adaptive``: ``T = |w| + eta``; ``m``: m-sharpness
    over consecutive sub-batches of ``m`` samples; ``steps``: ascent steps per (sub-)batch.
    """
    with inner.over(obj):
        return _worst_case(obj, rho, variant, adaptive, eta, m, steps, seed)


def _worst_case(obj, rho: float, variant: str, adaptive: bool, eta: float, m: int | None, steps: int,
                seed: int) -> WorstCaseResult:
    if variant not in NORMS:
        raise ValueError(f"worst-case variant must be one of {', '.join(NORMS)}, got {variant!r}")
    if steps < 0:
        raise ValueError("steps must be >= 0")
    w = _flat_weights(obj)
    T = adaptive_scale(w, eta) if adaptive else torch.ones_like(w)
    total = start_total = 0.0
    used, last, n_grad, dnorm = 0, 0, 0, 0.0
    for sub, weight in _sub_batches(obj, m):
        L0, g0 = value_and_grad(sub, w)
        counter = [1]

        def fun(d, sub=sub, L0=L0, counter=counter):
            counter[0] += 1
            L, g = value_and_grad(sub, w + T * d)
            return L - L0, T * g

        r = apgd(fun, T * g0, rho, variant, steps, seed=seed)
        total += weight * r.value
        start_total += weight * r.start_value
        used = max(used, r.steps)
        last = max(last, r.last_improvement)
        n_grad += counter[0]
        dn = _max_abs(r.delta) if variant == "linf" else inner.norm(r.delta)
        dnorm = max(dnorm, dn)
        if sub is not obj and hasattr(obj, "n_grad"):
            obj.n_grad += counter[0]
    return WorstCaseResult(total, used, last, start_total, float(rho), variant, bool(adaptive), float(eta),
                           m, n_grad, dnorm)


def average_case_sharpness(obj, rho: float = 0.05, *, samples: int = 20, adaptive: bool = False,
                           eta: float = 0.01, seed: int = 0, directions: Iterable[Tensor] | None = None
                           ) -> AverageCaseResult:
    """Mean of ``L(w + T δ) - L(w)`` over ``samples`` seeded ``δ ~ N(0, ρ²/P · I)`` and its SE.

    ``directions``: ``samples`` standard normal vectors (shards, for a model-sharded objective) used
    in place of the seeded draws (``δ = ρ/√P · direction``)."""
    with inner.over(obj):
        return _average_case(obj, rho, samples, adaptive, eta, seed, directions)


def _average_case(obj, rho: float, samples: int, adaptive: bool, eta: float, seed: int,
                  directions: Iterable[Tensor] | None) -> AverageCaseResult:
    if samples < 2:
        raise ValueError("average-case sharpness needs at least 2 samples for a standard error")
    w = _flat_weights(obj)
    T = adaptive_scale(w, eta) if adaptive else torch.ones_like(w)
    P = inner.size(w.numel())  # the whole model's parameters
    L0 = obj.loss()
    gen = inner.generator(seed)  # this rank's stream when sharded
    draws = iter(directions) if directions is not None else None
    vals = []
    for _ in range(samples):
        z = next(draws) if draws is not None else torch.randn(w.numel(), generator=gen, dtype=torch.float64)
        d = z.to(device=w.device, dtype=w.dtype) * (rho / P ** 0.5)
        vals.append(obj.loss(w + T * d) - L0)
    mean = sum(vals) / samples
    se = math.sqrt(sum((v - mean) ** 2 for v in vals) / (samples - 1) / samples)
    return AverageCaseResult(mean, se, samples, float(rho), bool(adaptive), float(eta), int(seed))
