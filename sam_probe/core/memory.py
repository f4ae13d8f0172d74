"""Choosing chunk and vector-block sizes from a memory budget (``--max-memory``).

Measured, not guessed: one probe HVP (and one gradient) of the objective on
``n1`` and ``n2`` samples gives the peak memory above the baseline (CUDA:
``torch.cuda.max_memory_allocated``; CPU: the allocator events of
:mod:`torch.profiler`), fitted as

    peak(c) = fixed + a · c        (a = per-sample activation/graph memory)

from probes at ``n1 = 4`` and ``n2 = 12`` samples, then ``a`` is raised by a 20%
``margin`` (measured slopes grow slightly with the chunk: allocator rounding,
kernel workspaces); ``fixed`` is the intercept before the margin.

The budget ``B`` (per process) is then spent as

    B = fixed + R · v + 4 b · v + a · c · (b if fwd-rev else 1)

with ``v = P · itemsize`` one flat vector, ``R = reserve_vectors`` flat vectors
kept by the analysis's solver (default ``RESERVE_K + c`` = 18: the lean solvers' ``k + c``
for ``k`` up to 10, :mod:`sam_probe.core.vectors`), ``b`` the vector block (its input, transposed
copy, result and its transpose: 4 b vectors, as measured on ResNet-18; rev-rev HVPs run one double-backward per vector so
activations do not grow with ``b``, fwd-rev ``vmap`` holds ``b`` tangents) and
``c`` the chunk.  ``b`` is the largest power of two ≤ 8 whose vectors take at most
half of what is left after ``fixed + R v``; ``c`` takes the rest (at least 1, at
most the samples of this rank).  Chunk and block sizes are memory-only: losses,
gradients and HVPs are exact means either way (except BatchNorm in train mode,
where the chunk is the batch).

Whatever is left once the chunk holds every sample goes to the solvers:
``solver_vectors = R + ⌊(B - fixed - R v - 4 b v - a · N') / v⌋`` (``N'`` the samples of a
chunk), from which :func:`solver_plan` picks each solve's basis size and whether it keeps
the basis's products (a larger basis saves products; stored products save the ``k``
certificate products).  Without a budget the solvers keep ``k + c`` vectors.

When the gradient graphs of *every* chunk fit too (``fixed + R v + 4 b v + a · N ≤ B``
for the rank's ``N`` samples; ``rev-rev`` only) the plan sets ``keep_graphs``: inside
:meth:`~sam_probe.core.objective.Objective.reuse_graph` each chunk's graph is built once
(one joint graph) and every further HVP is one double backward, as for an unchunked objective.
That matters when the chunks are chosen by the user (``--batch-size``, e.g. BatchNorm
batches in train mode); a planned chunk is the whole selection whenever it would fit.
"""
from __future__ import annotations

import contextlib
import os
import re
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

BLOCK_VECTORS = 4  # flat vectors held per column of a vector block (bench/memory.py measures 4.0)
RESERVE_K = 10  # the k the plan reserves solver vectors for (k + c); a larger k asks for more itself
BIG_BASIS = 20  # basis rows beyond which a Lanczos solve gains little (the pre-lean default)
UNITS = {"": 1, "k": 2 ** 10, "m": 2 ** 20, "g": 2 ** 30, "t": 2 ** 40}


