"""Alignment of gradients with the dominant eigenspace (docs/metrics.md, "Alignment").

With ``V_k`` the ``[P, k]`` orthonormal top-k eigenvectors of ``H = ∇²L(w)`` (or of
another curvature operator, :mod:`.operators`, named by ``curvature``) and
``P_k = V_k V_kᵀ``:

- ``chi_k(v) = ||P_k v|| / ||v|| = ||V_kᵀ v|| / ||v||`` (NaN for ``v = 0``),
  ``chi_k_sq = chi_k²``, for ``v`` in

  * ``full``: ``g = ∇L(w)`` on the whole selection,
  * ``minibatch``: ``∇L_B(w)`` on a seeded minibatch ``B`` (:func:`minibatch_indices`),
  * ``sam``: the SAM perturbed gradient ``g~ = ∇L(w + e)`` (:mod:`.perturb`),
  * ``update``: ``w - w_prev`` between consecutive checkpoints (when given);

- one-step loss changes at step size ``η`` along ``d = P g`` for
  ``P ∈ {P_k (dom), I - P_k (bulk), I (full)}``:
  ``dL_P = L(w - η P g) - L(w)`` with the second-order prediction
  ``-η gᵀ P g + η²/2 gᵀ P H P g`` (exact when ``L`` is quadratic in ``w``; always the
  Hessian, whichever operator gave ``V_k``: it is a Taylor expansion of ``L``);
- ``eta*_emp`` (:func:`eta_star_empirical`) on a grid of ``η``;
- ``η λ_max`` with ``λ_max`` the top eigenvalue of *that* operator (``lambda_of`` names it) and, for
  ``usam``, ``η λ (1 + ρ λ)``.  The edge of stability at 2 is a statement about the Hessian: only a
  Hessian result compares ``η λ_max`` with it (``edge_of_stability``); for the GGN, Fisher or
  empirical Fisher ``η λ_max`` is that operator's own scale.

The eigenvectors are inputs (e.g. from :mod:`.lanczos`); nothing here solves for them.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import inner
from .objective import Objective
from .perturb import perturbation, perturbed_gradient
from .registry import CURVATURE_REGISTRY

VECTORS = ("full", "minibatch", "sam", "update")
DIRECTIONS = ("dom", "bulk", "full")


# ----------------------------------------------------------------- projections
def check_orthonormal(V: Tensor, tol: float = 1e-3) -> None:
    """Raise ``ValueError`` unless ``||VᵀV - I||_max <= tol``."""
    if V.dim() != 2:
        raise ValueError(f"V_k must be [P, k], got {tuple(V.shape)}")
    G = inner.gram(V, V)
    err = float((G - torch.eye(G.shape[0], dtype=G.dtype, device=G.device)).abs().max()) if G.numel() else 0.0
    if err > tol:
        raise ValueError(f"V_k is not orthonormal (max |VᵀV - I| = {err:.2e} > {tol:g})")


def project(V: Tensor, v: Tensor) -> Tensor:
    """``P_k v = V (Vᵀ v)`` (``Vᵀ v`` summed over the ranks when ``V`` and ``v`` are shards)."""
    return V @ inner.gram(V, v)


def chi(V: Tensor, v: Tensor) -> float:
    """``chi_k(v) = ||Vᵀ v|| / ||v||`` for orthonormal ``V`` (NaN when ``v = 0``)."""
    n = inner.norm(v)
    if n == 0.0 or not math.isfinite(n):
        return float("nan")
    return float(inner.gram(V, v).norm()) / n


def minibatch_indices(n: int, batch_size: int, seed: int = 0) -> Tensor:
    """The first ``batch_size`` entries of ``randperm(n)`` under ``torch.Generator().manual_seed(seed)``."""
    if batch_size <= 0:
        raise ValueError("batch_size must be positive")
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randperm(n, generator=gen)[:min(batch_size, n)]


# ------------------------------------------------------------- loss changes
def loss_changes(obj: Objective, g: Tensor, V: Tensor, eta: float,
                 loss0: float | None = None) -> tuple[dict[str, float], dict[str, float]]:
    """``({dom, bulk, full}: dL, {dom, bulk, full}: second-order prediction)`` at ``w = obj.params``.

    ``d_dom = P_k g``, ``d_bulk = g - P_k g``, ``d_full = g``;
    ``dL = L(w - η d) - L(w)``, ``pred = -η gᵀd + η²/2 dᵀ H d`` (3 HVPs, one block).
    """
    w = obj.flat_params()
    L0 = obj.loss() if loss0 is None else loss0
    dom = project(V, g)
    D = torch.stack([dom, g - dom, g], dim=1)
    sharded: Any = obj
    HD = obj.hvp_block(D) if hasattr(obj, "hvp_block") else sharded.hessian().matmat(D)  # sharded: fd products
    dL, pred = {}, {}
    for j, name in enumerate(DIRECTIONS):
        d = D[:, j]
        dL[name] = obj.loss(w - eta * d) - L0
        pred[name] = float(-eta * inner.dot(g, d) + 0.5 * eta ** 2 * inner.dot(d, HD[:, j]))
    return dL, pred


# ----------------------------------------------------------------- eta star
def default_eta_grid(lambda_max: float | None, eta: float, points: int = 25) -> np.ndarray:
    """Geometric grid with ``η λ_max`` from 0.05 to 5 (around the edge of stability at 2);
    ``η`` · geomspace(0.05, 5) when ``λ_max`` is not positive or unknown."""
    scale = 1.0 / lambda_max if lambda_max is not None and lambda_max > 0 else eta
    return np.geomspace(0.05, 5.0, points) * scale


def eta_star_empirical(obj: Objective, g: Tensor, V: Tensor, etas: Sequence[float]
                       ) -> tuple[float | None, list[float]]:
    """``(eta*_emp, [Δchi(η) for η in etas])``.

    ``Δchi(η) = chi_k(∇L(w - η g)) - chi_k(g)``, the new gradient projected on the SAME
    ``V_k`` (eigenvectors at ``w``; one gradient per grid point).  ``eta*_emp`` is the
    first grid point (in the given order, normally increasing) whose ``sign(Δchi)``
    differs from that of the first grid point (a zero counts as its own sign; NaN
    entries, from a zero gradient, are skipped); ``None`` if the sign never changes.
    """
    w = obj.flat_params()
    c0 = chi(V, g)
    deltas = [chi(V, obj.grad_flat(w - float(e) * g)) - c0 for e in etas]
    s0 = None
    for e, d in zip(etas, deltas):
        if math.isnan(d):
            continue
        if s0 is None:
            s0 = np.sign(d)
        elif np.sign(d) != s0:
            return float(e), deltas
    return None, deltas


# -------------------------------------------------------------------- result
@dataclass
class AlignmentResult:
    """Alignment of one checkpoint with its top-k eigenspace (see module docstring)."""

    k: int
    eigenvalues: list[float]
    chi: dict[str, float]
    chi_sq: dict[str, float]
    dL: dict[str, float]
    dL_pred: dict[str, float]
    eta: float
    eta_star: float | None
    eta_lambda_max: float | None
    eta_lambda_usam: float | None = None
    lambda_max: float | None = None
    loss: float = float("nan")
    eta_grid: list[float] = field(default_factory=list)
    delta_chi: list[float] = field(default_factory=list)
    rho: float = 0.05
    variant: str = "l2"
    batch_size: int | None = None
    seed: int = 0
    curvature: str = "hessian"
    lambda_of: str = "Hessian"  # the operator λ_max (and η λ_max) belongs to, as axes and tables name it
    edge_of_stability: bool = True  # η λ_max is the Hessian's: comparable with the edge of stability at 2

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (floats and lists only)."""
        return asdict(self)


