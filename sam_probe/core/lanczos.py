"""Top-k eigenpairs of a symmetric operator by thick-restarted block Lanczos, in O(k·P) memory.

The operator is only seen through ``matmat(V[P, b]) -> A V``.  A block Krylov basis
``Q`` (orthonormal, full reorthogonalisation: classical Gram–Schmidt twice) lives in a
:class:`~sam_probe.core.vectors.VectorStore` (on the device, in host memory, or in
memory-mapped files).  The projected matrix ``T = Qᵀ A Q`` is built column by column
from the products themselves (``Qᵀ (A Z)`` for each new block ``Z``), so every Ritz
value ``θ`` is the Rayleigh quotient of its Ritz vector ``y = Q s`` up to rounding.  The
next block is ``A Z`` orthogonalised against ``Q``; when the basis would exceed
``max_basis`` rows it is thick-restarted (Wu & Simon 2000): the wanted end of the Ritz
vectors ``Q S`` replaces ``Q`` in place, ``T = diag(θ)``, and the pending block
continues the Krylov sequence.  A restart keeps the ``k + 1`` wanted-end Ritz vectors and a
fifth of the rows beyond them (:data:`RESTART_KEEP`), so each cycle adds most of the basis
anew (keeping half, as before 7 Dec, cost 6–7 % more products on the GPT-2 models of
``bench/scale.py`` and twice the restarts).  Each step estimates the residual of every wanted pair
from the recurrence, ``||B s_last||`` (``B``: coefficients of the next block).

**What is certified** (docs/metrics.md, "Eigenpairs and residual certificates"):

1. *Residuals, from explicit products.*  A pair is converged when
   ``(||A y - θ y|| + e(y)) / |θ| <= tol`` with ``A y`` an actual product: the stored
   product rows combined (``keep_products``: ``A y = (AQ) s``), or, in the lean
   default, one more product ``A y`` per returned pair at the end (``k`` extra products,
   counted in ``n_hvp``), never the recurrence alone.  ``e(y)`` is the operator's own
   error bound for a product (``product_error``; zero for exact products).  A residual
   ``r`` proves that some eigenvalue lies within ``r |θ|`` of ``θ``.
2. *Order, by a fresh random check* (:mod:`~sam_probe.core.order_check`).  A small
   residual does not say that ``θ_j`` is the j-th eigenvalue: a warm start (or an unlucky
   cold one, or a multiple eigenvalue, which a single Krylov vector sees once) can converge
   to ``λ_1, λ_2, λ_4`` and never meet ``λ_3``.  So once the wanted pairs pass, the basis is
   restarted to those ``k`` Ritz vectors ``Y`` and plain Lanczos runs on the deflated
   operator ``(I - YYᵀ) A (I - YYᵀ)`` (``A``'s spectrum without the found pairs) from a
   *fresh* seeded Gaussian vector, until its Lanczos polynomial bounds the deflated
   operator's extreme eigenvalue within ``order_tol |θ_k|`` of ``θ_k`` (``max(tol, 10⁻²)``
   by default), with probability ``1 - δ`` (``δ = 10⁻³``, ``order_confidence``; the bound is
   ``guard_bound``).  A residual
   is not used for this: in ``10⁷`` dimensions the first Ritz pair of a random vector has a
   residual below ``10⁻² |θ_k|`` while it sits in the bulk of the spectrum.  A Ritz value
   of the deflated operator beyond ``θ_k + tol |θ_k|`` is a missed eigenvalue for certain:
   its Ritz vector joins the basis, the solve goes on, and a new check follows
   (``n_missed``, ``n_checks``; the checks' products are ``n_check_products``).
   ``check=False`` (``--no-order-check``) skips it: the residuals are still certified, but
   ``order_checked`` and ``certified`` are false and a warning says so (the check is 30–40 % of
   the products on the GPT-2 models of ``bench/scale.py``).
3. *Gap at the k boundary.*  ``gap = |θ_k - ξ| / |θ_k|`` (``ξ``, the *guard*: the deflated
   operator's extreme Ritz value, about ``λ_{k+1}``) and the Davis–Kahan bound
   ``subspace_bound = ||R||_F / (θ_k - U)`` (``U = guard_bound``, mirrored for ``SA`` and
   ``LM``) on the sine of the angle between ``span Y`` and the true top-k eigenspace
   (``R``: the absolute residuals) are reported; the check goes on past the order (for at
   most as many steps again) until ``U`` is far enough inside ``θ_k`` for this bound to
   pass ``gap_tol``, unless the guard ``ξ`` already rules that out (``U`` lies beyond ``ξ``,
   which only moves outward).  When it does not, the k-dimensional eigenspace is not determined by
   these residuals and ``gap_warning`` says so (eigenvalues are still fine: each is within
   its residual of an eigenvalue, and in order).

**Memory** (``P``-sized vectors; ``c`` = :data:`~sam_probe.core.vectors.WORK_VECTORS` = 8):
the basis rows (``max_basis``, pending block included) plus the product block ``b``
(``2b`` for ``b > 1``, whose rows are copied out of the product), plus the stored
products when ``keep_products`` (one per basis row).  The default basis is
``k + c - 1`` rows for ``b = 1`` and ``k + c - 2b`` for ``b > 1`` (at least ``k + 2b``),
so the solver holds at most ``k + c`` vectors (``k + 4b`` when ``b > 2``); the ``k``
returned eigenvectors are rows of the basis (a view, no copy).  The order check holds the
``k`` Ritz vectors and 3 more (4 while it rebuilds a missed eigenvalue's vector).  Nothing is
allocated before it is needed.  ``VectorCount`` in the result (``peak_vectors``) counts them.

``which``: ``LA`` largest algebraic (descending), ``SA`` smallest algebraic
(ascending), ``LM`` largest magnitude (by ``|λ|`` descending).

Warm start (``warm``, e.g. the previous checkpoint's Ritz vectors ``W [P, k']``): the
start block is ``W C / ||W C|| + G / ||G||`` column by column, ``C`` = equal weights in an
orthonormal basis of ``span W`` (one column) or a seeded orthonormal ``[k', b]``, ``G``
the seeded Gaussian block of a cold start.  Everything after it (Lanczos steps, restarts,
the explicit residuals and the order check from a fresh Gaussian block) is the cold
solver's, so a warm start changes the cost, not what is certified.

The solvers take any :class:`~sam_probe.core.operators.CurvatureOperator` (or an
objective, meaning its Hessian); ``curvature`` in the result names the operator.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from . import inner
from .names import WHICH
from .order_check import deflated_check
from .vectors import WORK_VECTORS, VectorCount, VectorStore, where_label

Matmat = Callable[[Tensor], Tensor]
ProductError = Callable[[Tensor, Tensor], Tensor]  # (V [P, b], A V [P, b]) -> [b] bounds on ||error of A v||

RESTART_KEEP = 0.2  # a thick restart keeps k + 1 Ritz vectors and this share of the basis rows beyond them
GAP_TOL = 0.1  # Davis–Kahan bound above which the top-k eigenspace is flagged as not determined
CHECK_SEED = 104_729  # offset of the order check's seeds (independent of the start block's)


@dataclass
class EigenResult:
    """Eigenpairs with their honest relative residuals ``||Hv - λv|| / |λ|``."""

    eigenvalues: list[float]
    eigenvectors: Tensor  # [P, k], orthonormal columns
    residuals: list[float]
    converged: list[bool]
    n_hvp: int
    n_restarts: int
    which: str = "LA"
    tol: float = 1e-3
    warnings: list[str] = field(default_factory=list)
    curvature: str = "hessian"
    warm_start: bool = False
    order_checked: bool = False  # the fresh-block order check passed (module docstring, 2.)
    n_checks: int = 0  # order checks run (one more after each eigenvalue the check found)
    n_missed: int = 0  # eigenvalues the order check found beyond θ_k (then solved for)
    guard: float | None = None  # ξ: the extreme Ritz value of the deflated operator at the last check
    guard_residual: float | None = None  # its residual estimate ||B s_last|| / |θ_k|
    guard_bound: float | None = None  # U: no eigenvalue beyond θ_k's side of it was missed, with probability order_confidence
    order_confidence: float | None = None  # 1 − δ of the order check's bound (core/order_check.py)
    n_check_products: int = 0  # products the order checks used (in n_hvp)
    order_tol: float | None = None  # the order check's resolution: nothing beyond θ_k (1 + order_tol) was missed
    gap: float | None = None  # |θ_k - ξ| / |θ_k|
    subspace_bound: float | None = None  # Davis–Kahan sin∠(span Y, top-k eigenspace) bound
    gap_warning: bool = False
    cluster: list[float] = field(default_factory=list)  # θ_k and the guard when the boundary is not resolved
    k_requested: int | None = None  # k asked for (``k`` may grow with ``extend_cluster``)
    n_certify: int = 0  # products spent on the explicit residual certificate
    plan: dict[str, Any] = field(default_factory=dict)  # basis size, where vectors live, peak vectors

    @property
    def all_converged(self) -> bool:
        return all(self.converged)

    @property
    def certified(self) -> bool:
        """Every residual passes and the order check passed."""
        return self.all_converged and self.order_checked

    def to_dict(self) -> dict:
        """JSON-ready summary (eigenvectors left out)."""
        return {
            "eigenvalues": list(self.eigenvalues), "residuals": list(self.residuals),
            "converged": list(self.converged), "n_hvp": self.n_hvp, "n_restarts": self.n_restarts,
            "which": self.which, "tol": self.tol, "warnings": list(self.warnings),
            "curvature": self.curvature, "warm_start": self.warm_start,
            "order_checked": self.order_checked, "n_checks": self.n_checks, "n_missed": self.n_missed,
            "guard": self.guard, "guard_residual": self.guard_residual, "guard_bound": self.guard_bound,
            "order_confidence": self.order_confidence, "order_tol": self.order_tol,
            "n_check_products": self.n_check_products, "gap": self.gap,
            "subspace_bound": self.subspace_bound, "gap_warning": self.gap_warning,
            "cluster": list(self.cluster), "k_requested": self.k_requested, "n_certify": self.n_certify,
            "plan": dict(self.plan),
        }


def order(theta: Tensor, which: str) -> Tensor:
    """Indices of ``theta`` from the wanted end: LA descending, SA ascending, LM by |θ| descending."""
    if which == "LA":
        return torch.argsort(theta, descending=True, stable=True)
    if which == "SA":
        return torch.argsort(theta, stable=True)
    if which == "LM":
        return torch.argsort(theta.abs(), descending=True, stable=True)
    raise ValueError(f"which must be one of {', '.join(WHICH)}, got {which!r}")


def _key(x: float, which: str) -> float:
    """How far toward the wanted end ``x`` lies (larger = more wanted)."""
    return x if which == "LA" else -x if which == "SA" else abs(x)


def default_basis(k: int, b: int = 1, vectors: int | None = None, keep_products: bool = False) -> int:
    """Basis rows (pending block included) that fit ``vectors`` parameter-sized vectors
    (default ``k + c``) beside the product block (module docstring, Memory)."""
    vectors = k + WORK_VECTORS if vectors is None else int(vectors)
    work = 1 if b == 1 else 2 * b
    m = (vectors - work) // (2 if keep_products else 1)
    return max(m, k + 2 * b)


def vectors_needed(k: int, b: int, max_basis: int, keep_products: bool) -> int:
    """Peak parameter-sized vectors of :func:`lanczos` with these settings (the formula the
    memory test checks)."""
    rows = 2 if keep_products else 1
    return max(max_basis * rows + (1 if b == 1 else 2 * b), k * rows + 4)  # the order check: k rows and 4


# ------------------------------------------------------------------ blocks
def _orthonormalise_block(W: Tensor, Q: VectorStore, gen: torch.Generator, scales: Tensor | None = None,
                          passes: int = 2) -> tuple[Tensor, Tensor]:
    """In place: ``W [P, b]`` minus its part in ``span Q`` (``passes`` classical Gram–Schmidt
    sweeps), then its columns orthonormalised among themselves; returns ``(Z, B)`` with
    ``W ≈ Z B`` beyond ``span Q`` (``B [b', b]`` upper triangular, float64 on CPU; ``Z`` is
    ``W``'s memory).

    A column whose norm falls below ``1e-10`` of its ``scales`` entry (default: its own
    norm) found an invariant subspace: it is replaced by a seeded random direction
    orthogonal to everything so far (its diagonal ``B`` entry is zero).  Columns beyond the
    remaining dimension ``P - len(Q)`` are dropped (``b' < b``)."""
    P, b = W.shape
    room = inner.size(P) - len(Q)
    scales = (inner.colnorms(W) if scales is None else scales).double().cpu().clone()
    if passes:
        Q.orthogonalise(W, passes)
    B = torch.zeros(b, b, dtype=torch.float64)
    keep: list[int] = []
    for j in range(min(b, room)):
        w = W[:, j]
        for attempt in range(3):
            for _ in range(2 if keep else 0):
                for i in keep:
                    c = inner.dot(W[:, i], w)
                    w.add_(W[:, i], alpha=-c)
                    if attempt == 0:
                        B[i, j] += c
            nrm = inner.norm(w)
            if nrm > 1e-10 * float(scales[j]) and nrm > 0:
                break
            w.copy_(_gaussian(P, 1, gen, w.dtype, w.device)[:, 0])  # breakdown: a fresh direction
            Q.orthogonalise(w[:, None])
            scales[j] = inner.norm(w)
        B[j, j] = nrm if attempt == 0 else 0.0
        w.div_(inner.norm(w))
        keep.append(j)
    if len(keep) < b:
        return W[:, keep], B[keep]
    return W, B


def warm_start_block(warm: Tensor, n: int, b: int, gen: torch.Generator, dtype: torch.dtype,
                     device: torch.device | str) -> Tensor:
    """The ``[n, b]`` start block of a warm start from ``warm [n, k']`` (module docstring).

    Columns of ``warm`` that are not finite (unconverged placeholders) are ignored; with
    none left this is the cold start block.  ``gen`` draws ``C`` and then the Gaussian ``G``.
    Only the ``b`` output columns are new vectors: the orthonormal basis of ``span W`` is
    applied through the ``k' × k'`` Gram matrix, never formed."""
    W = warm.detach().reshape(n, -1)
    good = torch.isfinite(W).all(0)
    if not bool(good.all()):
        W = W[:, good]
    G = _gaussian(n, b, gen, dtype, device)
    G = G.div_(inner.colnorms(G)[None, :])
    if W.shape[1] == 0:
        return G
    kw = W.shape[1]
    gram = inner.gram(W, W).double().cpu()  # W = Wq R (QR) with R from the Gram matrix: Wq C = W R⁻¹ C
    L, info = torch.linalg.cholesky_ex(gram)
    if int(info) == 0 and float(L.diagonal().min()) > 1e-6 * float(L.diagonal().max()):
        Rinv = torch.linalg.inv(L.T)
    else:  # dependent columns: an orthonormal basis of their span from the eigenvectors of the Gram matrix
        evals, evecs = torch.linalg.eigh(gram)
        ok = evals > 1e-12 * float(evals.max())
        Rinv = evecs[:, ok] / evals[ok].sqrt()
    kw = Rinv.shape[1]
    if b == 1:
        C = torch.ones(kw, 1, dtype=torch.float64)
    else:
        C = torch.zeros(kw, b, dtype=torch.float64)
        R, _ = torch.linalg.qr(torch.randn(kw, max(kw, b), generator=gen, dtype=torch.float64))
        C[:, :min(kw, b)] = R[:, :min(kw, b)]
    coef = (Rinv @ C).to(device=W.device, dtype=W.dtype)
    A = (W @ coef).to(device=device, dtype=dtype)
    nrm = inner.colnorms(A)[None, :]
    A = torch.where(nrm > 0, A / nrm.clamp_min(1e-300), A)
    return A.add_(G)


def krylov_sketch(matmat: Matmat, n: int, r: int, *, block_size: int = 1, seed: int = 0,
                  dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu",
                  warm: Tensor | None = None, where=None, count: VectorCount | None = None,
                  ) -> tuple[VectorStore, float, int]:
    """An orthonormal basis ``Q`` (``r`` rows of a :class:`VectorStore`) of the block Krylov
    space of a seeded Gaussian block (or the warm start block of ``warm``), ``tr(Qᵀ A Q)``
    and the products used (exactly ``rank Q``; full reorthogonalisation).

    Holds ``r`` rows plus one product block: the products are not kept (``tr(Qᵀ A Q)`` is
    accumulated as they come)."""
    gen = inner.generator(seed)
    r = min(r, inner.size(n))
    count = count if count is not None else VectorCount()
    Q = VectorStore(n, dtype, device, where, count)
    b = max(1, min(block_size, r))
    count.add(b)
    Z = warm_start_block(warm, n, b, gen, dtype, device) if warm is not None else _gaussian(n, b, gen, dtype, device)
    Z, _ = _orthonormalise_block(Z, Q, gen)
    tr, used = 0.0, 0
    while used < r and Z.shape[1]:
        Z = Z[:, :r - used]
        AZ = matmat(Z).to(device=device, dtype=dtype)
        count.add(b)
        tr += float(inner.coldots(Z, AZ).sum())
        Q.append(Z)
        used += Z.shape[1]
        del Z
        count.sub(b)
        if used >= r:
            break
        Z, _ = _orthonormalise_block(AZ, Q, gen)  # the next block, in AZ's memory
        del AZ
    else:
        count.sub(b)
        return Q, tr, used
    del AZ
    count.sub(b)
    return Q, tr, used


def krylov_basis(matmat: Matmat, n: int, r: int, *, block_size: int = 1, seed: int = 0,
                 dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu",
                 warm: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``Q [n, r]`` of :func:`krylov_sketch` and ``A Q`` (``r`` more products), as tensors (tests, small ``n``)."""
    Q, _, _ = krylov_sketch(matmat, n, r, block_size=block_size, seed=seed, dtype=dtype, device=device, warm=warm)
    Qm = torch.stack(Q.rows, 1) if len(Q) else torch.zeros(n, 0, dtype=dtype, device=device)
    return Qm, matmat(Qm).to(device=device, dtype=dtype) if Qm.shape[1] else Qm.clone()


def _ritz(T: Tensor, which: str) -> tuple[Tensor, Tensor, Tensor]:
    """All eigenpairs of the projected ``T`` and the indices from the wanted end."""
    evals, S = torch.linalg.eigh(T)
    return evals, S, order(evals, which)


# ------------------------------------------------------------------ solver
def _boundary(vals: list[float], res_abs: list[float], guard: float | None, bound: float | None, which: str,
              gap_tol: float) -> tuple[float | None, float | None, bool]:
    """``(gap, Davis–Kahan bound, warn)`` at the k boundary (module docstring, 3.): the separation
    is the distance from ``θ_k`` to the order check's bound on the rest of the spectrum."""
    if guard is None or bound is None or not vals:
        return None, None, False
    thk = vals[-1]
    gap = abs(thk - guard) / max(abs(thk), 1e-300)
    sep = _key(thk, which) - _key(bound, which)
    R = math.sqrt(sum(r * r for r in res_abs))
    sub = min(1.0, R / sep) if sep > 0 else 1.0
    return gap, sub, sub > gap_tol


def lanczos(
    matmat: Matmat,
    n: int,
    k: int = 5,
    *,
    which: str = "LA",
    tol: float = 1e-3,
    max_hvp: int | None = None,
    block_size: int = 1,
    max_basis: int | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
    v0: Tensor | None = None,
    warm: Tensor | None = None,
    keep_products: bool = False,
    max_vectors: int | None = None,
    where=None,
    check: bool = True,
    gap_tol: float = GAP_TOL,
    extend_cluster: int = 0,
    product_error: ProductError | None = None,
    count: VectorCount | None = None,
    order_tol: float | None = None,
) -> EigenResult:
    """``k`` eigenpairs of the symmetric ``n × n`` operator ``matmat`` at the ``which`` end.

    Iterates until every wanted pair's recurrence estimate ``||B s_last||`` passes ``tol``;
    then runs the order check (``check``, module docstring 2.) and certifies the residuals
    explicitly (1.).  Stops before the product count would exceed ``max_hvp`` (default
    ``max(300, 60 k)``, the lean certificate's ``k`` products included); pairs that do not
    pass are flagged in ``converged`` and explained in ``warnings``; an order check that could
    not finish leaves ``order_checked`` false (with a warning).

    ``v0`` (``[n]`` or ``[n, b]``) replaces the seeded Gaussian start block; ``warm``
    (``[n, k']``) gives the warm start block of :func:`warm_start_block` (``v0`` wins).
    Memory: ``max_basis`` rows (default :func:`default_basis` of ``max_vectors``, itself
    ``k + c`` by default) on ``where`` (``None``/``"device"``, ``"cpu"`` or a directory),
    plus the stored products with ``keep_products`` (then no extra products at the end);
    ``count`` (a :class:`~sam_probe.core.vectors.VectorCount`) sees every vector held.
    ``extend_cluster``: when the top-k eigenspace is not determined (``gap_warning``), solve
    for up to this many more pairs until the boundary is resolved (``k`` grows, and the basis
    by one row with it; the result keeps ``k_requested``; the ``k`` eigenvectors are then
    copied out at the end, ``k`` more vectors for a moment).  ``product_error(V, AV)``: the operator's bound on each product's
    error, added to the residual before the test.  ``order_tol``: the order check's resolution
    (default ``max(tol, 10⁻²)``; :mod:`~sam_probe.core.order_check`).
    """
    if which not in WHICH:
        raise ValueError(f"which must be one of {', '.join(WHICH)}, got {which!r}")
    N = inner.size(n)  # the dimension (n: the local length of a vector; N = n on one process)
    if not 1 <= k <= N:
        raise ValueError(f"k must be in [1, {N}], got {k}")
    if block_size < 1:
        raise ValueError("block_size must be >= 1")
    k_req = k
    kmax = min(N, k + max(0, int(extend_cluster)))
    b = min(block_size, N)
    max_hvp = max(300, 60 * kmax) if max_hvp is None else int(max_hvp)
    m_max = max_basis or default_basis(k, b, max_vectors, keep_products)
    m_max = min(max(m_max, k + 2 * b), N)
    device = torch.device(device)
    gen = inner.generator(seed)
    check_gen = inner.generator(seed + CHECK_SEED)
    eps = torch.finfo(dtype).eps
    count = count if count is not None else VectorCount()
    Q = VectorStore(n, dtype, device, where, count, first_page=k)
    AQ = VectorStore(n, dtype, device, where, count) if keep_products else None
    perr: list[float] = []  # error bounds of the stored products (keep_products)

    def push(Z: Tensor) -> None:
        """Orthonormalise the new block ``Z`` against the basis and append it (pending)."""
        w = Z.shape[1]
        count.add(w)
        Z, _ = _orthonormalise_block(Z, Q, gen)
        Q.append(Z)
        count.sub(w)
        del Z

    if v0 is not None:
        push(v0.reshape(n, -1).to(device=device, dtype=dtype).clone())
    elif warm is not None:
        push(warm_start_block(warm, n, b, gen, dtype, device))
    else:
        push(_gaussian(n, b, gen, dtype, device))

    T = torch.zeros(0, 0, dtype=torch.float64)
    nq = 0  # rows of Q with products (the Rayleigh–Ritz basis); the rows after them are the pending block
    n_hvp = n_restarts = n_certify = 0
    hit_cap = False
    checked = not check or N <= k
    check_spent = False  # an order check ran out of products
    n_checks = n_missed = n_check_products = 0
    theta_ref = 0.0
    guard = guard_abs = guard_bound = order_res = confidence = None
    rvec: Tensor | None = None  # after an order check: the worst explicit residual, where the solve goes on
    slack = 1.0  # explicit residual / estimate at a failed certificate: ask for that much more before retrying
    final: tuple | None = None  # (θ, ||A y - θ y||, product error bounds) of the certified pairs

    def floor_of(evals: Tensor) -> float:
        return max(eps * float(evals.abs().max()), 1e-300) if len(evals) else 1e-300

    def restart(S_keep: Tensor, evals_keep: Tensor) -> None:
        """Basis ← Q S_keep in place (pending rows kept after it), ``T = diag``."""
        nonlocal T, nq
        with count.hold(0.25):
            Q.rotate(S_keep)
            if AQ is not None:
                AQ.rotate(S_keep)
        if AQ is not None and perr:
            perr[:] = (S_keep.abs().T @ torch.tensor(perr, dtype=torch.float64)).tolist()
        nq = S_keep.shape[1]
        T = torch.diag(evals_keep)

    def explicit(evals: Tensor, S: Tensor, idx: Tensor, keep: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """``(θ, ||A y - θ y||, product error bound)`` of the wanted pairs from actual products:
        stored ones (``keep_products``) or one new product each (lean; the basis is rotated to
        its Ritz vectors first, wanted ones leading).  ``keep``: the largest residual vector
        stays in ``rvec`` (one vector) for the solve to go on from."""
        nonlocal n_hvp, n_certify, rvec

        def kept(r: Tensor, j: int) -> None:
            nonlocal rvec
            if keep and (j == 0 or float(res[j]) >= float(res[:j].max())):
                if rvec is None:
                    count.add(1)
                rvec = r
        kk = min(k, len(idx))
        theta = evals[idx[:kk]].clone()
        res = torch.zeros(kk, dtype=torch.float64)
        err = torch.zeros(kk, dtype=torch.float64)
        if AQ is not None:
            pe = torch.tensor(perr, dtype=torch.float64) if perr else None
            for j in range(kk):
                s = S[:, idx[j]]
                with count.hold(2):
                    y, ay = Q.combine(s), AQ.combine(s)
                    res[j] = inner.norm(ay.add_(y, alpha=-float(theta[j])))
                    kept(ay, j)
                    del y, ay
                if pe is not None:
                    err[j] = float((s.abs() * pe).sum())
            return theta, res, err
        restart(S[:, idx], evals[idx])
        for j in range(kk):
            y = Q.row(j)
            with count.hold((0 if Q.local else 1) + 1):
                ay = matmat(y[:, None]).to(device=device, dtype=dtype)
                n_hvp += 1
                n_certify += 1
                if product_error is not None:
                    err[j] = float(product_error(y[:, None], ay).reshape(-1)[0])
                res[j] = inner.norm(ay[:, 0].add_(y, alpha=-float(theta[j])))
                kept(ay[:, 0], j)
                del ay, y
        return theta, res, err

    def drop_rvec() -> None:
        nonlocal rvec
        if rvec is not None:
            rvec = None
            count.sub(1)

    evals = S = idx = None
    Znext: Tensor | None
    while True:
        reserve = 0 if keep_products else k  # products the explicit certificate will need
        bz = len(Q) - nq
        if bz == 0:
            break
        if n_hvp + bz + reserve > max_hvp:
            hit_cap = True
            break
        # ---- room for this block's successor: thick restart (before the product, so no product
        # block is alive while the basis is rotated) when the basis would overflow
        if evals is not None and idx is not None and S is not None and nq + 2 * bz > m_max:
            kk = min(k + 1, nq)
            keep = max(kk, min(kk + int(RESTART_KEEP * (m_max - kk)), m_max - 2 * bz, nq))
            if keep < nq:
                restart(S[:, idx[:keep]], evals[idx[:keep]])
                n_restarts += 1
        # ---- one block of products
        if bz == 1:
            Z, zc = Q.row(nq)[:, None], (0 if Q.local else 1)
        else:
            Z, zc = torch.stack([Q.row(i) for i in range(nq, nq + bz)], 1), bz
        count.add(zc)
        AZ = matmat(Z).to(device=device, dtype=dtype)
        count.add(bz)
        n_hvp += bz
        if AQ is not None:
            AQ.append(AZ)
            perr.extend(product_error(Z, AZ).double().cpu().reshape(-1).tolist() if product_error is not None
                        else [0.0] * bz)
        del Z
        count.sub(zc)
        H = Q.dots(AZ)  # [nq + bz, bz]: the new columns of T = Qᵀ A Q
        Hd = H.double().cpu()
        C, D = Hd[:nq], Hd[nq:]
        T = torch.cat([torch.cat([T, C], 1), torch.cat([C.T, 0.5 * (D + D.T)], 1)], 0)
        nq += bz
        evals, S, idx = _ritz(T, which)

        # ---- the next block (in AZ's memory) and the residual estimates it implies
        if nq < N:
            scales = inner.colnorms(AZ)
            Q.orthogonalise(AZ, 2, first=H)  # two Gram–Schmidt sweeps, the first from Qᵀ AZ
            Znext, Bc = _orthonormalise_block(AZ, Q, gen, scales=scales, passes=0)
            est_all = (Bc @ S[nq - bz:nq]).norm(dim=0)
        else:
            Znext = AZ[:, :0]
            est_all = torch.zeros(nq, dtype=torch.float64)
        del AZ, H
        floor = floor_of(evals)

        wanted = idx[:min(k, nq)]
        done = (len(wanted) == k
                and bool((est_all[wanted] <= (tol / slack) * evals[wanted].abs().clamp_min(floor)).all()))
        if done and not checked and not check_spent:
            # the order check (module docstring, 2.): restart to the k wanted Ritz vectors, deflated
            # Lanczos from a fresh Gaussian; a missed eigenvalue comes back as a vector to solve on
            del Znext
            count.sub(bz)
            restart(S[:, wanted], evals[wanted])
            theta_ref = float(evals[wanted[-1]])
            n_checks += 1
            r_est = float(est_all[wanted].norm())  # what the Davis–Kahan bound will divide by the separation
            chk = deflated_check(matmat, Q, theta_ref, which, tol, n, check_gen,
                                 max_hvp - n_hvp - reserve, dtype, device, count,
                                 separation=r_est / gap_tol, order_tol=order_tol)
            n_hvp += chk.products
            n_check_products += chk.products
            guard, guard_abs, guard_bound = chk.guard, chk.guard_residual, chk.bound
            order_res, confidence = chk.order_tol, 1 - chk.delta
            if chk.status == "miss" and chk.vector is not None:
                n_missed += 1
                push(chk.vector[:, None])
                del chk
                evals = S = idx = None
                continue
            checked = chk.status == "pass"
            check_spent = not checked  # the budget ran out (a miss without room for its vector included)
            hit_cap = hit_cap or check_spent
            del chk
            evals, S, idx = _ritz(T, which)
            Znext = None
            bz = 0
        if done:
            theta, res, err = explicit(evals, S, idx, keep=Znext is None)
            if AQ is None:
                evals, S, idx = _ritz(T, which)  # the basis is the Ritz basis now
            rel = (res + err) / theta.abs().clamp_min(floor)
            if bool((rel <= tol).all()):
                final = (theta, res, err)
                vals = theta.tolist()
                gap, sub, warn = _boundary(vals, (res + err).tolist(), guard, guard_bound, which, gap_tol)
                if not (warn and k < kmax and check and checked):
                    del Znext
                    count.sub(bz)
                    drop_rvec()
                    break
                k += 1  # extend k into the cluster at the boundary (one more basis row), certify and check again
                m_max = min(N, m_max + 1)
                checked, final, guard, guard_abs, guard_bound = False, None, None, None, None
            else:
                slack = max(slack * 2, float((res / est_all[wanted].clamp_min(floor * eps)).max()))
            if check_spent:  # no products left for more: report these residuals as they are
                final = (theta, res, err)
                del Znext
                count.sub(bz)
                drop_rvec()
                break

        if Znext is None:  # after an order check the basis is the Ritz basis: go on from the worst residual
            if rvec is None:
                break
            push(rvec[:, None])
            drop_rvec()
            continue
        if Znext.shape[1] == 0:
            del Znext
            count.sub(bz)
            break
        Q.append(Znext)
        del Znext
        count.sub(bz)

    # ---------------------------------------------------------------- result
    if final is None and nq:
        evals, S, idx = _ritz(T, which)
        Q.truncate(nq)
        final = explicit(evals, S, idx)
    rel_out: list[float]
    res_abs: list[float]
    if final is not None:
        theta, res, err = final
        kk = len(theta)
        rel_out = ((res + err) / theta.abs().clamp_min(floor_of(theta))).tolist()
        res_abs = (res + err).tolist()
    else:
        theta, kk, rel_out, res_abs = torch.zeros(0, dtype=torch.float64), 0, [], []
    if AQ is not None:
        AQ.close()
        if kk:  # the stored-products path certified without rotating: bring the wanted Ritz vectors first
            evals, S, idx = _ritz(T, which)
            Q.truncate(nq)
            with count.hold(0.25):
                Q.rotate(S[:, idx[:kk]])
    Q.truncate(kk)
    residuals = rel_out + [float("inf")] * (k - kk)
    converged = [r <= tol for r in residuals]
    warnings: list[str] = []
    if not all(converged):
        bad = [i for i, c in enumerate(converged) if not c]
        why = f"max_hvp={max_hvp} reached" if hit_cap else "Krylov space exhausted or precision floor reached"
        warnings.append(
            f"{len(bad)} of {k} eigenpairs ({which}) not converged to tol={tol:g} after {n_hvp} HVPs "
            f"({why}); residuals: " + ", ".join(f"#{i + 1}: {residuals[i]:.2e}" for i in bad))
    order_ok = bool(checked and all(converged) and (check or N <= k))  # check=False: the order is not known
    if all(converged) and not check and N > k:
        warnings.append(f"order of the {k} eigenvalues not checked (order check off, --no-order-check): each residual "
                        f"is certified, but an eigenvalue beyond #{k} may have been missed")
    elif all(converged) and not checked:
        warnings.append(f"order of the {k} eigenvalues not verified: the fresh-block check did not finish within "
                        f"max_hvp={max_hvp} (each residual is certified, but an eigenvalue beyond #{k} may have been "
                        "missed; raise --max-hvp)")
    vals = theta.tolist() + [float("nan")] * (k - kk)
    gap, sub, warn = (_boundary(vals[:kk], res_abs, guard, guard_bound, which, gap_tol) if order_ok
                      else (None, None, False))
    cluster: list[float] = []
    if warn:
        cluster = [vals[k - 1], float("nan") if guard is None else guard]
        warnings.append(
            f"eigenvalue #{k} ({which}, {vals[k - 1]:.6g}) is not separated from the rest of the spectrum at "
            f"tol={tol:g}: the order check puts #{k + 1} near {guard:.6g} (relative gap {gap:.1e}) and bounds it by "
            f"{guard_bound:.6g}, so the {k}-dimensional eigenspace is not determined (Davis-Kahan bound {sub:.2f} on "
            "the sine of its angle); the eigenvalues are certified, the vectors are not; tighten --tol or take k past "
            "the cluster")
    if k > k_req:
        warnings.append(f"k extended from {k_req} to {k}: eigenvalue #{k_req} sits in a cluster of nearly equal "
                        f"eigenvalues whose eigenspace is only determined as a whole")
    vecs = _result_vectors(Q, n, k, kk, dtype, device)
    return EigenResult(
        eigenvalues=vals, eigenvectors=vecs, residuals=residuals, converged=converged, n_hvp=n_hvp,
        n_restarts=n_restarts, which=which, tol=tol, warnings=warnings,
        warm_start=v0 is None and warm is not None, order_checked=order_ok, n_checks=n_checks,
        n_missed=n_missed, guard=guard,
        guard_residual=None if guard_abs is None else guard_abs / max(abs(theta_ref), 1e-300),
        guard_bound=guard_bound, order_confidence=confidence if order_ok and n_checks else None,
        n_check_products=n_check_products, order_tol=order_res if order_ok and n_checks else None,
        gap=gap, subspace_bound=sub, gap_warning=warn, cluster=cluster, k_requested=k_req, n_certify=n_certify,
        plan={"basis_vectors": m_max, "block": b, "keep_products": bool(keep_products),
              "basis_device": where_label(where), "vectors": vectors_needed(k, b, m_max, keep_products),
              "peak_vectors": count.peak, "work_vectors": WORK_VECTORS})


def _gaussian(n: int, b: int, gen: torch.Generator, dtype: torch.dtype, device) -> Tensor:
    """``[n, b]`` seeded standard normal entries (drawn in float64 on the CPU generator, in
    row blocks, so no float64 copy of the whole block is made)."""
    out = torch.empty(n, b, dtype=dtype, device=device)
    step = max(1, (1 << 20) // max(b, 1))
    for a in range(0, n, step):
        e = min(a + step, n)
        out[a:e] = torch.randn(e - a, b, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    return out


def _result_vectors(Q: VectorStore, n: int, k: int, kk: int, dtype, device) -> Tensor:
    """The ``[n, k]`` eigenvectors: the basis's first page as a view when it holds them
    (no copy), NaN columns for pairs that do not exist."""
    if kk == k and Q.local and Q._page is not None and k == Q.first_page:
        return Q._page.T
    out = torch.full((n, k), float("nan"), dtype=dtype, device=device)
    for j in range(kk):
        out[:, j] = Q.row(j)
    return out


# ------------------------------------------------------------------ operators
def _plan_of(op) -> Any:
    """The memory plan of the objective behind ``op`` (set by ``--max-memory``), if any."""
    seen = 0
    while op is not None and seen < 8:
        plan = getattr(op, "memory_plan", None)
        if plan is not None:
            return plan
        op = getattr(op, "obj", None) or getattr(op, "parent", None)
        seen += 1
    return None


def top_eigen(op, k: int = 5, *, which: str = "LA", tol: float = 1e-3, max_hvp: int | None = None,
              block_size: int = 1, max_basis: int | None = None, seed: int = 0,
              reuse_graph: bool = True, warm: Tensor | None = None, where=None,
              keep_products: bool | None = None, max_vectors: int | None = None, check: bool = True,
              extend_cluster: int = 0, count: VectorCount | None = None,
              order_tol: float | None = None) -> EigenResult:
    """:func:`lanczos` on a :class:`~sam_probe.core.operators.CurvatureOperator` (an
    :class:`~sam_probe.core.objective.Objective` means its Hessian) in its dtype and device,
    inside the operator's context (the Hessian keeps its gradient graph when it fits one
    chunk; ``reuse_graph=False`` skips the context).  ``warm``: earlier Ritz vectors
    ``[P, k']`` for a warm start (see module docstring); ``None``, or vectors of another
    length than ``P``, is a cold start (``warm_start`` in the result says which).
    ``n_hvp`` counts the operator's products whatever the curvature (the explicit
    certificate's included).

    Memory: ``max_vectors`` parameter-sized vectors (default ``k + c``, or what the
    objective's memory plan allows, :func:`~sam_probe.core.memory.solver_plan`), basis rows on
    ``where``; ``keep_products`` (default: when the plan has room) keeps ``A Q`` to certify
    without extra products.  An inexact operator's own product error (finite differences, the MC
    Fisher) is added to the residuals afterwards by :func:`sam_probe.core.product_errors.eigen_errors`
    (its ``product_error(V)`` has another signature than the solver's per-product hook)."""
    from . import precision
    from .memory import solver_plan
    from .operators import as_operator

    op = as_operator(op)
    precision.check_tol(tol, op.dtype)
    if warm is not None and warm.shape[0] != op.P:  # vectors of another parameter space: start cold
        warm = None
    dtype = precision.solver_dtype(op.dtype)  # half-precision models: float32 solver arithmetic
    with inner.over(op):  # a model-sharded operator: the basis is capped by the whole dimension
        plan = solver_plan(k, op.P, dtype, block_size, memory_plan=_plan_of(op), max_vectors=max_vectors,
                           max_basis=max_basis, keep_products=keep_products, where=where)
    matmat, rounding = op.matmat, None
    if precision.is_half(op.dtype):  # each product's rounding enters the certificate (core/precision.py)
        rounding = precision.RoundingModel(op.dtype)
        matmat = rounding.observe(op.matmat)
    ctx = op.context() if reuse_graph else contextlib.nullcontext()
    with inner.over(op), ctx:  # inner products summed over the shards of a model-sharded operator
        res = lanczos(matmat, op.P, k, which=which, tol=tol, max_hvp=max_hvp, block_size=block_size,
                      max_basis=plan["basis_vectors"], seed=seed, dtype=dtype, device=op.device, warm=warm,
                      keep_products=plan["keep_products"], where=where, check=check,
                      extend_cluster=extend_cluster, product_error=rounding, order_tol=order_tol,
                      count=count)
    res.curvature = op.name
    res.plan = {**plan, **res.plan}
    if rounding is not None:
        res.plan["precision"] = {**precision.info(op.dtype), "certified_by": "rounding model"}
        ref = precision.reference_operator(op)
        kk = sum(1 for t in res.eigenvalues if t == t)  # the pairs found (NaN: none)
        if ref is not None and kk:  # certify against float32 products (k of each dtype, counted)
            chk = precision.certify_in_float32(op, ref, list(res.eigenvalues[:kk]), res.eigenvectors[:, :kk], tol)
            res.residuals = chk["residuals"] + list(res.residuals[kk:])
            res.converged = chk["converged"] + list(res.converged[kk:])
            res.n_hvp += 2 * kk
            res.plan["precision"].update(certified_by="float32 products",
                                         product_errors=chk["product_errors"])
            if "warning" in chk:
                from ..errors import render

                res.warnings = list(res.warnings) + [render(chk["warning"])]
    return res