def parse_memory(text: str | int | float) -> int:
    """Bytes in ``'2GB'``, ``'512M'``, ``'1.5GiB'``, ``'800000'`` (K, M, G, T are powers of 1024)."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(i?[bB])?\s*", str(text))
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"memory size {text!r}: use a positive number with K, M, G or T, e.g. 2GB or 512MiB")
    return int(float(m.group(1)) * UNITS[m.group(2).lower()])


@contextlib.contextmanager
def _quiet_stderr():
    """Silence C++ chatter (the profiler's start/stop lines) on file descriptor 2."""
    try:
        fd = os.dup(2)
    except OSError:  # pragma: no cover - no stderr
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(fd, 2)
        os.close(fd)


def peak_bytes(fn: Callable[[], Any], device: torch.device | str) -> int:
    """Peak memory allocated by torch while ``fn()`` runs, above the level before it."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - base)
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    cur = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        cur += e.nbytes()
        peak = max(peak, cur)
    return int(peak)


@dataclass
class MemoryPlan:
    """Chunk and vector-block sizes chosen for ``budget`` bytes, with the fitted model."""

    chunk_size: int
    vector_block: int
    budget: int
    per_sample: float  # a, bytes
    fixed: float  # bytes
    vector_bytes: int  # v
    reserve_vectors: int  # R
    predicted_peak: float
    fits: bool
    probe: list[tuple[int, int]]  # (samples, peak bytes)
    keep_graphs: bool = False  # every chunk's gradient graph fits beside the vectors: kept between HVPs
    solver_vectors: int = 0  # parameter-sized vectors the solvers may hold (>= reserve_vectors)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan_memory(obj, budget: int | str, *, reserve_vectors: int | None = None, probe: tuple[int, int] = (4, 12),
                max_block: int = 8, margin: float = 1.2) -> MemoryPlan:
    """:class:`MemoryPlan` for :class:`~sam_probe.core.objective.Objective` ``obj`` (rule: module docstring).

    The probes (two HVPs and two gradients) run on this process's first samples, unsharded, at ``obj.params``
    (a few passes; nothing is modified).
    """
    from .vectors import WORK_VECTORS

    budget = parse_memory(budget)
    if reserve_vectors is None:
        reserve_vectors = RESERVE_K + WORK_VECTORS
    n_avail, idx_lo = max(1, obj.n_local), obj.lo if obj.n_local else 0
    n1, n2 = (min(probe[0], n_avail), min(probe[1], n_avail))
    fwdrev = obj.hvp_method == "fwd-rev"
    points: list[tuple[int, int]] = []
    for n in sorted({n1, n2}):
        idx = torch.arange(idx_lo, min(idx_lo + n, obj.n_samples))
        sub = _unsharded(obj, idx)
        v = torch.ones(obj.n_params, 1, dtype=obj.dtype, device=obj.device)
        peak = max(peak_bytes(lambda: sub.hvp_block(v), obj.device), peak_bytes(sub.grad, obj.device))
        points.append((n, peak))
    if len(points) == 2 and points[1][1] > points[0][1]:
        (x1, y1), (x2, y2) = points
        a = (y2 - y1) / (x2 - x1)
    else:  # one sample, or no growth measured: charge everything per sample (safe)
        a = points[-1][1] / points[-1][0]
    fixed = max(0.0, points[0][1] - a * points[0][0])
    a *= margin  # allocator rounding and kernel workspaces grow a little faster than the probes show
    from .precision import solver_dtype

    vec = obj.n_params * torch.empty((), dtype=solver_dtype(obj.dtype)).element_size()  # the solvers' vectors
    left = budget - fixed - reserve_vectors * vec
    b = max_block
    while b > 1 and BLOCK_VECTORS * b * vec > left / 2:
        b //= 2
    per_chunk_sample = a * (b if fwdrev else 1)
    c = int((left - BLOCK_VECTORS * b * vec) // per_chunk_sample) if per_chunk_sample > 0 else n_avail
    fits = c >= 1
    c = max(1, min(c, n_avail))
    predicted = fixed + reserve_vectors * vec + BLOCK_VECTORS * b * vec + per_chunk_sample * c
    # the graphs of all chunks together cost about what one chunk of every sample would
    keep = not fwdrev and fixed + reserve_vectors * vec + BLOCK_VECTORS * b * vec + a * n_avail <= budget
    spare = budget - predicted if c >= n_avail else 0.0  # the chunk holds every sample: the rest is the solvers'
    solver_vectors = reserve_vectors + max(0, int(spare // vec)) if vec else reserve_vectors
    return MemoryPlan(chunk_size=c, vector_block=b, budget=budget, per_sample=float(a), fixed=float(fixed),
                      vector_bytes=int(vec), reserve_vectors=reserve_vectors, predicted_peak=float(predicted),
                      fits=bool(fits), probe=points, keep_graphs=bool(keep), solver_vectors=int(solver_vectors))


def solver_plan(k: int, P: int, dtype: torch.dtype, block_size: int = 1, *, memory_plan: Any = None,
                max_vectors: int | None = None, max_basis: int | None = None, keep_products: bool | None = None,
                where: Any = None) -> dict[str, Any]:
    """Basis size, stored products and where the basis lives for a ``k``-pair Lanczos solve.

    The vectors allowed: ``max_vectors``, else the memory plan's ``solver_vectors`` (never
    below ``k + c``), else ``k + c``.  A basis of ``max(BIG_BASIS + b, 2k + 3b)`` rows is
    taken when it fits (more rows save few products), with its products too when they fit
    beside it (the certificate then needs no extra products); otherwise the basis gets every
    vector left beside the product block (lean).  A basis in files (``where`` a directory)
    takes no memory: it gets the large basis.  A plain dict (JSON-ready) for results and
    unit metadata."""
    from .lanczos import default_basis, vectors_needed
    from .vectors import WORK_VECTORS, where_label

    b = max(1, int(block_size))
    itemsize = torch.empty((), dtype=dtype).element_size()
    lean = k + WORK_VECTORS
    if max_vectors is not None:
        vectors, source = int(max_vectors), "max_vectors"
    elif memory_plan is not None and int(getattr(memory_plan, "solver_vectors", None) or 0) > 0:
        vectors, source = max(lean, int(memory_plan.solver_vectors)), "memory plan"
    else:
        vectors, source = lean, "k + c"
    big = max(BIG_BASIS + b, 2 * k + 3 * b)
    on_disk = where not in (None, "device", "cpu")
    if max_basis is not None:
        m = int(max_basis)
        keep = bool(keep_products) if keep_products is not None else \
            vectors_needed(k, b, m, True) <= vectors and not on_disk
    elif on_disk:
        m, keep = big, bool(keep_products)
    elif keep_products is not False and vectors_needed(k, b, big, True) <= vectors:
        m, keep = big, True
    elif keep_products:
        m, keep = default_basis(k, b, vectors, True), True
    else:
        m, keep = min(big, default_basis(k, b, vectors, False)), False
    from . import inner

    m = min(max(m, k + 2 * b), inner.size(P))  # the dimension (P: a shard's length when the model is sharded)
    plan = {"basis_vectors": m, "keep_products": keep, "block": b, "vector_budget": vectors, "budget_from": source,
            "vectors": vectors_needed(k, b, m, keep), "vector_bytes": P * itemsize,
            "basis_device": where_label(where)}
    if memory_plan is not None:
        plan["chunk"] = getattr(memory_plan, "chunk_size", None)
        plan["vector_block"] = getattr(memory_plan, "vector_block", None)
    return plan


def _unsharded(obj, idx: torch.Tensor):
    """``obj`` on samples ``idx`` in this process alone (no collectives), for probing."""
    return obj.subset(idx, shard=False)


def fit_memory(obj, budget: int | str, chunk_size: int | None = None, cache: dict | None = None):
    """``obj`` re-chunked by :func:`plan_memory` (an explicit ``chunk_size`` wins over the planned one).

    Plans are cached in ``cache`` per architecture, selection size, dtype, device and budget.
    With a process group every rank takes rank 0's plan, so shards are dealt alike.
    """
    from .. import distributed

    key = (type(obj.model).__name__, obj.n_params, obj.n_samples, str(obj.dtype), str(obj.device.type),
           obj.hvp_method, parse_memory(budget))
    plan = None if cache is None else cache.get(key)
    if plan is None:
        plan = plan_memory(obj, budget) if distributed.is_main() or not obj.sharded else None
        if obj.sharded:
            plan = distributed.broadcast_object(plan)
        if cache is not None:
            cache[key] = plan
    out = obj.rechunked(chunk_size or plan.chunk_size, plan.vector_block)
    out.memory_plan = plan
    out.keep_graphs = bool(getattr(plan, "keep_graphs", False))
    return out
