"""Per-layer spectra: the diagonal blocks of a curvature operator, one per parameter group.

For a group ``S`` of parameter entries (one parameter tensor, or one module = the
tensors it owns directly, ``fc1.weight`` and ``fc1.bias`` of ``fc1``) the block is
``A_SS = A[S, S]`` (docs/metrics.md, "Per-layer spectra"); each row reports

- ``top_eigenvalue``: the largest algebraic eigenvalue of ``A_SS`` with its honest relative
  ``residual`` ``||A_SS v - λ v|| / |λ|`` (certified Lanczos on the restricted operator);
- ``trace``: ``tr(A_SS)`` with its standard error ``trace_se`` (Hutch++ on the block);
- ``n_params``: ``|S|``.

A block of at most ``exact_max`` entries is formed densely from ``|S|`` products
instead: its top eigenpair comes from ``eigh`` (residual recomputed from the dense
block) and its trace is exact (``trace_se = 0``).  Every product of a block costs one
product of the full operator.

A model-sharded operator (``--shard-model``, :mod:`sam_probe.core.sharded`) gives blocks of shards
(each rank holds its rows of the tensors, possibly none): the solvers sum their inner products over
the ranks, the size ``|S|`` that chooses dense or Lanczos is the whole block's, and a dense block is
assembled whole on every rank (:func:`~sam_probe.core.dense.dense_matrix`, a symmetric permutation of
one process's block), so every rank takes the same steps and reports the same rows.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .names import GROUPINGS  # noqa: F401 - re-exported


def module_of(name: str) -> str:
    """The module owning parameter ``name`` (``"fc1"`` for ``"fc1.weight"``; ``"(root)"`` at top level)."""
    return name.rsplit(".", 1)[0] if "." in name else "(root)"


def parameter_groups(names: list[str], by: str = "tensor") -> dict[str, list[str]]:
    """``{group: [parameter names]}`` in parameter order: one per tensor, or per owning module."""
    if by not in GROUPINGS:
        raise ValueError(f"per-layer grouping must be one of {', '.join(GROUPINGS)}, got {by!r}")
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(n if by == "tensor" else module_of(n), []).append(n)
    return groups


@dataclass
class LayerSpectrum:
    """One row of :func:`per_layer_spectra` (``to_dict`` gives the JSON row)."""

    name: str
    top_eigenvalue: float
    residual: float
    trace: float
    trace_se: float
    n_params: int
    converged: bool = True
    trace_converged: bool = True
    exact: bool = False
    n_hvp: int = 0
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _dense_block(block, vector_block: int) -> torch.Tensor:
    from .dense import dense_matrix

    return dense_matrix(block, block_size=vector_block)


def per_layer_spectra(op, *, by: str = "tensor", tol: float = 1e-3, max_hvp: int | None = None,
                      trace_tol: float = 1e-2, trace_max_hvp: int = 300, trace_method: str = "hutch++",
                      exact_max: int = 64, vector_block: int = 16, seed: int = 0,
                      where=None) -> list[LayerSpectrum]:
    """Top eigenvalue (with residual) and trace (with SE) of every diagonal block of ``op``.

    ``op``: a :class:`~sam_probe.core.operators.CurvatureOperator` on a parameter space (an
    objective: its Hessian); ``by``: ``tensor`` or ``module`` (:func:`parameter_groups`);
    ``tol``/``max_hvp``: the block eigen solve (:func:`~sam_probe.core.lanczos.top_eigen`,
    ``k = 1``); ``trace_tol``/``trace_max_hvp``/``trace_method``: the block trace
    (:func:`~sam_probe.core.trace.curvature_trace`); blocks of at most ``exact_max`` entries
    are done densely and exactly (module docstring); ``where``: where the solvers' bases live
    (:mod:`sam_probe.core.vectors`).
    """
    from . import inner, precision
    from .lanczos import top_eigen
    from .operators import as_operator
    from .trace import curvature_trace

    op = as_operator(op)
    if op.space is None:
        raise ValueError("per-layer spectra need an operator on a parameter space")
    rows: list[LayerSpectrum] = []
    with inner.over(op), op.context():
        for gname, names in parameter_groups(op.space.names, by).items():
            block = op.restrict(names, label=gname)
            n = inner.size(block.P)  # the whole block's size (block.P: this rank's rows when sharded)
            before = op.n_matvec
            if n <= exact_max:
                B = _dense_block(block, vector_block).double()
                evals, evecs = torch.linalg.eigh(B)
                lam, v = evals[-1], evecs[:, -1]
                res = float((B @ v - lam * v).norm() / lam.abs().clamp_min(1e-300))
                extra = 0
                if precision.is_half(op.dtype):  # B is made of half products: check the pair in float32
                    ref = precision.reference_operator(block)
                    if ref is not None:
                        res, extra = precision.check_pair_in_float32(ref, float(lam), v), 1
                rows.append(LayerSpectrum(gname, float(lam), res, float(torch.trace(B)), 0.0, n,
                                          converged=res <= tol, exact=True, n_hvp=op.n_matvec - before + extra))
                continue
            eig = top_eigen(block, 1, tol=tol, max_hvp=max_hvp, seed=seed, where=where)
            tr = curvature_trace(block, trace_method, tol=trace_tol, max_hvp=trace_max_hvp, seed=seed,
                                 **({"where": where} if trace_method == "hutch++" else {}))
            rows.append(LayerSpectrum(gname, eig.eigenvalues[0], eig.residuals[0], tr.estimate, tr.se, n,
                                      converged=eig.converged[0], trace_converged=tr.converged,
                                      n_hvp=op.n_matvec - before,
                                      warnings=[f"{gname}: {w}" for w in eig.warnings + tr.warnings]))
    return rows
