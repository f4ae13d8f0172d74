"""The empirical Fisher ``EF = (1/N) Σ_i g_i g_iᵀ`` with the observed labels (``docs/metrics.md``).

``terms='sample'`` (``--curvature ef``): ``g_i = ∇_w Σ_{t ∈ i} ℓ_t``, one gradient per *sample* (for a
token loss, a sequence's summed token losses; ``N`` is still the term count, so that ``EF`` and the
GGN share a scale).  ``terms='token'`` (``ef-token``): ``g_t = ∇_w ℓ_t``, one gradient per *loss term*
(per token for ``lm`` and token-level ``ce``; the same as ``sample`` for per-sample losses).

Two exact ways to apply it:

- per-sample gradients ``G = [g_i]`` (``torch.func.vmap(grad)``, chunked) kept in memory when they fit
  ``cache_bytes``; a product is then ``Gᵀ (G V)``;
- the output-space form ``Σ_i J_iᵀ q_i (q_iᵀ J_i V)`` with ``q = ∂Σℓ/∂f`` (per term: ``Σ_t J_tᵀ q_t
  q_tᵀ J_t``), which needs no per-sample pass: exact also when BatchNorm in train mode couples the
  samples of a chunk (single-sample gradients would change the batch statistics), for per-term EF,
  and for models ``vmap`` cannot trace (data-dependent control flow in many Hugging Face models: the
  operator falls back to it and says so in :attr:`EmpiricalFisherOperator.notes`).
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor

from .errors import CurvatureError
from .model_calls import is_batchnorm
from .output_space import OutputSpaceOperator
from .protocols import ObjectiveLike

TERMS = ("sample", "token")


class EmpiricalFisherOperator(OutputSpaceOperator):
    """``EF`` (module docstring).

    ``per_sample``: ``None`` (default) keeps per-sample gradients when they fit ``cache_bytes``, no
    BatchNorm runs in train mode and ``vmap`` can trace the model; ``True`` requires them; ``False``
    always uses the output-space form.  ``terms``: ``'sample'`` or ``'token'``."""

    def __init__(self, obj: ObjectiveLike, per_sample: bool | None = None, cache_bytes: int = 2 ** 28,
                 terms: str = "sample"):
        if terms not in TERMS:
            raise CurvatureError(f"terms must be one of {TERMS}, got {terms!r}", option="curvature")
        super().__init__("ef" if terms == "sample" else "ef-token", obj)
        self.terms = terms
        self.notes: list[str] = []
        itemsize = torch.empty(0, dtype=obj.dtype).element_size()
        n_local = getattr(obj, "n_local", None)
        coupled = getattr(obj, "bn_mode", "eval") == "train" and any(is_batchnorm(m) for m in obj.model.modules())
        fits = n_local is not None and n_local * self.P * itemsize <= cache_bytes
        if per_sample and (coupled or terms == "token"):
            raise CurvatureError("per-sample gradients with BatchNorm in train mode would change the batch "
                                 "statistics; use per_sample=False" if coupled else
                                 "per-token gradients are applied in output space; use per_sample=False",
                                 option="curvature", value=self.name)
        self.per_sample = (fits and not coupled and terms == "sample") if per_sample is None else bool(per_sample)
        self._required = bool(per_sample)
        self._G: list[Tensor] | None = None

    def per_sample_gradients(self) -> list[Tensor]:
        """``[B, P]`` per-sample gradients ``g_i`` of every local chunk (``vmap(grad)``), cached."""
        if self._G is None:
            from torch.func import grad, vmap
            from torch.utils._pytree import tree_map

            obj = self.obj

            def one(p, xi, yi):
                xb = tree_map(lambda t: t.unsqueeze(0), xi)
                yb = tree_map(lambda t: t.unsqueeze(0), yi)
                return obj.loss_sum_from_outputs(obj.outputs(p, xb), yb, xb)

            g = vmap(grad(one), in_dims=(None, 0, 0))
            with obj.mode():
                self._G = [obj.space.flatten_batched(g(obj.params, x, y)).detach() for x, y in obj.chunks()]
        return self._G

    def context(self):
        return super().context() if not self.per_sample else contextlib.nullcontext()

    def _matmat(self, V: Tensor) -> Tensor:
        if self.per_sample:
            try:
                Gs = self.per_sample_gradients()
            except (RuntimeError, NotImplementedError, ValueError, TypeError) as exc:
                if self._required:
                    raise
                self.per_sample = False
                why = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
                self.notes.append(f"{self.name}: per-sample gradients by vmap cannot trace this model ({why}); "
                                  "its products use the output-space form J'q q'J, which is exact")
            else:
                acc = torch.zeros(self.P, V.shape[1], dtype=self.dtype, device=self.device)
                for G in Gs:
                    acc += G.T @ (G @ V)
                return self.obj.reduce(acc) / self.obj.denominator
        return super()._matmat(V)

    def output_product(self, out: Tensor, y: Tensor | None, JV: Tensor, offset: int, x: Any = None) -> Tensor:
        loss = self.loss
        q = loss.terms(loss.output_gradient(out, y, x), out, y)  # [B, R, M]
        coef = torch.einsum("brm,vbrm->vbr", q, loss.terms(JV, out, y))
        if self.terms == "sample":
            coef = coef.sum(-1, keepdim=True)
        return loss.untermed(coef.unsqueeze(-1) * q.unsqueeze(0), out, y)