def alignment(
    obj: Objective,
    eigenvectors: Tensor,
    eigenvalues: Sequence[float],
    *,
    eta: float = 0.1,
    vectors: Sequence[str] = VECTORS,
    batch_size: int = 128,
    seed: int = 0,
    rho: float = 0.05,
    variant: str = "l2",
    m: int | None = None,
    asam_eta: float = 0.01,
    prev_params: Tensor | None = None,
    eta_grid: Sequence[float] | None = None,
    ortho_tol: float | None = 1e-3,
    curvature: Any = "hessian",
) -> AlignmentResult:
    """Alignment analysis of ``obj`` at its parameters ``w``.

    ``eigenvectors``: ``[P, k]`` orthonormal (checked to ``ortho_tol``; None skips);
    ``eigenvalues``: the matching ``k`` values, ``λ_max = max``.
    ``eta``: the step size of the one-step loss changes and of ``η λ_max`` (e.g. the
    checkpoint's learning rate).  ``vectors``: which of ``full, minibatch, sam, update``
    to report (``update`` needs ``prev_params``, the flat ``w`` of the previous checkpoint;
    it is skipped without one).  ``minibatch``: ``batch_size`` samples drawn by
    :func:`minibatch_indices` with ``seed``.  ``sam``: ``∇L(w + e)`` on the whole
    selection with ``rho, variant, m, asam_eta`` (:func:`~.perturb.perturbed_gradient`).
    ``eta_grid``: for ``eta*_emp``; default :func:`default_eta_grid`; empty skips it.
    ``curvature``: the operator (or its name) whose eigenvectors these are, recorded.
    """
    unknown = set(vectors) - set(VECTORS)
    if unknown:
        raise ValueError(f"unknown vectors {sorted(unknown)}; choose from {', '.join(VECTORS)}")
    with inner.over(obj):  # a model-sharded objective: every vector a shard, products summed over ranks
        return _alignment(obj, eigenvectors, eigenvalues, eta=eta, vectors=vectors, batch_size=batch_size, seed=seed,
                          rho=rho, variant=variant, m=m, asam_eta=asam_eta, prev_params=prev_params,
                          eta_grid=eta_grid, ortho_tol=ortho_tol, curvature=curvature)


