"""Operators of the form ``(1/N) Σ_chunks Jᵀ M J``: the model's Jacobian around an output-space matrix.

``J = ∂f/∂w`` of one chunk is never formed: ``J V`` is a ``jvp`` (``vmap``-ed over the block), ``Jᵀ U``
a ``vjp``; ``M`` (``[b, *out.shape] -> [b, *out.shape]``) is the subclass's
:meth:`OutputSpaceOperator.output_product`, usually built from the loss object's output Hessian or its
sampled output gradients (:mod:`sam_probe.core.losses`).  Inside :meth:`~OutputSpaceOperator.context`
an objective of one chunk keeps its forward graph between products (like the Hessian's kept graph):
``J V`` is then the transpose of ``u ↦ Jᵀ u`` (a double backward) and a product runs no forward.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from .errors import CurvatureError, opt
from .operator_base import CurvatureOperator
from .protocols import ObjectiveLike


def batch_size(tree: Any) -> int:
    from torch.utils._pytree import tree_leaves

    return int(next(t for t in tree_leaves(tree) if isinstance(t, Tensor)).shape[0])


class OutputSpaceOperator(CurvatureOperator):
    """``(1/N) Σ_chunks Jᵀ M J`` for an output-space matrix ``M`` of each chunk (module docstring)."""

    def __init__(self, name: str, obj: ObjectiveLike):
        super().__init__(name, obj.space.size, obj.dtype, obj.device, obj.space)
        self.obj = obj
        self.loss = obj.loss_obj
        if not self.loss.from_outputs:
            raise CurvatureError(f"{name} needs a loss of the model's outputs; {opt('loss', 'model')} is computed "
                                 f"inside the model: choose {opt('loss')} ce, lm or a function, or "
                                 f"{opt('curvature', 'hessian')}", option="curvature", value=name)
        self.vector_block = getattr(obj, "vector_block", None)
        self._keep = False
        self._graph: tuple | bool | None = None  # (x, y, out, pull, push) of the single chunk; False: several

    def output_product(self, out: Tensor, y: Tensor | None, JV: Tensor, offset: int, x: Any = None) -> Tensor:
        """``M JV`` for ``JV`` ``[b, *out.shape]``; ``offset`` = global index of the chunk's first sample."""
        raise NotImplementedError  # pragma: no cover - abstract

    @contextlib.contextmanager
    def _kept(self) -> Iterator[None]:
        prev = self._keep
        self._keep = True
        try:
            yield
        finally:
            self._keep = prev
            if not prev:
                self._graph = None

    def context(self):
        return self._kept()

    def _single_chunk_graph(self):
        if self._graph is None:
            from torch.func import vjp
            from torch.utils._pytree import tree_map

            obj = self.obj
            chunks = list(obj.chunks())
            if len(chunks) != 1:
                self._graph = False
            else:
                x, y = chunks[0]
                with obj.mode():
                    out, pull = vjp(lambda q: obj.outputs(q, x), obj.params)
                _, push = vjp(pull, tree_map(torch.zeros_like, out))
                self._graph = (x, y, out, pull, push)
        return self._graph

    def jacobian_products(self, V: Tensor) -> Iterator[tuple[Any, Tensor | None, Tensor, Tensor, Any, int]]:
        """Per local chunk ``(x, y, out, J V, pull, offset)``: outputs, ``[b, *out.shape]`` Jacobian products,
        the ``vjp`` ``u ↦ Jᵀ u`` and the chunk's global offset (the kept graph inside :meth:`context`)."""
        from torch.func import jvp, vjp, vmap

        obj, space = self.obj, self.obj.space
        p = obj.params
        Vd = space.unflatten(V.T.contiguous())  # {name: [b, *shape]}
        offset = getattr(obj, "lo", 0)
        kept = self._single_chunk_graph() if self._keep else None
        if kept:
            x, y, out, pull, push = kept
            yield x, y, out, vmap(lambda v: push((v,))[0])(Vd), pull, offset
            return
        with obj.mode():
            for x, y in obj.chunks():
                def f(q, x=x):
                    return obj.outputs(q, x)

                JV = vmap(lambda v: jvp(f, (p,), (v,))[1])(Vd)  # first: its primal is freed before the vjp's
                out, pull = vjp(f, p)  # type: ignore[misc]  # torch.func.vjp without has_aux: (out, pull)
                yield x, y, out, JV, pull, offset
                offset += batch_size(out)

    def _matmat(self, V: Tensor) -> Tensor:
        vb = self.vector_block
        if vb and V.shape[1] > vb:
            return torch.cat([self._matmat(V[:, s:s + vb]) for s in range(0, V.shape[1], vb)], dim=1)
        from torch.func import vmap

        obj, space = self.obj, self.obj.space
        acc = torch.zeros(V.shape[1], self.P, dtype=self.dtype, device=self.device)
        for x, y, out, JV, pull, offset in self.jacobian_products(V):
            acc += space.flatten_batched(vmap(pull)(self.output_product(out, y, JV, offset, x))[0])
        return (obj.reduce(acc) / obj.denominator).T.contiguous()
