"""Half precision: the model in bfloat16/float16, the solvers' arithmetic in float32.

With a half ``dtype`` the objective's parameters, inputs and products are in that dtype
(half the memory of the weights and activations), while every solver keeps its Krylov
basis, dot products, projected matrices and Ritz values in :func:`solver_dtype` (float32):
orthogonality and Ritz values are then accurate to float32, and what limits the numbers is
the products themselves.

*Per-product accuracy.*  A product ``Â v`` computed in a dtype of unit roundoff
``u = ε/2`` (``2^-8`` for bfloat16, ``2^-11`` for float16; :func:`unit_roundoff`) carries
the rounding of ``v`` to the dtype and of every operation of the forward and double
backward passes.  We model its error as

    ``e(v) = c · u · max(‖Â v‖, s ‖v‖)``,   ``c`` = :data:`PRODUCT_ERROR_FACTOR` = 4,

with ``s`` the largest ``‖Â v‖ / ‖v‖`` seen in the solve (a lower bound on ``‖A‖``, so
that pairs at the small end are not credited with an accuracy relative to their own small
eigenvalue).  Measured on tanh/GELU MLPs of 2–6 layers against float64 Hessians of the same
(bfloat16-representable) weights: ``0.7–1.1 u`` for top eigenvectors and ``1–5 u`` relative
to ``‖Hv‖`` for random directions (``1.4 u`` and ``2.1 u`` on a 2-layer GPT-2-style LM).  This is a stated model, not a proof: a residual
``r`` plus ``e(y)`` certifies an eigenvalue within ``(r + e(y))`` of ``θ`` as long as the
products are accurate to ``e``.

*What is certified* is decided in float32: the model can be badly wrong (a width-4 GPT-2
amplifies rounding ~70x), so :func:`certify_in_float32` checks each returned pair with a
product of a float32 twin of the operator on a float32 twin of the objective
(:func:`reference_operator`: Hessian, GGN, MC Fisher, empirical Fisher, ``hessian-ggn`` and
their per-layer blocks) and reports the half products' measured error.

*What can be asked.*  The solver's residual and ``e(y)`` add up, so a relative residual
tolerance below :func:`min_tol` ``= 2 c u`` (``2^-5 ≈ 0.031`` for bfloat16, ``2^-8 ≈
0.0039`` for float16) cannot be certified and is refused (:func:`check_tol`).
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from .errors import SpecError, opt

HALF = (torch.bfloat16, torch.float16)
PRODUCT_ERROR_FACTOR = 4.0  # c: a half-precision product is accurate to c·u relative (module docstring)
TOL_FACTOR = 2.0  # the smallest tolerance: TOL_FACTOR times the product error (room for the solver's own)


def as_dtype(dtype: Any) -> torch.dtype:
    """A ``torch.dtype`` from a dtype or its name (``"bfloat16"``)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    out = getattr(torch, str(dtype).replace("torch.", ""), None)
    if not isinstance(out, torch.dtype):
        raise ValueError(f"not a dtype: {dtype!r}")
    return out


def dtype_name(dtype: Any) -> str:
    return str(as_dtype(dtype)).replace("torch.", "")


def is_half(dtype: Any) -> bool:
    """Whether ``dtype`` is bfloat16 or float16."""
    return as_dtype(dtype) in HALF


def solver_dtype(dtype: Any) -> torch.dtype:
    """The dtype of the solvers' arithmetic for a model in ``dtype``: float32 for half dtypes."""
    d = as_dtype(dtype)
    return torch.float32 if d in HALF else d


def unit_roundoff(dtype: Any) -> float:
    """``u = ε/2``: the relative rounding error of one operation (2^-8 for bfloat16, 2^-24 for float32)."""
    return float(torch.finfo(as_dtype(dtype)).eps) / 2


def product_accuracy(dtype: Any) -> float:
    """``c · u``: the modelled relative accuracy of one product in ``dtype`` (module docstring)."""
    return PRODUCT_ERROR_FACTOR * unit_roundoff(dtype)


