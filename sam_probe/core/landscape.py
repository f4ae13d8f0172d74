"""Two-dimensional loss landscapes: ``L(w + a d1 + b d2)`` on a grid of ``(a, b)`` (Li et al. 2018).

Directions (each a dict of tensors shaped like the parameters):

* ``random``: Gaussian ``d`` drawn from a seeded CPU generator, rescaled as a whole so that
  ``||d|| = ||w||`` (one scale for the whole model: ``a = 1`` is a step as long as the weights);
* ``filter-normalized``: Gaussian ``d`` with every *filter* rescaled to the norm of the weights'
  filter, ``d_i <- d_i ||w_i|| / ||d_i||`` (Li et al.'s filter normalisation).  A filter is one
  output row of a weight of two or more dimensions (a Linear layer's row, a convolution's output
  channel ``[in, kh, kw]``, an embedding's row).  One-dimensional tensors (biases, BatchNorm/
  LayerNorm scales and shifts) and scalars are *zeroed* by default, as Li et al. do
  (``bias_bn="zero"``), or normalised as one filter per tensor (``bias_bn="per-tensor"``);
* ``top-eigen``: the top-2 Hessian eigenvectors ``v1, v2`` of the existing solver
  (:func:`sam_probe.core.lanczos.top_eigen`), unit length, so ``a`` and ``b`` are distances in
  weight space (PyHessian's workflow).

A zero-norm filter of ``w`` gives a zero direction filter.  Two Gaussian directions are nearly
orthogonal in high dimension, not exactly: :func:`cosine` reports how close.

The loss is evaluated through :meth:`Objective.evaluate` with an explicit perturbed
parameter dict (``functional_call``): the model's weights, ``.grad`` and BatchNorm statistics
are never touched, buffers stay those of ``w``.  Memory: the weights, the two directions and
*one* perturbed copy (re-filled in place for every grid point), i.e. four parameter-sized
copies, plus one forward pass of a chunk; ``top-eigen`` first runs the eigen solve with the
solver's own memory (as ``sharpness --top-k 2``), of which only the two vectors are kept.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Callable

import torch
from torch import Tensor

DIRECTIONS = ("random", "filter-normalized", "top-eigen")
BIAS_BN = ("zero", "per-tensor")
Params = dict[str, Tensor]


def gaussian(params: Mapping[str, Tensor], gen: torch.Generator) -> Params:
    """A standard Gaussian tensor per parameter, drawn on the CPU from ``gen`` (the same numbers on
    any device), in each parameter's dtype and device."""
    return {n: torch.randn(p.shape, generator=gen, dtype=torch.float64).to(device=p.device, dtype=p.dtype)
            for n, p in params.items()}


def _norm(t: Tensor) -> Tensor:
    return torch.linalg.vector_norm(t, dtype=torch.float64)


def global_norm(tensors: Mapping[str, Tensor]) -> float:
    """``||d||`` over every tensor (float64)."""
    return float(sum(float(_norm(t)) ** 2 for t in tensors.values()) ** 0.5)


def filter_normalize(d: Mapping[str, Tensor], w: Mapping[str, Tensor], bias_bn: str = "zero") -> Params:
    """``d`` with each filter (output row) rescaled to the norm of ``w``'s filter: see the module docstring."""
    if bias_bn not in BIAS_BN:
        raise ValueError(f"bias_bn must be one of {BIAS_BN}, got {bias_bn!r}")
    out: Params = {}
    for name, di in d.items():
        wi = w[name]
        if wi.dim() <= 1:
            if bias_bn == "zero":
                out[name] = torch.zeros_like(di)
                continue
            dn, wn = _norm(di), _norm(wi)
            out[name] = di * (wn / dn).to(di.dtype) if dn > 0 else torch.zeros_like(di)
            continue
        rows_d = di.reshape(di.shape[0], -1)
        rows_w = wi.reshape(wi.shape[0], -1)
        dn = torch.linalg.vector_norm(rows_d, dim=1, dtype=torch.float64)
        wn = torch.linalg.vector_norm(rows_w, dim=1, dtype=torch.float64)
        scale = torch.where(dn > 0, wn / torch.where(dn > 0, dn, torch.ones_like(dn)), torch.zeros_like(dn))
        out[name] = (rows_d * scale.to(di.dtype)[:, None]).reshape(di.shape)
    return out


