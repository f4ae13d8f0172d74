"""Curvature operators: symmetric ``P × P`` matrices of an objective, only ever applied to blocks.

With ``L(w) = (1/N) Σ_t ℓ_t`` over the loss terms (``N`` = ``obj.denominator``), ``J = ∂f/∂w`` and
``H_ℓ = ∂²ℓ/∂f²`` (``docs/metrics.md``, "Curvature operators"), each registered in
:data:`~sam_probe.core.registry.CURVATURE_REGISTRY` with its class:

- ``hessian`` :class:`~sam_probe.core.hessian.HessianOperator`: ``H = ∇²L(w)`` by the ``--hvp`` engine;
- ``ggn`` :class:`~sam_probe.core.ggn.GGNOperator`: ``(1/N) Σ Jᵀ H_ℓ J``;
- ``fisher`` :class:`~sam_probe.core.fisher.FisherOperator`: the MC Fisher, labels drawn from the model;
- ``ef`` / ``ef-token`` :class:`~sam_probe.core.empirical_fisher.EmpiricalFisherOperator`: the empirical
  Fisher, one gradient per sample / per loss term;
- ``hessian-ggn`` :class:`~sam_probe.core.hessian_minus_ggn.HessianMinusGGNOperator`: ``H − G``.

Every product is the sum over this rank's chunks, all-reduced when sharded, divided by ``N``.
:meth:`~sam_probe.core.operator_base.CurvatureOperator.restrict` gives the diagonal block of named
parameter tensors (or a flat slice).  Adding an operator: one class and one registry entry.
"""
from __future__ import annotations

import inspect
from typing import Any

from .empirical_fisher import EmpiricalFisherOperator  # noqa: F401 - re-exported
from .errors import CurvatureError, opt
from .fisher import FisherOperator  # noqa: F401 - re-exported
from .ggn import GGNOperator  # noqa: F401 - re-exported
from .hessian import HessianOperator
from .hessian_minus_ggn import HessianMinusGGNOperator  # noqa: F401 - re-exported
from .names import CURVATURES  # noqa: F401 - re-exported
from .operator_base import BlockOperator, CurvatureOperator, MatrixOperator  # noqa: F401 - re-exported
from .output_space import OutputSpaceOperator  # noqa: F401 - re-exported
from .registry import CURVATURE_REGISTRY


def curvature_operator(obj, name: str = "hessian", **kwargs: Any) -> CurvatureOperator:
    """The operator ``name`` (one of :data:`CURVATURES`) of an objective.

    ``kwargs`` go to the operator's class when it takes them (``mc_samples``, ``seed``, ``tol`` for
    ``fisher``; ``reuse_graph`` for ``hessian``; ``closed_form`` for ``ggn``; ``per_sample``,
    ``cache_bytes`` for ``ef``), so callers may pass the options of every operator alike; an option
    no registered operator takes is an error.
    """
    try:
        entry = CURVATURE_REGISTRY.get(name)
    except ValueError as exc:
        raise CurvatureError(str(exc), option="curvature", value=name) from None
    if getattr(obj, "shard_group", None) is not None:  # a model-sharded objective (core/sharded.py)
        if name != "hessian":
            raise CurvatureError(f"{opt('curvature')} {name} with {opt('shard_model')}: a sharded model gives "
                                 "Hessian products only (finite differences of gradients)", option="curvature",
                                 value=name)
        return obj.hessian()
    cls = entry.load()
    accepted = inspect.signature(cls.__init__).parameters
    known = {p for e in CURVATURE_REGISTRY for p in inspect.signature(e.load().__init__).parameters}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise TypeError(f"curvature_operator() got unexpected options {unknown}")
    return cls(obj, **{**{k: v for k, v in kwargs.items() if k in accepted}, **entry.options})


def as_operator(x) -> CurvatureOperator:
    """An operator as is; an objective as its Hessian operator (what the solvers accept)."""
    if isinstance(x, CurvatureOperator):
        return x
    if hasattr(x, "hvp_block") and hasattr(x, "space"):
        return HessianOperator(x)
    raise TypeError(f"expected a CurvatureOperator or an Objective, got {type(x).__name__}")