def min_tol(dtype: Any) -> float | None:
    """The smallest relative residual tolerance ``dtype`` can certify (``None``: not limited here)."""
    return TOL_FACTOR * product_accuracy(dtype) if is_half(dtype) else None


def check_tol(tol: float, dtype: Any, option: str = "tol") -> None:
    """Refuse a residual tolerance below what products in ``dtype`` can certify (one line, neutral)."""
    floor = min_tol(dtype)
    if floor is not None and tol < floor:
        name = dtype_name(dtype)
        raise SpecError(f"{name} products are accurate to about {PRODUCT_ERROR_FACTOR:g}·2^{_exp(dtype)} = "
                        f"{product_accuracy(dtype):.2g} relative, so a residual below {floor:.2g} cannot be "
                        f"certified; pass {opt(option, f'{_up(floor)}')} or more, or {opt('dtype', 'float32')}",
                        option=option, value=tol)


def _exp(dtype: Any) -> int:
    import math

    return int(round(math.log2(unit_roundoff(dtype))))


def _up(x: float) -> str:
    """``x`` rounded up to two significant digits (a tolerance that passes)."""
    import math

    e = math.floor(math.log10(x)) - 1
    return f"{math.ceil(x / 10 ** e - 1e-9) * 10 ** e:.2g}"


def info(dtype: Any) -> dict[str, Any]:
    """What a result states about its precision (JSON-ready)."""
    d = as_dtype(dtype)
    return {"model_dtype": dtype_name(d), "solver_dtype": dtype_name(solver_dtype(d)),
            "unit_roundoff": unit_roundoff(d), "product_accuracy": product_accuracy(d), "min_tol": min_tol(d)}


class RoundingModel:
    """``e(v) = c u max(‖Â v‖, s ‖v‖)`` per column (module docstring), ``s`` the largest ratio seen.

    :meth:`observe` wraps a ``matmat`` so every product updates ``s``; the instance is the
    ``product_error(V, AV)`` hook of :func:`~sam_probe.core.lanczos.lanczos`."""

    def __init__(self, dtype: Any):
        self.rel = product_accuracy(dtype)
        self.scale = 0.0

    def observe(self, matmat: Any) -> Any:
        def wrapped(V: Tensor) -> Tensor:
            out = matmat(V)
            vn = V.double().norm(dim=0) if V.dim() == 2 else V.double().norm().reshape(1)
            on = out.double().norm(dim=0) if out.dim() == 2 else out.double().norm().reshape(1)
            ok = vn > 0
            if bool(ok.any()):
                self.scale = max(self.scale, float((on[ok] / vn[ok]).max()))
            return out

        return wrapped

    def __call__(self, V: Tensor, AV: Tensor) -> Tensor:
        an = AV.double().norm(dim=0).cpu()
        vn = V.double().norm(dim=0).cpu()
        return self.rel * torch.maximum(an, self.scale * vn)


def reference_operator(op: Any) -> Any:
    """A float32 twin of a half-precision curvature operator, on the objective's float32 twin
    (:meth:`~sam_probe.core.objective.Objective.in_dtype`), or ``None`` where there is none (then the
    certificates rest on :class:`RoundingModel`).

    Every registered curvature has one: the Hessian, the GGN (same closed form or autograd output
    Hessian), the MC Fisher (the same ``S`` draws of the same seeded noise, rounded to the half dtype
    as the half operator used it, so the twin is the float32 model's Fisher with the same random
    numbers), the empirical Fisher (output-space form: no per-sample cache), ``hessian-ggn``, and the
    diagonal blocks of any of them (per-layer spectra)."""
    from .empirical_fisher import EmpiricalFisherOperator
    from .fisher import FisherOperator
    from .ggn import GGNOperator
    from .hessian import HessianOperator
    from .hessian_minus_ggn import HessianMinusGGNOperator
    from .operator_base import BlockOperator

    if type(op) is BlockOperator:
        parent = reference_operator(op.parent)
        return None if parent is None else BlockOperator(parent, op.index, op.label)
    kind = type(op)
    obj = getattr(op, "obj", None)
    if kind is HessianMinusGGNOperator:
        obj = op.hessian.obj
    if obj is None or not hasattr(obj, "in_dtype"):
        return None
    obj32 = obj.in_dtype(torch.float32)
    if kind is HessianOperator:
        return HessianOperator(obj32, reuse_graph=False)
    if kind is GGNOperator:
        return GGNOperator(obj32, closed_form=op.closed_form)
    if kind is FisherOperator:
        twin = FisherOperator(obj32, mc_samples=op.mc_samples, seed=op.seed, tol=op.tol)
        twin.noise_dtype = op.dtype
        return twin
    if kind is EmpiricalFisherOperator:
        return EmpiricalFisherOperator(obj32, per_sample=False, terms=op.terms)
    if kind is HessianMinusGGNOperator:
        return HessianMinusGGNOperator(obj32, reuse_graph=False)
    return None


