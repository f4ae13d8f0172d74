"""The Monte-Carlo Fisher ``F̂ = (1/N) Σ_t J_tᵀ [(1/S) Σ_s q_ts q_tsᵀ] J_t`` and its sampling error.

For each loss term ``t`` (a sample, or a token of a token-level loss) and draw ``s``, ``q_ts =
∂ℓ(f_t, ŷ_ts)/∂f`` with ``ŷ_ts`` drawn from the loss's predictive distribution
(:meth:`~sam_probe.core.losses.Loss.sampled_output_gradients`: categorical ``softmax(f)`` over the
class axis for ``ce``/``lm`` with ignored labels left out, ``N(f, C/2 · I)`` for ``mse``, Bernoulli
``σ(f)`` for ``bce``), so ``E[F̂] = G`` (``G / C`` for ``bce``; ``docs/metrics.md``).  Draws are
seeded per block of 1024 global samples and 16 draws: chunking and sharding do not change them, and
the draws of ``S`` samples are the first ``S`` of any larger ``S``.

``F̂`` is a random matrix: the sampling error of anything computed from it is estimated from
independent draws (``docs/metrics.md``, "MC Fisher error"):

- :meth:`FisherOperator.quadratic_form_error`: the standard error of ``vᵀ F̂ v`` as an estimate of
  ``vᵀ F v`` (the per-draw standard deviation of ``(1/N) Σ_t (q_ts · J_t v)²`` over at least 32 draws,
  divided by ``√S``; only ``J v`` is needed).  For a Ritz pair ``(θ, y)`` of ``F̂`` it is the first-order
  sampling error of ``θ``; averaged over probes, the sampling error of a trace estimate.
- :meth:`FisherOperator.product_error`: ``‖F̂ v − F v‖`` estimated from 8 single-draw products.
- ``mc_samples=None``: ``S`` is chosen so that the relative sampling error of ``zᵀ F̂ z`` for 4
  seeded Rademacher probes ``z`` reaches ``tol`` (from 64 pilot draws), within a budget that keeps the
  output-space work of a product at most about 4 Jacobian products (``S ≤ max(64, 4P/M)``, ``M`` outputs
  per sample) and 1024; :attr:`FisherOperator.warning` says when the budget stops short of ``tol``.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..errors import render
from .errors import CurvatureError, opt
from .output_space import OutputSpaceOperator
from .protocols import ObjectiveLike

SAMPLE_BLOCK = 1024  # samples per seeded noise block (chunking-invariant draws)
DRAW_BLOCK = 16  # draws per seeded noise block (nested draws for any S)
PILOT_DRAWS, PILOT_PROBES, ERROR_DRAWS, PRODUCT_GROUPS = 64, 4, 32, 8
MAX_MC_SAMPLES = 1024


def noise(seed: int, lo: int, hi: int, s0: int, s1: int, width: int, kind: str, dtype: torch.dtype,
          device: torch.device) -> Tensor:
    """``[hi - lo, s1 - s0, width]`` draws ``s0..s1-1`` for global samples ``lo..hi-1``: uniform
    (``kind='u'``) or standard normal (``'n'``), from generators seeded per (sample block, draw block)."""
    import numpy as np

    rows = []
    for blk in range(lo // SAMPLE_BLOCK, (hi - 1) // SAMPLE_BLOCK + 1):
        a, b = max(lo, blk * SAMPLE_BLOCK) - blk * SAMPLE_BLOCK, min(hi, (blk + 1) * SAMPLE_BLOCK) - blk * SAMPLE_BLOCK
        cols = []
        for dblk in range(s0 // DRAW_BLOCK, (s1 - 1) // DRAW_BLOCK + 1):
            state = int(np.random.SeedSequence([int(seed), blk, dblk, width]).generate_state(1, np.uint64)[0])
            gen = torch.Generator().manual_seed(state & (2 ** 63 - 1))
            shape = (SAMPLE_BLOCK, DRAW_BLOCK, width)
            z = torch.rand(shape, generator=gen, dtype=torch.float64) if kind == "u" else \
                torch.randn(shape, generator=gen, dtype=torch.float64)
            c, d = max(s0, dblk * DRAW_BLOCK) - dblk * DRAW_BLOCK, min(s1, (dblk + 1) * DRAW_BLOCK) - dblk * DRAW_BLOCK
            cols.append(z[a:b, c:d])
        rows.append(torch.cat(cols, 1))
    return torch.cat(rows).to(device=device, dtype=dtype)


class FisherOperator(OutputSpaceOperator):
    """MC Fisher ``F̂`` with ``mc_samples`` seeded labels per loss term (module docstring).

    ``mc_samples=None`` picks ``S`` for ``tol`` (module docstring); ``S`` is then in
    :attr:`mc_samples` and the pilot's relative error in :attr:`relative_error`."""

    exact = False  # an estimate of the Fisher (its sampling error: quadratic_form_error, product_error)

    def __init__(self, obj: ObjectiveLike, mc_samples: int | None = None, seed: int = 0, tol: float = 1e-3,
                 max_mc_samples: int = MAX_MC_SAMPLES):
        super().__init__("fisher", obj)
        if self.loss.noise is None:
            raise CurvatureError(f"needs a predictive distribution; the loss {self.loss.name!r} has none (ce, lm, "
                                 f"mse, bce): use {opt('curvature', 'ggn')} or {opt('curvature', 'ef')}",
                                 option="curvature", value="fisher")
        if mc_samples is not None and mc_samples < 1:
            raise CurvatureError("mc_samples must be >= 1", option="mc_samples", value=mc_samples)
        self.seed = int(seed)
        self.tol = float(tol)
        self.noise_dtype: torch.dtype | None = None  # draws rounded to this dtype first (a half run's float32 twin)
        self.relative_error: float | None = None
        self.warning: str | None = None
        self.mc_samples = int(mc_samples) if mc_samples is not None else self._choose(max_mc_samples)

    # ----------------------------------------------------------- draws
    def output_gradients(self, out: Tensor, y: Tensor | None, offset: int, s0: int, s1: int) -> Tensor:
        """The sampled ``q`` of draws ``s0..s1-1`` of one chunk, ``[s1 - s0, *out.shape]``."""
        width = self.loss.noise_width(out, y)
        z = noise(self.seed, offset, offset + out.shape[0], s0, s1, width, self.loss.noise or "u",
                  self.noise_dtype or out.dtype, out.device).to(out.dtype)
        return self.loss.sampled_output_gradients(out, y, z)

    def _draw_blocks(self, S: int, out: Tensor):
        per = max(1, min(DRAW_BLOCK * 4, (2 ** 24) // max(1, out.numel())))
        for s0 in range(0, S, per):
            yield s0, min(S, s0 + per)

    def _term_coefficients(self, q: Tensor, JV: Tensor, out: Tensor, y: Tensor | None) -> Tensor:
        """``[s, b, B, R]``: per draw, vector and loss term, ``q_ts · (J v)_t`` over the term's entries."""
        qt, jt = self.loss.terms(q, out, y), self.loss.terms(JV, out, y)
        return torch.einsum("sbrm,vbrm->svbr", qt, jt)

    def output_product(self, out: Tensor, y: Tensor | None, JV: Tensor, offset: int, x: Any = None) -> Tensor:
        loss = self.loss
        acc = None
        for s0, s1 in self._draw_blocks(self.mc_samples, out):
            q = self.output_gradients(out, y, offset, s0, s1)
            part = torch.einsum("svbr,sbrm->vbrm", self._term_coefficients(q, JV, out, y), loss.terms(q, out, y))
            del q
            acc = part if acc is None else acc.add_(part)
        assert acc is not None  # at least one draw
        return loss.untermed(acc.div_(self.mc_samples), out, y)

    # ----------------------------------------------------- sampling error
    def draw_quadratic_forms(self, V: Tensor, n_draws: int, first: int = 0) -> Tensor:
        """``[n_draws, b]``: ``vᵀ F̂_s v = (1/N) Σ_t (q_ts · J_t v)²`` of single draws ``s = first, ...``
        (one Jacobian product per vector, no transpose; counted in ``n_matvec``)."""
        obj = self.obj
        V = V.to(device=self.device, dtype=self.dtype)
        acc = torch.zeros(n_draws, V.shape[1], dtype=torch.float64, device=self.device)
        for _x, y, out, JV, _, offset in self.jacobian_products(V):
            for s0, s1 in self._draw_blocks(n_draws, out):
                q = self.output_gradients(out, y, offset, first + s0, first + s1)
                acc[s0:s1] += self._term_coefficients(q, JV, out, y).double().pow(2).sum((2, 3))
        self.n_matvec += V.shape[1]
        return obj.reduce(acc) / obj.denominator

    def quadratic_form_error(self, V: Tensor) -> Tensor:
        """``[b]`` standard errors of ``vᵀ F̂ v`` against ``vᵀ F v`` (module docstring)."""
        if V.dim() == 1:
            V = V.reshape(-1, 1)
        Q = self.draw_quadratic_forms(V, max(ERROR_DRAWS, self.mc_samples))
        return (Q.std(0) / math.sqrt(self.mc_samples)).cpu()

    def trace_sampling_error(self, n_probes: int = 8) -> float:
        """Standard error of ``tr(F̂)`` against ``tr(F)``: the spread over single draws of their
        Hutchinson trace estimates with ``n_probes`` seeded Rademacher probes (conservative: the probes'
        own noise adds to the spread), over ``√S``."""
        g = torch.Generator().manual_seed(self.seed + 104729)
        Z = (torch.randint(0, 2, (self.P, n_probes), generator=g) * 2 - 1).to(self.dtype)
        Q = self.draw_quadratic_forms(Z, max(ERROR_DRAWS, self.mc_samples))
        return float(Q.mean(1).std() / math.sqrt(self.mc_samples))

    def product_error(self, V: Tensor) -> Tensor:
        """``[b]`` estimates of ``‖F̂ v − F v‖``: the spread of 8 single-draw products over ``√S``."""
        from torch.func import vmap

        if V.dim() == 1:
            V = V.reshape(-1, 1)
        obj, space, G = self.obj, self.obj.space, PRODUCT_GROUPS
        V = V.to(device=self.device, dtype=self.dtype)
        b = V.shape[1]
        acc = torch.zeros(G, b, self.P, dtype=self.dtype, device=self.device)
        for _x, y, out, JV, pull, offset in self.jacobian_products(V):
            q = self.output_gradients(out, y, offset, 0, G)
            coef = self._term_coefficients(q, JV, out, y)  # [G, b, B, R]
            U = torch.einsum("svbr,sbrm->svbrm", coef, self.loss.terms(q, out, y))
            U = self.loss.untermed(U.reshape(G * b, *U.shape[2:]), out, y)
            acc += space.flatten_batched(vmap(pull)(U)[0]).reshape(G, b, self.P)
        self.n_matvec += G * b
        acc = obj.reduce(acc) / obj.denominator
        spread = (acc - acc.mean(0)).double().pow(2).sum(-1).sum(0) / (G - 1)  # trace of the per-draw covariance
        return (spread.sqrt() / math.sqrt(self.mc_samples)).cpu()

    def _choose(self, cap: int) -> int:
        """``S`` for :attr:`tol` from a pilot (module docstring)."""
        g = torch.Generator().manual_seed(self.seed + 7919)
        Z = (torch.randint(0, 2, (self.P, PILOT_PROBES), generator=g) * 2 - 1).to(self.dtype)
        Q = self.draw_quadratic_forms(Z, PILOT_DRAWS, first=0)
        mean = Q.mean(0).abs().clamp_min(1e-300)
        rel = float((Q.std(0) / mean).max())
        outputs = self._outputs_per_sample()
        budget = max(1, min(cap, max(64, (4 * self.P) // max(1, outputs))))
        need = max(1, math.ceil((rel / self.tol) ** 2)) if self.tol > 0 else budget
        S = min(need, budget)
        self.relative_error = rel / math.sqrt(S)
        if self.relative_error > self.tol:
            head = (f"the MC Fisher's sampling error is about {self.relative_error:.1%} of its quadratic forms with "
                    f"{S} label draws, above the tolerance {self.tol:g}; ")
            tail = (f"its expectation is the GGN ({opt('curvature', 'ggn')}), exact for this loss"
                    if self.loss.fisher_scale() == 1.0 else f"raise {opt('mc_samples')}")
            self.warning = render(head + tail)
        return S

    def _outputs_per_sample(self) -> int:
        x, _ = self.obj.first_chunk(1)
        with self.obj.mode(), torch.no_grad():
            out = self.obj.outputs(self.obj.params, x)
        return int(out[0].numel())
