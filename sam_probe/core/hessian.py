"""The Hessian operator and its product engines (``--hvp``; ``docs/metrics.md``, "Hessian-vector products").

``H V`` for a block ``V`` ``[P, b]`` is the sum over this rank's chunks, all-reduced when sharded,
divided by the term count ``N`` (:attr:`~sam_probe.core.objective.Objective.denominator`):

- :class:`RevRevProducts` (``rev-rev``): per chunk, the graph of ``∇Σℓ`` (``create_graph``) and one
  double-backward pass per vector.  Inside :meth:`RevRevProducts.reuse_graph` the graph is kept
  between products (one chunk, or every chunk jointly with ``keep_graphs``), so a further product is
  one double backward: no forward, no first backward.
- :class:`FwdRevProducts` (``fwd-rev``): ``vmap`` of ``jvp`` of ``grad`` over the block (ops that have
  a forward-mode derivative but no reverse second derivative).
- :class:`FiniteDifferenceProducts` (``fd``): ``D(h) = (∇L(w + hv) − ∇L(w − hv)) / 2h`` at ``h`` and
  ``h/2``, Richardson-extrapolated ``R = (4 D(h/2) − D(h)) / 3`` (error ``O(h⁴)``); first derivatives
  only; where truncation dominates (a kink crossed) retried at ``h/16`` (:func:`extrapolated_difference`).  ``h = ε_dtype^(1/4) · max(rms(w), 0.01) · √P / ‖v‖`` (each weight moves by about
  ``ε^(1/4)`` of its typical size: ``1.2e-4`` in float64, ``1.9e-2`` in float32).  The error estimate
  of a product is ``‖D(h/2) − D(h)‖ / 3 + 4 ε (‖∇L(w + hv/2)‖ + ‖∇L(w − hv/2)‖) / h``: the first term
  is the truncation error of the lower-order ``D(h/2)`` (so it is conservative for ``R``, and it grows
  with kinks such as ReLU's that the steps cross), the second the rounding of the gradients amplified
  by ``1/h``; with ``h ∝ ε^(1/4)`` the first is about ``ε^(1/2)``, well above the rounding ``ε^(3/4)``.
  It is exposed per product as ``last_error`` (``last_product_error`` of the operator).
- ``auto``: ``rev-rev`` when a probe product on two samples succeeds, otherwise ``fd``, said in a
  note (:func:`resolve_auto`).

:class:`HessianOperator` is ``H`` as a :class:`~sam_probe.core.operator_base.CurvatureOperator`: its
products are the objective's (:meth:`~sam_probe.core.objective.Objective.hvp_block`), its
:meth:`~HessianOperator.context` the kept graph.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from .errors import DoubleBackwardError
from .operator_base import CurvatureOperator
from .protocols import ObjectiveLike
from .second_order import check_graph, second_order_error

Params = dict[str, Tensor]


class HessianProducts:
    """``V ↦ H V`` of an objective (``V`` ``[P, b]``, reduced and divided by ``N``); one subclass per method."""

    method = ""
    exact = True

    def __init__(self, obj: ObjectiveLike):
        self.obj = obj
        self.last_error: Tensor | None = None  # [b] error estimates of the last product (inexact methods)
        self.keep_graphs = False

    def matmat(self, V: Tensor, params: Params | None) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def reuse_graph(self) -> contextlib.AbstractContextManager:
        """Kept state between products (nothing by default)."""
        return contextlib.nullcontext()

    def _finish(self, out: Tensor) -> Tensor:
        """``[b, P]`` chunk sums -> ``[P, b]`` reduced and divided (in ``out``'s memory: no second
        parameter-sized vector per column)."""
        return self.obj.reduce(out).div_(self.obj.denominator).T.contiguous()


class RevRevProducts(HessianProducts):
    """Double backward, with the kept first-order graph (module docstring)."""

    method = "rev-rev"

    def __init__(self, obj: ObjectiveLike):
        super().__init__(obj)
        self._reuse = False
        self.graph_cache: tuple | None = None
        self._checked = False

    def grad_graph(self, p: Params, chunks) -> tuple[list[Tensor], list[Tensor], list[int], Tensor]:
        """Leaves ``w``, the differentiable gradient ``∇Σℓ`` of the summed loss of ``chunks`` (each its own
        forward pass: its own BatchNorm batch in train mode), the indices of the gradient entries that
        depend on ``w`` (others are 0 in ``H``), and the loss."""
        obj = self.obj
        leaves = [p[k].detach().requires_grad_(True) for k in obj.space.names]
        with torch.enable_grad():
            named = dict(zip(obj.space.names, leaves))
            parts = [obj.chunk_loss(named, x, y) for x, y in chunks]
            loss = parts[0] if len(parts) == 1 else torch.stack(parts).sum()
            try:
                g = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
            except RuntimeError as exc:
                raise (second_order_error(exc, self.method, loss) or exc) from None
        if not self._checked:
            check_graph(loss, self.method)
            self._checked = True
        live = [i for i, gi in enumerate(g) if gi is not None and gi.requires_grad]
        return leaves, [g[i] for i in live], live, loss

    def from_graph(self, graph: tuple, Vt: Tensor, retain: bool) -> Tensor:
        """``[b, P]`` rows ``(H_chunk v)ᵀ`` by one double-backward pass per row of ``Vt``."""
        leaves, g, live, loss = graph
        space = self.obj.space
        if not g:
            return torch.zeros_like(Vt)
        out = torch.empty_like(Vt)  # every slice is written below: no zero fill of P entries
        sl = list(space.slices().values())
        for j in range(Vt.shape[0]):
            vj = space.unflatten(Vt[j])
            try:
                hv = torch.autograd.grad(g, leaves, grad_outputs=[vj[space.names[i]] for i in live],
                                         retain_graph=retain or j < Vt.shape[0] - 1, allow_unused=True)
            except RuntimeError as exc:
                raise (second_order_error(exc, self.method, loss) or exc) from None
            for s, h in zip(sl, hv):
                if h is None:
                    out[j, s] = 0
                else:
                    out[j, s] = h.reshape(-1)
        return out

    @contextlib.contextmanager
    def reuse_graph(self) -> Iterator[None]:
        prev = self._reuse
        self._reuse = True
        try:
            yield
        finally:
            self._reuse = prev
            if not prev:
                self.graph_cache = None

    def cached_graph(self) -> tuple | None:
        """The kept first-order graph inside :meth:`reuse_graph` (one chunk, or every chunk jointly with
        ``keep_graphs``), or ``None``."""
        obj = self.obj
        if not self._reuse or obj.n_local == 0:
            return None
        if obj.chunk_size < obj.n_local and not self.keep_graphs:
            return None
        if self.graph_cache is None:
            with obj.mode():
                self.graph_cache = self.grad_graph(obj.params, obj.chunks())
        return self.graph_cache

    def matmat(self, V: Tensor, params: Params | None) -> Tensor:
        obj = self.obj
        Vt = V.T.contiguous()
        cached = self.cached_graph() if params is None else None
        if cached is not None:
            out = self.from_graph(cached, Vt, retain=True)
        else:
            p = obj.params if params is None else params
            out = torch.zeros_like(Vt)
            with obj.mode():
                for x, y in obj.chunks():
                    out += self.from_graph(self.grad_graph(p, [(x, y)]), Vt, retain=False)
        return self._finish(out)


class FwdRevProducts(HessianProducts):
    """``vmap`` of ``jvp`` of ``grad`` per chunk (module docstring)."""

    method = "fwd-rev"

    def __init__(self, obj: ObjectiveLike):
        super().__init__(obj)
        self._checked = False

    def matmat(self, V: Tensor, params: Params | None) -> Tensor:
        from torch.func import grad, jvp, vmap

        obj = self.obj
        p = obj.params if params is None else params
        Vt = V.T.contiguous()
        Vd = obj.space.unflatten(Vt)
        out = torch.zeros_like(Vt)
        g_fn = grad(obj.chunk_loss)
        with obj.mode():
            for x, y in obj.chunks():
                if not self._checked:
                    with torch.enable_grad():
                        check_graph(obj.chunk_loss({k: t.detach().requires_grad_(True) for k, t in p.items()}, x, y),
                                    self.method)
                    self._checked = True

                def one(v: Params, x: Any = x, y: Any = y) -> Params:
                    return jvp(lambda q: g_fn(q, x, y), (p,), (v,))[1]

                try:
                    out += obj.space.flatten_batched(vmap(one)(Vd))
                except (RuntimeError, NotImplementedError) as exc:
                    raise (second_order_error(exc, self.method) or exc) from None
        return self._finish(out)


FD_SHRINK = 16  # a retried step is h / 16
FD_TRIES = 4  # at most this many step sizes per product


def extrapolated_difference(diff, h: float, eps: float, norms) -> tuple[Tensor, float, int]:
    """``(R, error estimate, tries)``: the Richardson product ``R = (4 D(h/2) − D(h)) / 3`` from
    ``diff(h) -> (D(h), ‖g₊‖ + ‖g₋‖)``, its error ``‖D(h/2) − D(h)‖/3 + 4 ε size / h`` (``norms(a, b)``:
    the vectors' 2-norms, summed over shards in one reduction when sharded, :func:`.inner.norms`).

    On a smooth loss the truncation part is ``O(h²)`` (about ``ε^½`` of ``‖R‖`` at the default
    step).  When it exceeds ``ε^⅓ ‖R‖`` instead (the steps crossed a kink, e.g. a ReLU whose input
    changes sign) the product is retried at ``h / 16``, up to :data:`FD_TRIES` step sizes, while
    the estimate improves; the product with the smallest estimate is returned."""
    best: tuple[Tensor, float] | None = None
    tries = 0
    for _ in range(FD_TRIES):
        tries += 1
        d1, _ = diff(h)
        d2, size = diff(h / 2)
        e = d1.sub_(d2).neg_()  # D(h/2) − D(h), in d1's memory
        R = d2.add_(e, alpha=1 / 3)  # (4 D(h/2) − D(h)) / 3 = D(h/2) + (D(h/2) − D(h)) / 3, in d2's memory
        n_e, n_R = norms(e, R)
        trunc = n_e / 3
        del d1, d2, e
        err = trunc + 4 * eps * size / h
        improved = best is None or err < best[1]
        if improved:
            best = (R, err)
        if not improved or trunc <= eps ** (1 / 3) * n_R:
            break
        h /= FD_SHRINK
    assert best is not None
    return best[0], best[1], tries


def _local_norms(*vs: Tensor) -> list[float]:
    from . import inner

    return [math.sqrt(float(inner.local_sq(v))) for v in vs]


def fd_step(dtype: torch.dtype) -> float:
    """``ε_dtype^(1/4)``: the relative step of the extrapolated central differences."""
    return float(torch.finfo(dtype).eps) ** 0.25


class FiniteDifferenceProducts(HessianProducts):
    """Richardson-extrapolated central differences of gradients (module docstring); first derivatives only."""

    method = "fd"
    exact = False

    def __init__(self, obj: ObjectiveLike, rel_step: float | None = None):
        super().__init__(obj)
        self.rel_step = fd_step(obj.dtype) if rel_step is None else float(rel_step)

    def step(self, w: Tensor, v: Tensor) -> float:
        """``h`` for direction ``v`` at ``w`` (module docstring)."""
        P = w.numel()
        rms = float(torch.linalg.vector_norm(w, dtype=torch.float64)) / math.sqrt(max(P, 1))
        nv = float(torch.linalg.vector_norm(v, dtype=torch.float64))
        return self.rel_step * max(rms, 0.01) * math.sqrt(P) / nv if nv > 0 else 0.0

    def _difference(self, w: Tensor, v: Tensor, h: float) -> tuple[Tensor, float]:
        """``(D(h), ‖g₊‖ + ‖g₋‖)`` (the difference formed in ``g₊``'s memory)."""
        obj = self.obj
        plus = obj.grad_flat(torch.add(w, v, alpha=h), count=False)
        minus = obj.grad_flat(torch.add(w, v, alpha=-h), count=False)
        size = float(torch.linalg.vector_norm(plus, dtype=torch.float64) + torch.linalg.vector_norm(minus, dtype=torch.float64))
        return plus.sub_(minus).div_(2 * h), size

    def matmat(self, V: Tensor, params: Params | None) -> Tensor:
        obj = self.obj
        w = obj.space.flatten(obj.params if params is None else params)
        out = torch.zeros_like(V)
        err = torch.zeros(V.shape[1], dtype=torch.float64)
        for j in range(V.shape[1]):
            v = V[:, j]
            h = self.step(w, v)
            if h == 0.0:
                continue
            eps = float(torch.finfo(V.dtype).eps)
            out[:, j], err[j], _ = extrapolated_difference(lambda hh, v=v: self._difference(w, v, hh), h, eps,
                                                           _local_norms)
        self.last_error = err
        return out


ENGINES: dict[str, type[HessianProducts]] = {"rev-rev": RevRevProducts, "fwd-rev": FwdRevProducts,
                                             "fd": FiniteDifferenceProducts}


def double_backward_problem(obj: ObjectiveLike, n: int = 2) -> str | None:
    """Why exact products fail on ``obj`` (one ``rev-rev`` product on its first ``n`` samples), or ``None``."""
    x, y = obj.first_chunk(n)
    probe = RevRevProducts(obj)
    v = torch.ones(obj.space.size, dtype=obj.dtype, device=obj.device).reshape(1, -1)
    try:
        with obj.mode():
            probe.from_graph(probe.grad_graph(obj.params, [(x, y)]), v, retain=False)
    except (RuntimeError, NotImplementedError, DoubleBackwardError) as exc:
        return str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
    return None


def resolve_auto(obj: ObjectiveLike) -> tuple[str, str | None]:
    """``('rev-rev', None)`` when double backward works on ``obj``, else ``('fd', note)``."""
    problem = double_backward_problem(obj)
    if problem is None:
        return "rev-rev", None
    return "fd", (f"Hessian-vector products by finite differences of gradients (hvp auto): the model has no "
                  f"double backward ({problem})")


# ------------------------------------------------------------ the operator
class HessianOperator(CurvatureOperator):
    """``H = ∇²L(w)`` through ``obj.hvp_block``; :meth:`context` is ``obj.reuse_graph()``."""

    def __init__(self, obj: Any, reuse_graph: bool = True):
        super().__init__("hessian", obj.space.size, obj.dtype, obj.device, obj.space)
        self.obj = obj
        self.reuse_graph = reuse_graph

    @property
    def exact(self) -> bool:  # type: ignore[override]
        return self.obj.hessian_products.exact

    def _matmat(self, V: Tensor) -> Tensor:
        out = self.obj.hvp_block(V)
        self.last_product_error = self.obj.hessian_products.last_error
        return out

    def context(self):
        return self.obj.reuse_graph() if self.reuse_graph else contextlib.nullcontext()