def check_pair_in_float32(ref: Any, theta: float, y: Tensor) -> float:
    """``‖A₃₂ y − θ y‖ / |θ|`` for one pair (one float32 product of ``ref``)."""
    y = y.reshape(-1, 1).to(torch.float32)
    a32 = ref.matmat(y).to(torch.float32)
    return float((a32 - theta * y).double().norm()) / (abs(theta) if theta else 1.0)


def certify_in_float32(op: Any, ref: Any, theta: list[float], Y: Tensor, tol: float) -> dict[str, Any]:
    """Residuals of the half-precision Ritz pairs ``(θ_j, y_j)`` from float32 products (``ref``):
    ``‖A₃₂ y − θ y‖ / |θ|`` (what is certified), and the measured relative error of each half product,
    ``‖Â y − A₃₂ y‖ / |θ|`` (``2k`` products: ``k`` of each)."""
    res, perr = [], []
    for j, t in enumerate(theta):
        y = Y[:, j:j + 1].to(torch.float32)
        a32 = ref.matmat(y).to(torch.float32)
        ah = op.matmat(y).to(torch.float32)
        scale = abs(t) if t else 1.0
        res.append(float((a32 - t * y).double().norm()) / scale)
        perr.append(float((ah - a32).double().norm()) / scale)
        del a32, ah
    out: dict[str, Any] = {"residuals": res, "product_errors": perr, "converged": [r <= tol for r in res]}
    bad = [j + 1 for j, r in enumerate(res) if not r <= tol]
    if bad:
        name = dtype_name(op.dtype)
        out["warning"] = (f"eigenpairs {bad}: checked with float32 products, their residuals "
                          f"({', '.join(f'{res[j - 1]:.2g}' for j in bad)}) exceed {opt('tol', f'{tol:g}')}: the "
                          f"{name} products are accurate to only {max(perr):.2g} relative on this model (measured); "
                          f"they are not certified (use {opt('dtype', 'float32')})")
    return out


def upcast_note(tensors: Iterable[Tensor], dtype: Any) -> str | None:
    """``"upcasting 124M bfloat16 parameters to float32: +0.50 GB ..."`` when floating tensors saved in a
    narrower dtype than ``dtype`` are copied into it (the copy's size), else ``None``."""
    d = as_dtype(dtype)
    size = torch.empty((), dtype=d).element_size()
    counts: dict[torch.dtype, int] = {}
    for t in tensors:
        if isinstance(t, Tensor) and t.is_floating_point() and t.element_size() < size:
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    if not counts:
        return None
    n = sum(counts.values())
    saved = " and ".join(dtype_name(k) for k in sorted(counts, key=str))
    half = next((k for k in counts if k in HALF), None)
    hint = f" (pass {opt('dtype', dtype_name(half))} to run in it)" if half is not None else ""
    return f"upcasting {_count(n)} {saved} parameters to {dtype_name(d)}: +{_bytes(n * size)}{hint}"


def _count(n: int) -> str:
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return str(n)


def _bytes(n: float) -> str:
    """Decimal units, from a tenth of each (``0.50 GB``, ``1.84 kB``)."""
    for div, unit in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if n >= div / 10:
            return f"{n / div:.2f} {unit}"
    return f"{int(n)} B"
