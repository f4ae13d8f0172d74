"""Persistence of the dominant eigenspace across checkpoints.

For top-k eigenspaces ``V_s, V_t`` (orthonormal ``[P, k]``) of the chosen curvature at
checkpoints ``s`` and ``t`` (docs/metrics.md, "Subspace overlap"):

    overlap(s, t) = ||V_sᵀ V_t||_F² / k  ∈ [0, 1]

(the mean squared cosine of the principal angles: 1 when the spaces coincide, 0 when
orthogonal).  Two independent uniformly random k-dimensional subspaces of ``R^P`` have
``E[overlap] = k / P`` (the chance level).  With different dimensions the smaller one
divides.  Bases are re-orthonormalised (QR in float64) before use, so eigenvectors
stored compressed (float16) are fine.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


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
    """``[T, T]`` matrix of :func:`subspace_overlap` between every pair of ``bases`` (float64)."""
    Q = [orthonormal(V) for V in bases]
    T = len(Q)
    out = torch.empty(T, T, dtype=torch.float64)
    for i in range(T):
        for j in range(i, T):
            k = min(Q[i].shape[1], Q[j].shape[1])
            out[i, j] = out[j, i] = float((Q[i].T @ Q[j]).pow(2).sum()) / k
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

    @property
    def previous(self) -> list[float]:
        """Overlap of each checkpoint with the one before it (NaN for the first)."""
        return [float("nan")] + [self.overlap[i][i - 1] for i in range(1, len(self.steps))]

    def to_dict(self) -> dict[str, Any]:
        return {"steps": list(self.steps), "k": self.k, "overlap": [list(r) for r in self.overlap],
                "chance": self.chance, "eigenvalues": [list(e) for e in self.eigenvalues],
                "previous": self.previous, "n_params": self.n_params, "curvature": self.curvature,
                "residuals": [list(r) for r in self.residuals], "n_hvp": list(self.n_hvp),
                "warnings": list(self.warnings)}


def subspace_result(steps: Sequence[int], bases: Sequence[Tensor], eigenvalues: Sequence[Sequence[float]],
                    *, curvature: str = "hessian", residuals: Sequence[Sequence[float]] = (),
                    n_hvp: Sequence[int] = ()) -> SubspaceResult:
    """:class:`SubspaceResult` from already solved (e.g. stored) eigenvectors ``bases[t] [P, k]``."""
    if not bases:
        raise ValueError("no eigenspaces given")
    if len(steps) != len(bases) or len(eigenvalues) != len(bases):
        raise ValueError(f"{len(steps)} steps, {len(bases)} bases and {len(eigenvalues)} eigenvalue lists")
    P, k = bases[0].shape
    if any(V.shape[0] != P for V in bases):
        raise ValueError("eigenvectors of different parameter counts cannot be compared")
    k = min(V.shape[1] for V in bases)
    return SubspaceResult([int(s) for s in steps], int(k), overlap_matrix(bases).tolist(), chance_overlap(k, P),
                          [[float(x) for x in e] for e in eigenvalues], int(P), curvature,
                          [[float(x) for x in r] for r in residuals], [int(n) for n in n_hvp])


def subspace_persistence(operators: Iterable, steps: Sequence[int], k: int = 10, *, tol: float = 1e-3,
                         max_hvp: int | None = None, seed: int = 0,
                         warm_start: bool = True) -> tuple[SubspaceResult, list[Tensor]]:
    """Solve the top-k eigenspace of each operator (each warm-started from the previous one's
    Ritz vectors unless ``warm_start=False``) and compare them all.

    ``operators``: :class:`~sam_probe.core.operators.CurvatureOperator` (or objectives), one
    per step, consumed lazily.  Returns the result and the converged-or-not eigenvectors
    (``[P, k]`` float CPU tensors, one per step, for the store)."""
    from .lanczos import top_eigen

    bases, evals, resid, hvps, warns = [], [], [], [], []
    prev = None
    name = "hessian"
    for step, op in zip(steps, operators):
        eig = top_eigen(op, k, tol=tol, max_hvp=max_hvp, seed=seed, warm=prev if warm_start else None)
        name = eig.curvature
        if not eig.all_converged:
            warns += [f"step {step}: {w}" for w in eig.warnings]
        good = torch.isfinite(eig.eigenvectors).all(0)
        V = eig.eigenvectors[:, good]
        bases.append(V.detach().cpu())
        evals.append(eig.eigenvalues)
        resid.append(eig.residuals)
        hvps.append(eig.n_hvp)
        prev = V
    res = subspace_result(list(steps)[:len(bases)], bases, evals, curvature=name, residuals=resid, n_hvp=hvps)
    res.warnings = warns
    return res, bases
