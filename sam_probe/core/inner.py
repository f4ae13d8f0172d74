"""Inner products of parameter-sized vectors: on one process, or over a model-sharded process group.

When a model is sharded (``--shard-model``, :mod:`sam_probe.core.sharded`), every
parameter-sized vector ``v`` of a solver is held as its rank's shard ``v_r`` (the
entries of the parameters that rank owns, in the same layout as its parameter
shards), and the global vector is the concatenation over ranks::

    v = (v_0, v_1, …, v_{R-1}),      uᵀv = Σ_r u_rᵀ v_r,      ‖v‖ = (Σ_r ‖v_r‖²)^½.

The solvers (:mod:`.lanczos`, :mod:`.trace`, :mod:`.density`, :mod:`.vectors`) compute every inner
product and norm through this module: outside :func:`sharded` (the default) these
are local operations; inside, the local partial sums are all-reduced, so every rank
sees the same scalars and the same small Rayleigh–Ritz matrices and takes the same
steps (all decisions depend only on reduced values).  Local arithmetic on shards
(``v ← v − c q``) needs nothing.

Accuracy at scale: a single BLAS dot or norm of float32 vectors accumulates in float32
and, on the CPU, loses about ``1e-4`` relative at ``10⁷`` entries and ``4e-3`` at ``5·10⁷``
when the terms share a sign (``‖v‖``, ``vᵀ A v`` near an eigenvector).  Lanczos vectors
normalised that way are off unit length by ``1e-3`` at ``10⁷`` parameters and the solver
stalls with residual estimates that disagree with the explicit residuals.  So local
sums of float32 and half vectors are taken in chunks of :data:`CHUNK` entries, each
chunk's products summed by torch's cascade sum and the partial sums added in float64
(about ``1e-8`` relative at ``5·10⁷``, at the cost of one BLAS dot, with no float64 copy
of a vector); norms are such sums of squares.  Float64 vectors use BLAS directly.

Random vectors: each rank draws its shard from its own stream (seed and rank), so
the global vector is a Gaussian vector of the full space; the solver's result
depends on ``R`` only through its random start (eigenvalues agree to the tolerance).
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any

import torch
from torch import Tensor

_GROUP: contextvars.ContextVar[Any] = contextvars.ContextVar("sam_probe_shard_group", default=None)
_RANK_SEED = 1_000_003  # seed offset per rank (a prime: streams of different ranks never coincide)


@contextlib.contextmanager
def sharded(group: Any = None):
    """Within this block, inner products are summed over ``group`` (``None``: the default group)."""
    import torch.distributed as dist

    token = _GROUP.set(group if group is not None else dist.group.WORLD)
    try:
        yield
    finally:
        _GROUP.reset(token)


def over(op: Any):
    """:func:`sharded` over ``op.shard_group`` when the operator (or objective) acts on shards, else nothing."""
    group = getattr(op, "shard_group", None)
    return sharded(group) if group is not None else contextlib.nullcontext()


def active() -> bool:
    """Whether vectors are shards of a model-sharded group here."""
    return _GROUP.get() is not None


def _all_reduce(t: Tensor, op: str) -> Tensor:
    """``t`` reduced entrywise by ``op`` (``SUM``, ``MAX``) over the shard group, in a copy (``t`` itself
    outside :func:`sharded`)."""
    group = _GROUP.get()
    if group is None:
        return t
    import torch.distributed as dist

    out = t.detach().clone().contiguous()
    dist.all_reduce(out, op=getattr(dist.ReduceOp, op), group=group)
    return out


def allsum(t: Tensor) -> Tensor:
    """``Σ_r t_r`` over the shard group (``t`` itself outside :func:`sharded`)."""
    return _all_reduce(t, "SUM")


CHUNK = 1 << 20  # entries per partial sum of a float32 / half inner product (module docstring)


def local_dot(a: Tensor, b: Tensor) -> Tensor:
    """This process's ``aᵀ b`` of two 1-D tensors as a float64 0-d tensor on their device: one BLAS
    call for float64, else chunks of :data:`CHUNK` summed in float64 (module docstring)."""
    if a.dtype == torch.float64 and b.dtype == torch.float64:
        return a @ b
    acc = torch.zeros((), dtype=torch.float64, device=a.device)
    for c in range(0, a.shape[0], CHUNK):
        x, y = a[c:c + CHUNK], b[c:c + CHUNK]
        if x.element_size() < 4 or y.element_size() < 4:  # half vectors: products in float32
            x, y = x.float(), y.float()
        acc += (x * y).sum().double()
    return acc


def local_gram(A: Tensor, B: Tensor) -> Tensor:
    """This process's ``Aᵀ B`` for ``A [n, a]``, ``B [n, b]`` (or 1-D), float64, each entry a
    :func:`local_dot`."""
    A2 = A[:, None] if A.dim() == 1 else A
    B2 = B[:, None] if B.dim() == 1 else B
    if A.dtype == torch.float64 and B.dtype == torch.float64:
        out = A2.T @ B2
    elif A2.shape[1] and B2.shape[1]:
        out = torch.stack([torch.stack([local_dot(A2[:, i], B2[:, j]) for j in range(B2.shape[1])])
                           for i in range(A2.shape[1])])
    else:
        out = torch.zeros(A2.shape[1], B2.shape[1], dtype=torch.float64, device=A.device)
    if B.dim() == 1:
        out = out[:, 0]
    if A.dim() == 1:
        out = out[0]
    return out


def dot(a: Tensor, b: Tensor) -> float:
    """``aᵀ b`` of two (shards of) vectors."""
    return float(allsum(local_dot(a, b).reshape(1))[0])


def local_sq(v: Tensor) -> Tensor:
    """This process's ``‖v‖²`` as a float64 0-d tensor, by :func:`local_dot` (no float64 copy of ``v``:
    ``torch.linalg.vector_norm(v, dtype=torch.float64)`` makes one, 2 parameter-sized vectors)."""
    v = v if v.dim() == 1 else v.reshape(-1)
    return local_dot(v, v)


def norm(v: Tensor) -> float:
    """``‖v‖₂`` (accumulated in float64; a float64 vector on one process: ``v.norm()``, to the last bit)."""
    if _GROUP.get() is None and v.dtype == torch.float64:
        return float(torch.linalg.vector_norm(v))
    return math.sqrt(float(allsum(local_sq(v).reshape(1))[0]))


def norms(*vs: Tensor) -> list[float]:
    """``[‖v‖₂ for v in vs]`` with one reduction over the shard group (not one per vector)."""
    if _GROUP.get() is None:
        return [norm(v) for v in vs]
    local = torch.stack([local_sq(v).cpu() for v in vs])
    return [math.sqrt(float(x)) for x in allsum(local)]


def colnorms(W: Tensor) -> Tensor:
    """``[‖W[:, j]‖₂]`` of a block ``W [P, b]`` (in ``W``'s dtype and device)."""
    if _GROUP.get() is None and W.dtype == torch.float64:
        return W.norm(dim=0)
    sq = allsum(torch.stack([local_sq(W[:, j]).cpu() for j in range(W.shape[1])])
                if W.shape[1] else torch.zeros(0, dtype=torch.float64))
    return sq.sqrt().to(device=W.device, dtype=W.dtype)


def coldots(A: Tensor, B: Tensor) -> Tensor:
    """``[A[:, j]ᵀ B[:, j]]`` in float64 on the CPU."""
    local = torch.tensor([float(local_dot(A[:, j], B[:, j])) for j in range(A.shape[1])], dtype=torch.float64)
    return allsum(local)


def gram(A: Tensor, B: Tensor) -> Tensor:
    """``Aᵀ B`` for blocks ``A [P, a]``, ``B [P, b]`` (either may be 1-D), in ``A``'s dtype (summed in
    float64: :func:`local_gram`)."""
    return allsum(local_gram(A, B)).to(dtype=A.dtype)


def size(n: int) -> int:
    """The global length of vectors whose local shards have ``n`` entries."""
    if _GROUP.get() is None:
        return int(n)
    return int(allsum(torch.tensor([int(n)], dtype=torch.int64))[0])


def rank() -> int:
    """This process's index in the shard group (0 outside :func:`sharded`)."""
    group = _GROUP.get()
    if group is None:
        return 0
    import torch.distributed as dist

    return int(dist.get_rank(group))


def sizes(n: int) -> list[int]:
    """The local lengths of every rank's shard, in rank order (``[n]`` outside :func:`sharded`)."""
    group = _GROUP.get()
    if group is None:
        return [int(n)]
    import torch.distributed as dist

    R = dist.get_world_size(group)
    t = torch.zeros(R, dtype=torch.int64)
    t[dist.get_rank(group)] = int(n)
    return [int(x) for x in allsum(t)]


def generator(seed: int) -> torch.Generator:
    """A CPU generator for random (shards of) vectors: ``seed``, offset by the rank when sharded."""
    group = _GROUP.get()
    if group is None:
        return torch.Generator().manual_seed(int(seed))
    import torch.distributed as dist

    return torch.Generator().manual_seed(int(seed) + _RANK_SEED * (dist.get_rank(group) + 1))


def allmax(t: Tensor) -> Tensor:
    """``max_r t_r`` entrywise over the shard group (``t`` itself outside :func:`sharded`)."""
    return _all_reduce(t, "MAX")


_RADIX = 8  # bits decided per pass of :func:`kth_largest`


def kth_largest(score: Any, segments: list[tuple[int, int]], ks: list[int], chunk: int = 1 << 20) -> list[float | None]:
    """The ``k``-th largest value of each segment of a non-negative vector whose entries are spread over
    the ranks (exact: the value a sort of the whole segment would give).

    ``score(a, b)``: this rank's entries ``a..b`` (float32 or float64, ``>= 0``: ``|g|`` or ``g²``);
    ``segments``: ``[(lo, hi)]`` local ranges, one per segment on every rank (the same count on every
    rank, possibly empty); ``ks``: each segment's ``k`` over all ranks (the same on every rank; ``0``:
    ``None``).  Radix selection on the bit patterns (for non-negative IEEE floats, integer order is
    value order): ``bits/8`` passes (8 for float64, 4 for float32), each reading this rank's entries
    chunk by chunk and all-reducing one ``[segments, 256]`` histogram; nothing parameter-sized is
    held.  Outside :func:`sharded` it is the same selection on the local vector."""
    if not segments:
        return []
    probe = score(segments[0][0], segments[0][0])
    itype, bits = {torch.float64: (torch.int64, 64), torch.float32: (torch.int32, 32)}.get(probe.dtype, (None, 0))
    if itype is None:
        raise TypeError(f"kth_largest needs float32 or float64 scores, got {probe.dtype}")
    remaining = [int(k) for k in ks]
    prefix = [0] * len(segments)
    device = probe.device
    for p in range(bits // _RADIX):
        shift = bits - _RADIX * (p + 1)
        hist = torch.zeros(len(segments), 1 << _RADIX, dtype=torch.int64, device=device)
        for s, (lo, hi) in enumerate(segments):
            if remaining[s] <= 0:
                continue
            for a in range(lo, hi, chunk):
                u = score(a, min(a + chunk, hi)).reshape(-1).view(itype)
                digit = (u >> shift) & ((1 << _RADIX) - 1)
                if p:
                    digit = digit[(u >> (shift + _RADIX)) == (prefix[s] >> (shift + _RADIX))]
                hist[s] += torch.bincount(digit.long(), minlength=1 << _RADIX)
        hist = allsum(hist).cpu()
        for s in range(len(segments)):
            if remaining[s] <= 0:
                continue
            above = 0
            for b in range((1 << _RADIX) - 1, -1, -1):
                h = int(hist[s, b])
                if above + h >= remaining[s]:
                    prefix[s] |= b << shift
                    remaining[s] -= above
                    break
                above += h
            else:
                raise ValueError(f"segment {s}: k = {ks[s]} is more than its entries")
    return [float(torch.tensor([prefix[s]], dtype=itype).view(probe.dtype)[0]) if int(ks[s]) > 0 else None
            for s in range(len(segments))]
