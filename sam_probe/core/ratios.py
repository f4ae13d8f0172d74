"""SAM gradient-ratio analysis of one checkpoint (docs/metrics.md, "Ratio categories").

With ``g = ∇L(w)`` and ``g~ = ∇L(w + e)`` on the same data (:mod:`.perturb`),
``r_i = g~_i / g_i`` puts every parameter in one of C1..C4, boundary, undefined
(:mod:`.categories`); counts sum to ``P`` and fractions are of ``P``.  On top:

- C1 ratio bins ``(1, e_0) [e_0, e_1) ... [e_last, inf)`` (:func:`bucket_counts`);
- C1 magnitude split (:func:`magnitude_split`): ``k = |C1|``, ``tau`` = the k-th
  largest ``|g_i|`` over all i, ``share = |{i ∈ C1 : |g_i| > tau}| / k``,
  ``chance = k / P``, ``lift = share / chance``;
- the same per parameter tensor (:func:`per_layer_breakdown`).

Everything after the two gradients is a pure function of ``(g, g~)``
(:func:`ratio_from_gradients`).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import bitpack
from .categories import CATEGORIES, CODE, codes_from_ratio, ratio
from .objective import Objective
from .params import ParamSpace
from .perturb import chunk_size, perturbed_gradient

DEFAULT_EDGES: tuple[float, ...] = (1.2, 1.5, 2.0, 4.0, 8.0, 16.0)


# ------------------------------------------------------------- pure pieces
N_CAT = len(CATEGORIES)


def check_edges(edges: Sequence[float]) -> tuple[float, ...]:
    """Bin edges of C1 ratios: strictly increasing, all > 1."""
    e = tuple(float(x) for x in edges)
    if any(not math.isfinite(x) or x <= 1.0 for x in e):
        raise ValueError(f"C1 ratio edges must be finite and > 1, got {list(edges)}")
    if any(b <= a for a, b in zip(e, e[1:])):
        raise ValueError(f"C1 ratio edges must be strictly increasing, got {list(edges)}")
    return e


def fractions(cnt: dict[str, int], n: int) -> dict[str, float]:
    """``{category: count / n}`` (0 when ``n = 0``)."""
    return {k: (v / n if n else 0.0) for k, v in cnt.items()}


def as_numpy(x: Tensor | np.ndarray) -> np.ndarray:
    """Flat CPU numpy view (a copy only off-CPU or for half precisions)."""
    if isinstance(x, Tensor):
        x = x.detach()
        if x.is_floating_point() and x.dtype not in (torch.float32, torch.float64):
            x = x.float()
        x = x.cpu().numpy()
    return np.asarray(x).reshape(-1)


def bin_index(r: Tensor | np.ndarray, edges: Sequence[float]) -> np.ndarray:
    """Bin of each ratio: ``Σ_j [r >= e_j]``, i.e. ``i`` with ``e_{i-1} <= r < e_i``."""
    r = as_numpy(r)
    if len(edges) > 64:
        return np.searchsorted(np.asarray(edges, dtype=r.dtype), r, side="right")
    idx = np.zeros(r.shape, dtype=np.uint8)
    for e in edges:
        idx += r >= e
    return idx


def _bins(cnt: Sequence[int], edges: tuple[float, ...]) -> list[dict[str, Any]]:
    lows = (1.0,) + edges
    highs = edges + (math.inf,)
    return [{"lo": lo, "hi": hi, "count": int(c)} for lo, hi, c in zip(lows, highs, cnt)]


def bucket_counts(r_c1: Tensor | np.ndarray, edges: Sequence[float] = DEFAULT_EDGES) -> list[dict[str, Any]]:
    """Histogram of C1 ratios (all > 1) over ``(1, e_0) [e_0, e_1) ... [e_last, inf)``.

    Returns ``[{lo, hi, count}]``; ``hi`` of the last bin is ``math.inf``.
    """
    e = check_edges(edges)
    return _bins(np.bincount(bin_index(r_c1, e), minlength=len(e) + 1).tolist(), e)


def kth_largest(a: Tensor | np.ndarray, k: int) -> float:
    """The ``k``-th largest entry of ``a`` (1 <= k <= numel), by selection (O(P))."""
    a = as_numpy(a)
    n = a.size
    if not 1 <= k <= n:
        raise ValueError(f"k must be in 1..{n}, got {k}")
    return float(np.partition(a, n - k)[n - k])


def _split(a: np.ndarray, c1: np.ndarray, k: int) -> dict[str, float | None]:
    """Magnitude split of the ``k`` entries ``c1`` (bool) given ``a = |g|``."""
    n = a.size
    if k == 0 or n == 0:
        return {"tau": None, "share": None, "chance": 0.0, "lift": None}
    tau = kth_largest(a, k)
    share = int(np.count_nonzero((a > tau) & c1)) / k
    chance = k / n
    return {"tau": tau, "share": share, "chance": chance, "lift": share / chance}


def magnitude_split(g: Tensor | np.ndarray, in_c1: Tensor | np.ndarray) -> dict[str, float | None]:
    """``{tau, share, chance, lift}`` of the set ``in_c1`` (bool, same shape as ``g``).

    ``tau`` = the ``|C1|``-th largest ``|g_i|`` over all ``i``; ``share`` = fraction of
    C1 with ``|g_i| > tau``; ``chance = |C1| / P``; ``lift = share / chance``.
    With ``|C1| = 0``: ``tau``, ``share`` and ``lift`` are ``None``, ``chance`` is 0.
    """
    c1 = as_numpy(in_c1).astype(bool, copy=False)
    return _split(np.abs(as_numpy(g)), c1, int(np.count_nonzero(c1)))


def per_layer_counts(codes: Tensor | np.ndarray, space: ParamSpace) -> list[dict[str, Any]]:
    """``[{name, n, counts}]`` per parameter tensor; they sum to the global counts."""
    c = as_numpy(codes)
    out = []
    for name, sl in space.slices().items():
        bc = np.bincount(c[sl], minlength=N_CAT)
        out.append({"name": name, "n": sl.stop - sl.start,
                    "counts": {k: int(bc[i]) for i, k in enumerate(CATEGORIES)}})
    return out


def category_bin_key(codes: Tensor | np.ndarray, r: Tensor | np.ndarray, edges: tuple[float, ...]) -> np.ndarray:
    """One small integer per parameter: its code, or ``6 + bin`` for C1 (see :func:`tally`)."""
    c = as_numpy(codes)
    b = bin_index(r, edges)
    dtype = np.uint8 if N_CAT + len(edges) + 1 <= 255 else np.int64
    c1 = (c == CODE["C1"]).view(np.uint8)
    return c.astype(dtype) + (b.astype(dtype, copy=False) + dtype(N_CAT)) * c1.astype(dtype, copy=False)


def tally(key: np.ndarray, edges: tuple[float, ...]) -> tuple[dict[str, int], list[int]]:
    """``(counts, C1 bin counts)`` from :func:`category_bin_key` values, one bincount."""
    bc = np.bincount(key.reshape(-1), minlength=N_CAT + len(edges) + 1).tolist()
    c1_bins = bc[N_CAT:]
    cnt = {name: int(bc[i]) for i, name in enumerate(CATEGORIES)}
    cnt["C1"] = int(sum(c1_bins))
    return cnt, c1_bins


def per_layer_breakdown(codes: Tensor | np.ndarray, g: Tensor | np.ndarray, r: Tensor | np.ndarray,
                        space: ParamSpace, edges: Sequence[float] = DEFAULT_EDGES) -> list[dict[str, Any]]:
    """Per parameter tensor: ``{name, n, counts, fractions (of n), buckets, magnitude_split}``.

    ``r`` is the ratio vector behind ``codes``; the per-tensor magnitude split
    ranks ``|g_i|`` within the tensor.
    """
    e = check_edges(edges)
    key = category_bin_key(codes, r, e)
    a = np.abs(as_numpy(g))
    c1 = key >= N_CAT
    out = []
    for name, sl in space.slices().items():
        cnt, c1_bins = tally(key[sl], e)
        n = sl.stop - sl.start
        out.append({"name": name, "n": n, "counts": cnt, "fractions": fractions(cnt, n),
                    "buckets": _bins(c1_bins, e), "magnitude_split": _split(a[sl], c1[sl], cnt["C1"])})
    return out


# ----------------------------------------------------------------- result
def _norm(v: Tensor) -> float:
    """``||v||`` accumulated in float64 (a half-precision ``v`` chunk by chunk: a whole float64 copy would
    be four vectors of its size)."""
    if v.dtype in (torch.float32, torch.float64):
        return float(torch.linalg.vector_norm(v, dtype=torch.float64))
    c = chunk_size()
    sq = sum(float(torch.linalg.vector_norm(v[s:s + c], dtype=torch.float64)) ** 2 for s in range(0, v.numel(), c))
    return math.sqrt(sq)


def _json_float(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _json_buckets(buckets: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"lo": b["lo"], "hi": _json_float(b["hi"]), "count": b["count"]} for b in buckets]


@dataclass
class RatioResult:
    """Ratio categories of one checkpoint; the codes are kept bit-packed (:mod:`.bitpack`) for storage."""

    rho: float
    variant: str
    n_params: int
    grad_norm: float
    perturbed_grad_norm: float
    counts: dict[str, int]
    fractions: dict[str, float]
    buckets: list[dict[str, Any]]
    magnitude_split: dict[str, float | None]
    per_layer: list[dict[str, Any]]
    packed: bitpack.Packed = field(repr=False)
    m: int | None = None
    eta: float = 0.01
    eps: float = 1e-12
    faithful: bool = False
    edges: tuple[float, ...] = DEFAULT_EDGES
    ire_flat: np.ndarray | None = field(default=None, repr=False)  # packed IRE flat mask, when asked for

    @property
    def codes(self) -> Tensor:
        """Category code per parameter (uint8 ``[P]``, unpacked on demand: one byte per parameter)."""
        return torch.from_numpy(bitpack.unpack_codes(self.packed))

    def to_dict(self) -> dict[str, Any]:
        """The issue's JSON entry (without path/step and without the codes).

        The open last bin has ``hi = None``; per-layer entries carry
        ``name, n, counts`` plus ``fractions, buckets, magnitude_split``.
        """
        per_layer = []
        for e in self.per_layer:
            d = {"name": e["name"], "n": e["n"], "counts": dict(e["counts"])}
            if "fractions" in e:
                d["fractions"] = dict(e["fractions"])
                d["buckets"] = _json_buckets(e["buckets"])
                d["magnitude_split"] = dict(e["magnitude_split"])
            per_layer.append(d)
        return {
            "rho": self.rho,
            "variant": self.variant,
            "n_params": self.n_params,
            "grad_norm": self.grad_norm,
            "perturbed_grad_norm": self.perturbed_grad_norm,
            "counts": dict(self.counts),
            "fractions": dict(self.fractions),
            "buckets": _json_buckets(self.buckets),
            "magnitude_split": dict(self.magnitude_split),
            "per_layer": per_layer,
        }

    def config(self) -> dict[str, Any]:
        """The options that produced this result."""
        return {"rho": self.rho, "variant": self.variant, "m": self.m, "eta": self.eta,
                "eps": self.eps, "faithful": self.faithful, "edges": list(self.edges)}

    def packed_codes(self) -> bitpack.Packed:
        """Codes in the compact format of :mod:`.bitpack` (for the HDF5 store)."""
        return self.packed


def _buffer(n: int, dtype: Any, zero: bool = False) -> np.ndarray:
    """A numpy array in memory from torch's allocator (so the memory tests' tracked peak sees it)."""
    t = torch.from_numpy(np.empty(0, dtype=dtype))
    buf = (torch.zeros if zero else torch.empty)(int(n), dtype=t.dtype)
    return buf.numpy()


class CodePacker:
    """Builds the :func:`~.bitpack.pack_codes` dict of ``n`` codes from chunks given in order,
    each starting at a multiple of 8 (bit planes of P/8 bytes; exception indices are kept
    only while they are smaller than a plane)."""

    def __init__(self, n: int):
        nb = bitpack.n_bytes(n)
        self.n = n
        self.lo, self.hi, self.exc = (_buffer(nb, np.uint8, zero=True) for _ in range(3))
        self.itype = np.uint32 if n <= bitpack._INDEX_LIMIT else np.uint64
        self.idx: list[np.ndarray] | None = []
        self.n_exc = 0

    def add(self, start: int, codes: np.ndarray) -> None:
        if start % 8:
            raise ValueError("chunks of codes must start at a multiple of 8")
        b = start // 8
        e = b + bitpack.n_bytes(codes.size)
        self.lo[b:e] = np.packbits(codes & 1)
        self.hi[b:e] = np.packbits(codes & 2)
        exc = codes >= 4
        self.exc[b:e] = np.packbits(exc)
        if self.idx is not None:
            idx = np.flatnonzero(exc)
            self.n_exc += idx.size
            if self.n_exc * np.dtype(self.itype).itemsize > bitpack.n_bytes(self.n):
                self.idx = None  # the dense plane is smaller: indices are not needed
            elif idx.size:
                self.idx.append((idx + start).astype(self.itype))

    def c1_bits(self, start: int, count: int) -> np.ndarray:
        """Boolean ``[count]``: which of the codes ``start ..`` are C1 (``start`` a multiple of 8)."""
        b = start // 8
        e = b + bitpack.n_bytes(count)
        return np.unpackbits(~(self.lo[b:e] | self.hi[b:e] | self.exc[b:e]), count=count).astype(bool)

    def packed(self) -> bitpack.Packed:
        dense = self.idx is None
        exc = self.exc if dense else (np.concatenate(self.idx) if self.idx else np.zeros(0, dtype=self.itype))
        return {"version": bitpack.VERSION, "n": self.n, "lo": self.lo, "hi": self.hi,
                "exc_dense": int(dense), "exc": exc}


def _spans(bounds: np.ndarray, start: int, stop: int):
    """``(j, a, b)``: the part ``[a, b)`` (relative to ``start``) of ``[start, stop)`` in tensor ``j``,
    whose flat range is ``[bounds[j], bounds[j+1])``."""
    j = int(np.searchsorted(bounds, start, side="right")) - 1
    while j < len(bounds) - 1 and bounds[j] < stop:
        a, b = max(bounds[j], start), min(bounds[j + 1], stop)
        if b > a:
            yield j, a - start, b - start
        j += 1


def _score_numpy(x: Tensor) -> np.ndarray:
    """``g²`` of a chunk as :func:`~.overlap.flat_mask` reads it (low precision -> float64)."""
    x = x.detach().cpu()
    return (x if x.dtype in (torch.float32, torch.float64) else x.double()).numpy().reshape(-1)


def flat_mask_streamed(g: Tensor, rank: float, scratch: np.ndarray | None = None,
                       chunk: int | None = None) -> np.ndarray:
    """:func:`~.overlap.flat_mask` of ``g²`` (bit-identical) with one score vector (``scratch``,
    reused when given) for the selection, and everything else chunk by chunk."""
    from .overlap import sharp_count

    n = g.numel()
    chunk = chunk_size(chunk)
    k, trivial = sharp_count(n, rank)
    if trivial is not None:
        return trivial
    first = _score_numpy(g[:1].square())
    if scratch is None or scratch.dtype != first.dtype or scratch.size != n:
        scratch = _buffer(n, first.dtype)
    for s in range(0, n, chunk):
        scratch[s:s + chunk] = _score_numpy(g[s:s + chunk].square())
    scratch.partition(n - k)
    thr = scratch[n - k]  # the k-th largest score
    sharp = 0
    for s in range(0, n, chunk):
        sharp += int(np.count_nonzero(_score_numpy(g[s:s + chunk].square()) > thr))
    need = k - sharp  # ties at the threshold go to the lowest indices
    out = _buffer(bitpack.n_bytes(n), np.uint8)
    for s in range(0, n, chunk):
        sc = _score_numpy(g[s:s + chunk].square())
        mask = sc > thr
        if need > 0:
            ties = np.flatnonzero(sc == thr)[:need]
            mask[ties] = True
            need -= ties.size
        np.logical_not(mask, out=mask)
        out[s // 8:s // 8 + bitpack.n_bytes(sc.size)] = np.packbits(mask)
    return out


def ratio_from_gradients(g: Tensor, g_tilde: Tensor, space: ParamSpace | None = None, *,
                         rho: float = 0.05, variant: str = "l2", m: int | None = None,
                         eta: float = 0.01, eps: float = 1e-12, faithful: bool = False,
                         edges: Sequence[float] = DEFAULT_EDGES,
                         per_layer: bool = True, ire_rank: float | None = None,
                         chunk: int | None = None) -> RatioResult:
    """All ratio statistics from flat ``g`` and ``g~`` (``space`` for the per-layer part).

    Streamed: ``r``, the codes and the tallies exist one chunk of ``chunk`` entries at a
    time; codes go straight into their bit planes.  Beyond ``g`` and ``g~`` it holds one
    parameter-sized vector (``|g|``, then ``g²`` with ``ire_rank``: the selections of the
    magnitude split and of the IRE flat mask) and the planes (``P/8`` bytes each).
    """
    e = check_edges(edges)
    chunk = chunk_size(chunk)
    g = g.reshape(-1)
    g_tilde = g_tilde.reshape(-1)
    if g.shape != g_tilde.shape:
        raise ValueError(f"g has {g.numel()} entries but g~ has {g_tilde.numel()}")
    n = g.numel()
    with_layers = per_layer and space is not None
    if with_layers:
        assert space is not None
        if space.size != n:
            raise ValueError(f"parameter space has {space.size} entries, gradients {n}")
        names = list(space.slices())
        bounds = np.asarray([0, *(sl.stop for sl in space.slices().values())], dtype=np.int64)
    else:
        names, bounds = [""], np.asarray([0, n], dtype=np.int64)
    n_keys = N_CAT + len(e) + 1
    bc = np.zeros((len(names), n_keys), dtype=np.int64)
    packer = CodePacker(n)
    for s in range(0, n, chunk):  # pass 1: ratio, codes, bins, tallies; codes into the planes
        gc, tc = g[s:s + chunk], g_tilde[s:s + chunk]
        r = ratio(gc, tc, eps, faithful)
        codes = as_numpy(codes_from_ratio(r))
        packer.add(s, codes)
        key = category_bin_key(codes, r, e)
        for j, a, b in _spans(bounds, s, s + codes.size):
            bc[j] += np.bincount(key[a:b], minlength=n_keys)
    grad_norm, perturbed_grad_norm = _norm(g), _norm(g_tilde)
    tallies = [_tally_counts(row, e) for row in bc]
    if with_layers:
        cnt = {c: sum(t[0][c] for t in tallies) for c in CATEGORIES}
        c1_bins = [sum(t[1][i] for t in tallies) for i in range(len(e) + 1)]
    else:
        cnt, c1_bins = tallies[0]
    # magnitude split: the k-th largest |g| by selection on one scratch vector (per tensor first:
    # each partition permutes within its tensor only), then counts chunk by chunk
    a0 = np.abs(as_numpy(g[:1]))
    scratch = _buffer(n, a0.dtype)
    for s in range(0, n, chunk):
        np.abs(as_numpy(g[s:s + chunk]), out=scratch[s:s + chunk])
    taus: list[float | None] = []
    for j in range(len(names) if with_layers else 0):
        lo, hi, k = int(bounds[j]), int(bounds[j + 1]), tallies[j][0]["C1"]
        if k == 0 or hi == lo:
            taus.append(None)
            continue
        view = scratch[lo:hi]
        view.partition(hi - lo - k)
        taus.append(float(view[hi - lo - k]))
    k_all = cnt["C1"]
    tau_all = None
    if k_all and n:
        scratch.partition(n - k_all)
        tau_all = float(scratch[n - k_all])
    above = np.zeros(len(names), dtype=np.int64)
    above_all = 0
    for s in range(0, n, chunk):  # pass 2: C1 entries above tau
        a = np.abs(as_numpy(g[s:s + chunk]))
        c1 = packer.c1_bits(s, a.size)
        if tau_all is not None:
            above_all += int(np.count_nonzero((a > tau_all) & c1))
        for j, lo, hi in (_spans(bounds, s, s + a.size) if with_layers else ()):
            if taus[j] is not None:
                above[j] += int(np.count_nonzero((a[lo:hi] > taus[j]) & c1[lo:hi]))
    layers = []
    for j, name in enumerate(names if with_layers else ()):
        lc, lbins = tallies[j]
        nj = int(bounds[j + 1] - bounds[j])
        layers.append({"name": name, "n": nj, "counts": lc, "fractions": fractions(lc, nj),
                       "buckets": _bins(lbins, e), "magnitude_split": _split_of(taus[j], int(above[j]), lc["C1"], nj)})
    ire = flat_mask_streamed(g, ire_rank, scratch, chunk) if ire_rank is not None else None
    del scratch
    return RatioResult(
        rho=float(rho), variant=variant, n_params=n,
        grad_norm=grad_norm, perturbed_grad_norm=perturbed_grad_norm,
        counts=cnt, fractions=fractions(cnt, n), buckets=_bins(c1_bins, e),
        magnitude_split=_split_of(tau_all, above_all, k_all, n),
        per_layer=layers, packed=packer.packed(), m=m, eta=float(eta), eps=float(eps), faithful=bool(faithful),
        edges=e, ire_flat=ire,
    )


def ratio_from_shards(g: Tensor, g_tilde: Tensor, space: Any, *, rho: float = 0.05, variant: str = "l2",
                      m: int | None = None, eta: float = 0.01, eps: float = 1e-12, faithful: bool = False,
                      edges: Sequence[float] = DEFAULT_EDGES, ire_rank: float | None = None,
                      chunk: int | None = None) -> RatioResult:
    """:func:`ratio_from_gradients` of a model-sharded objective (``--shard-model``): ``g``, ``g~`` are this
    rank's shards (laid out as ``space``, a :class:`~.sharded.ShardSpace`); call it inside
    :func:`.inner.sharded`, on every rank.  The same numbers as one process on the whole vectors:

    - codes per shard (elementwise); the per-tensor tallies ``[tensors, keys]`` summed over ranks;
    - norms from float64 partial sums; the magnitude split's ``tau`` (the ``|C1|``-th largest ``|g|``,
      overall and per tensor) and the IRE threshold (the ``k``-th largest ``g²``) by an exact distributed
      radix selection (:func:`.inner.kth_largest`), then counts summed over ranks; IRE ties at the
      threshold go to the lowest *global* indices (tensor by tensor, rank by rank, as one process
      orders them);
    - the codes and the IRE mask gathered to rank 0 in one process's flat order
      (:func:`.sharded.gather_flat`) and packed there, so the stored bytes are those of one process.

    Memory per rank: ``g``, ``g~`` (shards) and one byte per local entry (codes, then the local mask);
    rank 0 also holds, for packing, one byte per parameter of the whole model (``P`` bytes, the codes,
    then the mask) and the packed planes (``P/8`` bytes each).  Cost: the radix selections read ``|g|``
    (and ``g²``) 8 times in float64, 4 in float32, with one small all-reduce per pass.  Ranks other
    than 0 return the statistics with ``packed = None`` and ``ire_flat = None``."""
    from . import inner
    from .sharded import gather_flat

    e = check_edges(edges)
    chunk = chunk_size(chunk)
    g, g_tilde = g.reshape(-1), g_tilde.reshape(-1)
    if g.shape != g_tilde.shape or g.numel() != space.size:
        raise ValueError(f"shards of {g.numel()} and {g_tilde.numel()} entries for a shard space of {space.size}")
    n_loc = g.numel()
    names = list(space.names)
    bounds = np.asarray(space.offsets, dtype=np.int64)
    sizes = [math.prod(sh) for sh in space.shapes]  # each tensor's global numel
    N = int(sum(sizes))
    n_keys = N_CAT + len(e) + 1
    codes = _buffer(n_loc, np.uint8)
    bc = np.zeros((len(names), n_keys), dtype=np.int64)
    for s in range(0, n_loc, chunk):  # ratio, codes, bins and tallies of this rank's entries
        r = ratio(g[s:s + chunk], g_tilde[s:s + chunk], eps, faithful)
        c = as_numpy(codes_from_ratio(r))
        codes[s:s + c.size] = c
        key = category_bin_key(c, r, e)
        for j, a, b in _spans(bounds, s, s + c.size):
            bc[j] += np.bincount(key[a:b], minlength=n_keys)
    bc = _allsum_np(bc, g.device)
    grad_norm, perturbed_grad_norm = inner.norm(g), inner.norm(g_tilde)
    tallies = [_tally_counts(row, e) for row in bc]
    cnt = {c: sum(t[0][c] for t in tallies) for c in CATEGORIES}
    c1_bins = [sum(t[1][i] for t in tallies) for i in range(len(e) + 1)]
    # magnitude split: tau per tensor and overall, one selection for all of them
    segments = [(int(bounds[j]), int(bounds[j + 1])) for j in range(len(names))] + [(0, n_loc)]
    ks = [t[0]["C1"] for t in tallies] + [cnt["C1"]]
    taus = inner.kth_largest(lambda a, b: g[a:b].abs(), segments, ks, chunk)
    c1 = codes == CODE["C1"]
    above = np.zeros(len(names) + 1, dtype=np.int64)
    for j, (lo, hi) in enumerate(segments):
        if taus[j] is None:
            continue
        for s in range(lo, hi, chunk):
            t = min(s + chunk, hi)
            above[j] += int(np.count_nonzero((np.abs(as_numpy(g[s:t])) > taus[j]) & c1[s:t]))
    above = _allsum_np(above, g.device)
    del c1
    layers = []
    for j, name in enumerate(names):
        lc, lbins = tallies[j]
        layers.append({"name": name, "n": sizes[j], "counts": lc, "fractions": fractions(lc, sizes[j]),
                       "buckets": _bins(lbins, e),
                       "magnitude_split": _split_of(taus[j], int(above[j]), lc["C1"], sizes[j])})
    main = inner.rank() == 0
    full = gather_flat(torch.from_numpy(codes).to(g.device), space)
    del codes
    packed = None
    if main:
        assert full is not None
        packer = CodePacker(N)
        for s in range(0, N, chunk):
            packer.add(s, full[s:s + chunk].numpy())
        packed = packer.packed()
    del full
    ire = flat_mask_of_shards(g, space, ire_rank, chunk) if ire_rank is not None else None
    return RatioResult(
        rho=float(rho), variant=variant, n_params=N, grad_norm=grad_norm, perturbed_grad_norm=perturbed_grad_norm,
        counts=cnt, fractions=fractions(cnt, N), buckets=_bins(c1_bins, e),
        magnitude_split=_split_of(taus[-1], int(above[-1]), cnt["C1"], N), per_layer=layers,
        packed=packed, m=m,  # type: ignore[arg-type]  # (None off rank 0) eta=float(eta), eps=float(eps), faithful=bool(faithful), edges=e,
        ire_flat=ire if main else None,
    )


def _allsum_np(a: np.ndarray, device: Any) -> np.ndarray:
    """An integer array summed over the shard group (through ``device``: the backend's own)."""
    from . import inner

    return inner.allsum(torch.from_numpy(a).to(device)).cpu().numpy()


def flat_mask_of_shards(g: Tensor, space: Any, rank: float, chunk: int | None = None) -> np.ndarray | None:
    """:func:`~.overlap.flat_mask` of ``g²`` for a gradient held as shards (``space``: a
    :class:`~.sharded.ShardSpace`; inside :func:`.inner.sharded`, on every rank): bit-identical to one
    process on the whole ``g``.  The packed mask on rank 0, ``None`` elsewhere.  The threshold by
    :func:`.inner.kth_largest`; ties at it go to the lowest global indices (tensor by tensor, rank by
    rank); one byte per local entry, and on rank 0 one per parameter for packing
    (:func:`ratio_from_shards`)."""
    from . import inner
    from .overlap import sharp_count
    from .sharded import gather_flat

    chunk = chunk_size(chunk)
    g = g.reshape(-1)
    N = inner.size(g.numel())

    k, trivial = sharp_count(N, rank)
    if trivial is not None:
        return trivial if inner.rank() == 0 else None
    n_loc = g.numel()

    def score(a: int, b: int) -> Tensor:
        return g[a:b].square()

    thr = float(inner.kth_largest(score, [(0, n_loc)], [k], chunk)[0] or 0.0)
    bounds = list(space.offsets)
    T = len(space.names)
    import torch.distributed as dist

    R = dist.get_world_size(inner._GROUP.get())
    me = inner.rank()
    counts = torch.zeros(2, R, T, dtype=torch.int64)  # [sharp, ties] per rank and tensor
    for j in range(T):
        for s in range(bounds[j], bounds[j + 1], chunk):
            sc = score(s, min(s + chunk, bounds[j + 1]))
            counts[0, me, j] += int(torch.count_nonzero(sc > thr))
            counts[1, me, j] += int(torch.count_nonzero(sc.eq(thr)))
    counts = inner.allsum(counts.to(g.device)).cpu()
    need = k - int(counts[0].sum())
    take = [0] * T  # ties this rank marks sharp, tensor by tensor (global order: tensor, then rank)
    for j in range(T):
        for r in range(R):
            t = min(max(need, 0), int(counts[1, r, j]))
            if r == me:
                take[j] = t
            need -= t
    flat = torch.empty(n_loc, dtype=torch.bool, device=g.device)
    for j in range(T):
        left = take[j]
        for s in range(bounds[j], bounds[j + 1], chunk):
            sc = score(s, min(s + chunk, bounds[j + 1]))
            sharp = sc > thr
            if left > 0:
                ties = torch.nonzero(sc.eq(thr)).reshape(-1)[:left]
                sharp[ties] = True
                left -= ties.numel()
            flat[s:s + sc.numel()] = ~sharp
    full = gather_flat(flat, space)
    del flat
    if full is None:
        return None
    return np.packbits(full.numpy())


def _tally_counts(bc: np.ndarray, edges: tuple[float, ...]) -> tuple[dict[str, int], list[int]]:
    """:func:`tally` from the bincount of the keys (rather than the keys)."""
    c1_bins = [int(x) for x in bc[N_CAT:N_CAT + len(edges) + 1]]
    cnt = {name: int(bc[i]) for i, name in enumerate(CATEGORIES)}
    cnt["C1"] = int(sum(c1_bins))
    return cnt, c1_bins


def _split_of(tau: float | None, above: int, k: int, n: int) -> dict[str, float | None]:
    """:func:`_split` from its pieces: ``tau``, ``|{i in C1: |g_i| > tau}|``, ``k = |C1|``, ``n``."""
    if k == 0 or n == 0 or tau is None:
        return {"tau": None, "share": None, "chance": 0.0, "lift": None}
    share = above / k
    chance = k / n
    return {"tau": tau, "share": share, "chance": chance, "lift": share / chance}


def ratio_analysis(obj: Objective, rho: float = 0.05, variant: str = "l2", m: int | None = None,
                   eps: float = 1e-12, faithful: bool = False,
                   edges: Sequence[float] = DEFAULT_EDGES, eta: float = 0.01,
                   per_layer: bool = True, ire_rank: float | None = None) -> RatioResult:
    """Ratio categories of ``obj`` at its parameters: ``g``, ``g~`` (two gradient
    passes, or two per sub-batch with m-sharpness) and :func:`ratio_from_gradients`."""
    check_edges(edges)
    pg = perturbed_gradient(obj, rho=rho, variant=variant, m=m, eta=eta, with_loss=False)
    res = ratio_from_gradients(pg.grad, pg.perturbed_grad, obj.space, rho=rho, variant=variant, m=m,
                               eta=eta, eps=eps, faithful=faithful, edges=edges, per_layer=per_layer,
                               ire_rank=ire_rank)
    del pg
    return res


__all__ = ["DEFAULT_EDGES", "CodePacker", "RatioResult", "as_numpy", "bin_index", "bucket_counts", "category_bin_key", "check_edges",
           "flat_mask_of_shards", "flat_mask_streamed", "fractions", "kth_largest", "magnitude_split", "per_layer_breakdown", "per_layer_counts",
           "ratio_analysis", "ratio_from_gradients", "ratio_from_shards", "tally"]
