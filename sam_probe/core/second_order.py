"""Second-order diagnostics: which operation of a model stops exact Hessian-vector products.

PyTorch reports a missing second derivative as a ``RuntimeError`` naming the op ("the derivative
for 'x' is not implemented", "forward AD with x that does not support it"); a custom autograd
``Function`` whose backward is ``@once_differentiable`` is worse: differentiating through it
*silently* yields no curvature.  :func:`second_order_error` turns the first into a
:class:`~sam_probe.core.errors.DoubleBackwardError` naming the op and the product method that
works instead; :func:`check_graph` refuses the second before any product is trusted.
"""
from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor

from .errors import DoubleBackwardError, opt

_NO_SECOND = (re.compile(r"derivative for (?:aten::)?'?([\w.:]+?)'? is not implemented"),
              re.compile(r"forward AD with (?:aten::)?([\w.:]+) that does not support it"))


def graph_ops(t: Tensor | None, limit: int = 20000, once_only: bool = False) -> list[str]:
    """Names of custom autograd Functions in ``t``'s graph (candidates for a missing double backward);
    ``once_only``: only those whose backward is ``@once_differentiable``."""
    seen: set[Any] = set()
    out: list[str] = []
    stack: list[Any] = [t.grad_fn] if t is not None and t.grad_fn is not None else []
    while stack and len(seen) < limit:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if isinstance(fn, torch.autograd.function.BackwardCFunction):
            fwd = getattr(fn, "_forward_cls", None)
            if once_only and getattr(getattr(fwd, "backward", None), "__wrapped__", None) is None:
                stack.extend(f for f, _ in fn.next_functions)
                continue
            name = type(fn).__name__.removesuffix("Backward")
            if name not in out:
                out.append(name)
        stack.extend(f for f, _ in fn.next_functions)
    return out


def second_order_error(exc: BaseException, method: str, graph_of: Tensor | None = None) -> DoubleBackwardError | None:
    """A :class:`DoubleBackwardError` naming the op when ``exc`` says a derivative is missing, else ``None``."""
    msg = str(exc)
    op = None
    for rx in _NO_SECOND:
        m = rx.search(msg)
        if m:
            op = m.group(1).removesuffix("_backward")
            break
    if "once_differentiable" in msg:
        ops = graph_ops(graph_of, once_only=True) or graph_ops(graph_of)
        what = f"custom autograd function {', '.join(ops)}" if ops else "a custom autograd function"
        return DoubleBackwardError(f"exact Hessian-vector products need the second derivative of {what}, whose "
                                   f"backward is @once_differentiable (differentiating it would silently give no "
                                   f"curvature); use {opt('hvp', 'fd')} (finite differences of gradients) or "
                                   "remove that decorator so its backward is differentiable",
                                   option="hvp", value=method)
    if op is None and "double backward" not in msg.lower():
        return None
    if method == "rev-rev":
        return DoubleBackwardError(f"Hessian-vector products need the second derivative of {op or 'an operation'}, "
                                   f"which PyTorch does not implement; rerun with {opt('hvp', 'fwd-rev')} "
                                   f"(forward-over-reverse) or {opt('hvp', 'fd')} (finite differences)",
                                   option="hvp", value=method)
    return DoubleBackwardError(f"needs the forward-mode derivative of {op or 'an operation'}, which PyTorch does "
                               f"not implement; use {opt('hvp', 'rev-rev')} or {opt('hvp', 'fd')}",
                               option="hvp", value=method)


def check_graph(loss: Tensor, method: str) -> None:
    """Refuse ``@once_differentiable`` functions in ``loss``'s graph (no curvature through them)."""
    if graph_ops(loss, once_only=True):
        raise second_order_error(RuntimeError("once_differentiable"), method, loss)  # type: ignore[misc]
