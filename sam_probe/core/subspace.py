"""Persistence of the dominant eigenspace across checkpoints.

For top-k eigenspaces ``V_s, V_t`` (orthonormal ``[P, k]``) of the chosen curvature at
checkpoints ``s`` and ``t`` (docs/metrics.md, "Subspace overlap"):

    overlap(s, t) = ||V_sᵀ V_t||_F² / k  ∈ [0, 1]

(the mean squared cosine of the principal angles: 1 when the spaces coincide, 0 when
orthogonal).  Two independent uniformly random k-dimensional subspaces of ``R^P`` have
``E[overlap] = k / P`` (the chance level).  With different dimensions the smaller one
divides.  Bases are re-orthonormalised (QR in float64) before use, so eigenvectors
stored compressed (float16) are fine.

A k-dimensional eigenspace is only determined when ``λ_k`` is separated from ``λ_{k+1}``
by more than the residuals (Davis–Kahan: ``sin ∠ ≤ ||R||_F / gap``).  At a degenerate or
nearly degenerate boundary (a double eigenvalue, or a relative gap of ``2e-4`` at
``tol = 1e-3``) any k-dimensional slice of the cluster passes the residual test, and an
overlap of such slices says nothing (1.0 or 0.0 by accident, warm and cold solves
disagreeing).  :func:`subspace_persistence` therefore takes ``k`` past such a cluster
(``extend_cluster`` more pairs at most, the solver's ``gap_warning``) so that each
step's space is the span of whole clusters (``k_used`` per step); what is left
unresolved is flagged per step (``gap_warning``) and in ``warnings``.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from . import inner


def orthonormal(V: Tensor) -> Tensor:
    """An orthonormal float64 basis of the columns of ``V [P, k]`` (QR)."""
    V = V.detach().to(torch.float64)
    if V.dim() != 2:
        raise ValueError(f"a basis must be [P, k], got {tuple(V.shape)}")
    if not bool(torch.isfinite(V).all()):
        raise ValueError("basis has non-finite entries (unconverged eigenvectors?)")
    Q, _ = torch.linalg.qr(V)
    return Q


def subspace_overlap(A: Tensor, B: Tensor) -> float:
    """``||Aᵀ B||_F² / min(k_A, k_B)`` of orthonormalised bases ``A``, ``B`` (same ``P``)."""
    if A.shape[0] != B.shape[0]:
        raise ValueError(f"bases live in different spaces: P = {A.shape[0]} and {B.shape[0]}")
    Qa, Qb = orthonormal(A), orthonormal(B)
    k = min(Qa.shape[1], Qb.shape[1])
    return float((Qa.T @ Qb).pow(2).sum()) / k if k else float("nan")


def overlap_matrix(bases: Sequence[Tensor]) -> Tensor:
    """``[T, T]`` matrix of :func:`subspace_overlap` between every pair of ``bases`` (float64).

    Within :func:`~sam_probe.core.inner.sharded` the bases are shards ``[P_r, k]`` (``--shard-model``):
    see :func:`sharded_overlap_matrix`."""
    if inner.active():
        return sharded_overlap_matrix(bases)
    Q = [orthonormal(V) for V in bases]
    T = len(Q)
    out = torch.empty(T, T, dtype=torch.float64)
    for i in range(T):
        for j in range(i, T):
            k = min(Q[i].shape[1], Q[j].shape[1])
            out[i, j] = out[j, i] = float((Q[i].T @ Q[j]).pow(2).sum()) / k
    return out


def sharded_overlap_matrix(bases: Sequence[Tensor]) -> Tensor:
    """:func:`overlap_matrix` of bases held as shards ``V_r [P_r, k]`` over the shard group: from the
    all-reduced Gram matrices ``G_st = V_sᵀ V_t`` alone, ``Q_s = V_s L_s⁻ᵀ`` (``G_ss = L_s L_sᵀ``, Cholesky:
    the same span as QR's ``Q``), so ``Q_sᵀ Q_t = L_s⁻¹ G_st L_t⁻ᵀ`` and nothing parameter-sized is gathered;
    every rank gets the same matrix."""
    V = [b.detach().to(torch.float64) for b in bases]
    bad = inner.allsum(torch.tensor([float(sum(int(not bool(torch.isfinite(b).all())) for b in V))],
                                    dtype=torch.float64))
    if float(bad[0]) > 0:
        raise ValueError("basis has non-finite entries (unconverged eigenvectors?)")
    T = len(V)
    L = [torch.linalg.cholesky(inner.gram(b, b)) for b in V]
    out = torch.empty(T, T, dtype=torch.float64)
    for i in range(T):
        for j in range(i, T):
            k = min(V[i].shape[1], V[j].shape[1])
            G = inner.gram(V[i], V[j])
            M = torch.linalg.solve_triangular(L[i], G, upper=False)  # L_i⁻¹ G
            M = torch.linalg.solve_triangular(L[j], M.T, upper=False).T  # (L_i⁻¹ G) L_j⁻ᵀ
            out[i, j] = out[j, i] = float(M.pow(2).sum()) / k if k else float("nan")
    return out


def chance_overlap(k: int, P: int) -> float:
    """``E[||V_sᵀ V_t||_F² / k] = k / P`` for independent uniformly random k-dimensional subspaces."""
    return k / P


@dataclass
class SubspaceResult:
    """Overlaps of the top-k eigenspaces of several checkpoints."""

    steps: list[int]
    k: int
    overlap: list[list[float]]
    chance: float
    eigenvalues: list[list[float]]
    n_params: int
    curvature: str = "hessian"
    residuals: list[list[float]] = field(default_factory=list)
    n_hvp: list[int] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    k_used: list[int] = field(default_factory=list)  # per step: k, or more when k was taken past a cluster
    gap: list = field(default_factory=list)  # per step: relative gap |λ_k - λ_(k+1)| / |λ_k| (None: unchecked)
    gap_warning: list[bool] = field(default_factory=list)  # per step: the k_used-dim eigenspace is not determined
    subspace_bound: list = field(default_factory=list)  # per step: Davis–Kahan bound on sin of its angle
    cluster: list[list[float]] = field(default_factory=list)  # per step: [λ_k, λ_(k+1)] when flagged
    k_requested: int | None = None  # the k asked for (``k`` is the smallest k_used)

    @property
    def previous(self) -> list[float]:
        """Overlap of each checkpoint with the one before it (NaN for the first)."""
        return [float("nan")] + [self.overlap[i][i - 1] for i in range(1, len(self.steps))]

    def to_dict(self) -> dict[str, Any]:
        return {"steps": list(self.steps), "k": self.k, "overlap": [list(r) for r in self.overlap],
                "chance": self.chance, "eigenvalues": [list(e) for e in self.eigenvalues],
                "previous": self.previous, "n_params": self.n_params, "curvature": self.curvature,
                "residuals": [list(r) for r in self.residuals], "n_hvp": list(self.n_hvp),
                "warnings": list(self.warnings), "k_used": list(self.k_used), "gap": list(self.gap),
                "gap_warning": list(self.gap_warning), "subspace_bound": list(self.subspace_bound),
                "cluster": [list(c) for c in self.cluster], "k_requested": self.k_requested}


def subspace_result(steps: Sequence[int], bases: Sequence[Tensor], eigenvalues: Sequence[Sequence[float]],
                    *, curvature: str = "hessian", residuals: Sequence[Sequence[float]] = (),
                    n_hvp: Sequence[int] = ()) -> SubspaceResult:
    """:class:`SubspaceResult` from already solved (e.g. stored) eigenvectors ``bases[t] [P, k]``."""
    if not bases:
        raise ValueError("no eigenspaces given")
    if len(steps) != len(bases) or len(eigenvalues) != len(bases):
        raise ValueError(f"{len(steps)} steps, {len(bases)} bases and {len(eigenvalues)} eigenvalue lists")
    P, k = bases[0].shape
    differ = any(V.shape[0] != P for V in bases)
    if inner.active():  # shards: every rank must agree (one raising alone would leave the others waiting)
        differ = float(inner.allsum(torch.tensor([float(differ)], dtype=torch.float64))[0]) > 0
        P = inner.size(P)
    if differ:
        raise ValueError("eigenvectors of different parameter counts cannot be compared")
    k = min(V.shape[1] for V in bases)
    return SubspaceResult([int(s) for s in steps], int(k), overlap_matrix(bases).tolist(), chance_overlap(k, P),
                          [[float(x) for x in e] for e in eigenvalues], int(P), curvature,
                          [[float(x) for x in r] for r in residuals], [int(n) for n in n_hvp])


def subspace_persistence(operators: Iterable, steps: Sequence[int], k: int = 10, *, tol: float = 1e-3,
                         max_hvp: int | None = None, seed: int = 0, warm_start: bool = True, block_size: int = 1,
                         extend_cluster: int = 8, where=None) -> tuple[SubspaceResult, list[Tensor]]:
    """Solve the top-k eigenspace of each operator (each warm-started from the previous one's
    Ritz vectors unless ``warm_start=False``) and compare them all.

    ``operators``: :class:`~sam_probe.core.operators.CurvatureOperator` (or objectives), one
    per step, consumed lazily.  ``block_size``: the Lanczos block (at least an expected
    multiplicity finds a whole eigenspace at once); ``extend_cluster``: how many pairs past
    ``k`` a step may take to close a cluster at the boundary (module docstring; 0 = only
    flag it); ``where``: where the Krylov bases live (:mod:`sam_probe.core.vectors`).  Returns
    the result and the eigenvectors (``[P, k_used]`` float CPU tensors, one per step, for
    the store)."""
    from .lanczos import top_eigen

    bases, evals, resid, hvps, warns = [], [], [], [], []
    k_used, gaps, flags, bounds, clusters = [], [], [], [], []
    prev = None
    name = "hessian"
    for step, op in zip(steps, operators):
        eig = top_eigen(op, k, tol=tol, max_hvp=max_hvp, seed=seed, warm=prev if warm_start else None,
                        block_size=block_size, extend_cluster=extend_cluster, where=where)
        name = eig.curvature
        warns += [f"step {step}: {w}" for w in eig.warnings]
        bad = (~torch.isfinite(eig.eigenvectors)).any(0).to(torch.float64)
        good = inner.allsum(bad) == 0 if inner.active() else bad == 0  # shards: a column bad on any rank
        V = eig.eigenvectors[:, good]
        bases.append(V.detach().cpu().clone())
        evals.append(eig.eigenvalues)
        resid.append(eig.residuals)
        hvps.append(eig.n_hvp)
        k_used.append(len(eig.eigenvalues))
        gaps.append(eig.gap)
        flags.append(bool(eig.gap_warning))
        bounds.append(eig.subspace_bound)
        clusters.append(list(eig.cluster))
        prev = V
        del eig
    res = subspace_result(list(steps)[:len(bases)], bases, evals, curvature=name, residuals=resid, n_hvp=hvps)
    res.k_requested = int(k)
    res.k_used, res.gap, res.gap_warning, res.subspace_bound, res.cluster = k_used, gaps, flags, bounds, clusters
    if any(u > k for u in k_used):
        warns.append(f"k taken past a cluster of nearly equal eigenvalues at step(s) "
                     f"{', '.join(str(s) for s, u in zip(steps, k_used) if u > k)} (k_used "
                     f"{k_used}): overlaps of spaces of different dimension divide by the smaller one")
    if any(flags):
        warns.append(f"the top-k eigenspace is not determined at step(s) "
                     f"{', '.join(str(s) for s, f in zip(steps, flags) if f)} (eigenvalue k within the residuals "
                     f"of eigenvalue k+1): overlaps involving them are not meaningful at --tol {tol:g}")
    res.warnings = warns
    return res, bases