def _alignment(obj: Any, eigenvectors: Tensor, eigenvalues: Sequence[float], *, eta: float, vectors: Sequence[str],
               batch_size: int, seed: int, rho: float, variant: str, m: int | None, asam_eta: float,
               prev_params: Tensor | None, eta_grid: Sequence[float] | None, ortho_tol: float | None,
               curvature: Any) -> AlignmentResult:
    V = eigenvectors.detach().to(device=obj.device, dtype=obj.dtype)
    rows = getattr(getattr(obj, "space", None), "size", obj.n_params) if inner.active() else obj.n_params
    if V.dim() != 2 or V.shape[0] != rows:
        raise ValueError(f"eigenvectors must be [P={rows}, k] (this rank's shard when sharded), got {tuple(V.shape)}")
    evals = [float(x) for x in eigenvalues]
    if len(evals) != V.shape[1]:
        raise ValueError(f"{len(evals)} eigenvalues for {V.shape[1]} eigenvectors")
    if ortho_tol is not None:
        check_orthonormal(V, ortho_tol)

    op_name = str(getattr(curvature, "name", curvature))
    w = obj.flat_params()
    g = obj.grad_flat()
    L0 = obj.loss()
    vecs: dict[str, Tensor] = {}
    for name in vectors:
        if name == "full":
            vecs[name] = g
        elif name == "minibatch":
            idx = minibatch_indices(obj.n_samples, batch_size, seed)
            if hasattr(obj, "subset"):
                vecs[name] = obj.subset(idx).grad_flat()
            else:  # a model-sharded objective: each rank back-propagates the minibatch samples it holds
                vecs[name] = sharded_subset_grad(obj, idx)
            obj.n_grad += 1
        elif name == "sam" and getattr(obj, "shard_group", None) is not None and not m:
            # a model-sharded objective: e from the shard-aware perturbation (its norm over all ranks)
            vecs[name] = obj.grad_flat(w + perturbation(obj, g, variant, rho, asam_eta, w))
        elif name == "sam":
            vecs[name] = perturbed_gradient(obj, rho, variant, m, asam_eta, with_loss=False).perturbed_grad
        elif name == "update" and prev_params is not None:
            vecs[name] = w - prev_params.detach().to(device=w.device, dtype=w.dtype).reshape(-1)
    chis = {name: chi(V, v) for name, v in vecs.items()}
    dL, pred = loss_changes(obj, g, V, eta, L0)

    lam = max(evals) if evals else None
    grid = list(map(float, default_eta_grid(lam, eta) if eta_grid is None else eta_grid))
    e_star, deltas = eta_star_empirical(obj, g, V, grid) if grid else (None, [])
    return AlignmentResult(
        k=V.shape[1], eigenvalues=evals, chi=chis, chi_sq={n: c * c for n, c in chis.items()},
        dL=dL, dL_pred=pred, eta=float(eta), eta_star=e_star,
        eta_lambda_max=None if lam is None else eta * lam,
        eta_lambda_usam=None if lam is None or variant != "usam" else eta * lam * (1 + rho * lam),
        lambda_max=lam, loss=L0, eta_grid=grid, delta_chi=deltas, rho=float(rho), variant=variant,
        batch_size=batch_size if "minibatch" in vecs else None, seed=int(seed),
        curvature=op_name, lambda_of=CURVATURE_REGISTRY.label(op_name.split("[", 1)[0]),
        edge_of_stability=op_name == "hessian",
    )