def globally_normalize(d: Mapping[str, Tensor], w: Mapping[str, Tensor]) -> Params:
    """``d`` rescaled as a whole to ``||d|| = ||w||``."""
    dn, wn = global_norm(d), global_norm(w)
    s = wn / dn if dn > 0 else 0.0
    return {n: t * s for n, t in d.items()}


def random_directions(w: Mapping[str, Tensor], kind: str, seed: int, bias_bn: str = "zero") -> tuple[Params, Params]:
    """Two directions of ``kind`` ``random`` or ``filter-normalized`` from one generator seeded by ``seed``."""
    gen = torch.Generator().manual_seed(int(seed))
    d1, d2 = gaussian(w, gen), gaussian(w, gen)
    if kind == "random":
        return globally_normalize(d1, w), globally_normalize(d2, w)
    if kind == "filter-normalized":
        return filter_normalize(d1, w, bias_bn), filter_normalize(d2, w, bias_bn)
    raise ValueError(f"random_directions: kind must be random or filter-normalized, got {kind!r}")


def cosine(d1: Mapping[str, Tensor], d2: Mapping[str, Tensor]) -> float | None:
    """``<d1, d2> / (||d1|| ||d2||)`` (None where a direction is zero)."""
    dot = sum(float(torch.sum(a.double() * d2[n].double())) for n, a in d1.items())
    n1, n2 = global_norm(d1), global_norm(d2)
    return dot / (n1 * n2) if n1 > 0 and n2 > 0 else None


def surface(evaluate: Callable[[Params], tuple[float, float | None]], w: Mapping[str, Tensor],
            d1: Mapping[str, Tensor], d2: Mapping[str, Tensor], alphas: Sequence[float],
            betas: Sequence[float] | None = None) -> tuple[list[list[float]], list[list[float | None]]]:
    """``loss[i][j] = L(w + alphas[i] d1 + betas[j] d2)`` and the accuracy there, from
    ``evaluate(params) -> (loss, accuracy)``; one perturbed copy of ``w`` is re-filled in place
    for every point (``w``, ``d1``, ``d2`` are only read)."""
    betas = list(alphas) if betas is None else list(betas)
    p = {n: t.detach().clone() for n, t in w.items()}
    loss: list[list[float]] = []
    acc: list[list[float | None]] = []
    for a in alphas:
        row_l, row_a = [], []
        for b in betas:
            with torch.no_grad():
                for n, t in p.items():
                    t.copy_(w[n]).add_(d1[n], alpha=float(a)).add_(d2[n], alpha=float(b))
            lo, ac = evaluate(p)
            row_l.append(float(lo))
            row_a.append(ac)
        loss.append(row_l)
        acc.append(row_a)
    return loss, acc


def grid(lo: float, hi: float, n: int) -> list[float]:
    """``n`` evenly spaced coordinates from ``lo`` to ``hi`` (both included)."""
    return [float(lo + (hi - lo) * i / (n - 1)) for i in range(n)]


def lowest(loss: list[list[float]], alphas: Sequence[float], betas: Sequence[float] | None = None
           ) -> tuple[float, list[float]]:
    """The lowest finite loss of the grid and its ``[a, b]`` (NaN and ``[]`` when none is finite)."""
    betas = list(alphas) if betas is None else list(betas)
    best: float = float("nan")
    at: list[float] = []
    for i, row in enumerate(loss):
        for j, v in enumerate(row):
            if v == v and v not in (float("inf"), float("-inf")) and not (best <= v):
                best, at = v, [float(alphas[i]), float(betas[j])]
    return best, at