def sharded_subset_grad(obj: Any, index: Tensor) -> Tensor:
    """This rank's shard of ``∇L_B(w)`` for the samples ``index`` of a
    :class:`~sam_probe.core.sharded.ShardedObjective`'s selection (``L_B`` their mean loss, as
    ``Objective.subset(index)``): each rank back-propagates ``R · Σ_{i ∈ B ∩ its part} ℓ_i / T_B``
    in one pass (a rank holding none of ``B`` runs one of its samples weighted 0, so every rank
    takes part in FSDP's collectives), and FSDP's reduce-scatter averages over ranks."""
    from . import losses as _losses
    from .batches import batch_len
    from .model_calls import analysis_mode, split_labels

    n, R, r = obj.n_samples, obj.world, obj.rank
    split = n >= R
    lo, hi = ((r * n) // R, ((r + 1) * n) // R) if split else (0, n)
    index = torch.as_tensor(index).reshape(-1).cpu()
    mine = (index[(index >= lo) & (index < hi)] - lo) if split else index
    xs, ys = [c[0] for c in obj._chunks], [c[1] for c in obj._chunks]
    if isinstance(xs[0], dict):
        x_all: Any = {k: torch.cat([x[k] for x in xs]) for k in xs[0]}
    else:
        x_all = torch.cat(xs)
    y_all = torch.cat(ys) if ys[0] is not None else None
    weight = 1.0
    if len(mine) == 0:
        mine, weight = torch.zeros(1, dtype=torch.long), 0.0
    x = {k: v[mine] for k, v in x_all.items()} if isinstance(x_all, dict) else x_all[mine]
    y = y_all[mine] if y_all is not None else None
    own = isinstance(obj.loss_obj, _losses.ModelOwnLoss)
    xx, yy = split_labels(x, y, own)
    terms = torch.tensor([weight * float(obj.loss_obj.term_count(yy, batch_len(xx)))], dtype=torch.float64)
    if split:
        terms = inner.allsum(terms)
    T = float(terms[0])
    scale = float(R) if split else 1.0
    for p in obj.named.values():
        p.grad = None
    with analysis_mode(obj.module, obj.bn_mode):
        (obj._chunk_sum(x, y) * (weight * scale / T)).backward()
    from .sharded import _local

    out = torch.cat([(_local(p.grad) if p.grad is not None else torch.zeros_like(_local(p))).reshape(-1)
                     for p in obj.named.values()])
    for p in obj.named.values():
        p.grad = None
    return out
