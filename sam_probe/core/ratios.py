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
from .perturb import perturbed_gradient

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
    """``||v||`` accumulated in float64."""
    return float(torch.linalg.vector_norm(v, dtype=torch.float64))


def _json_float(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _json_buckets(buckets: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"lo": b["lo"], "hi": _json_float(b["hi"]), "count": b["count"]} for b in buckets]


@dataclass
class RatioResult:
    """Ratio categories of one checkpoint; ``codes`` (uint8 ``[P]``) are kept for storage."""

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
    codes: Tensor = field(repr=False)
    m: int | None = None
    eta: float = 0.01
    eps: float = 1e-12
    faithful: bool = False
    edges: tuple[float, ...] = DEFAULT_EDGES

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
        return bitpack.pack_codes(self.codes)


def ratio_from_gradients(g: Tensor, g_tilde: Tensor, space: ParamSpace | None = None, *,
                         rho: float = 0.05, variant: str = "l2", m: int | None = None,
                         eta: float = 0.01, eps: float = 1e-12, faithful: bool = False,
                         edges: Sequence[float] = DEFAULT_EDGES,
                         per_layer: bool = True) -> RatioResult:
    """All ratio statistics from flat ``g`` and ``g~`` (``space`` for the per-layer part)."""
    e = check_edges(edges)
    g = g.reshape(-1)
    g_tilde = g_tilde.reshape(-1)
    if g.shape != g_tilde.shape:
        raise ValueError(f"g has {g.numel()} entries but g~ has {g_tilde.numel()}")
    n = g.numel()
    r = ratio(g, g_tilde, eps, faithful)
    codes = codes_from_ratio(r)
    if per_layer and space is not None:
        if space.size != n:
            raise ValueError(f"parameter space has {space.size} entries, gradients {n}")
        layers = per_layer_breakdown(codes, g, r, space, e)
        cnt = {c: sum(layer["counts"][c] for layer in layers) for c in CATEGORIES}
        c1_bins = [sum(layer["buckets"][i]["count"] for layer in layers) for i in range(len(e) + 1)]
    else:
        layers = []
        cnt, c1_bins = tally(category_bin_key(codes, r, e), e)
    codes = codes.cpu()
    return RatioResult(
        rho=float(rho), variant=variant, n_params=n,
        grad_norm=_norm(g), perturbed_grad_norm=_norm(g_tilde),
        counts=cnt, fractions=fractions(cnt, n), buckets=_bins(c1_bins, e),
        magnitude_split=_split(np.abs(as_numpy(g)), as_numpy(codes) == CODE["C1"], cnt["C1"]),
        per_layer=layers, codes=codes, m=m, eta=float(eta), eps=float(eps), faithful=bool(faithful), edges=e,
    )


def ratio_analysis(obj: Objective, rho: float = 0.05, variant: str = "l2", m: int | None = None,
                   eps: float = 1e-12, faithful: bool = False,
                   edges: Sequence[float] = DEFAULT_EDGES, eta: float = 0.01,
                   per_layer: bool = True) -> RatioResult:
    """Ratio categories of ``obj`` at its parameters: ``g``, ``g~`` (two gradient
    passes, or two per sub-batch with m-sharpness) and :func:`ratio_from_gradients`."""
    check_edges(edges)
    pg = perturbed_gradient(obj, rho=rho, variant=variant, m=m, eta=eta, with_loss=False)
    res = ratio_from_gradients(pg.grad, pg.perturbed_grad, obj.space, rho=rho, variant=variant, m=m,
                               eta=eta, eps=eps, faithful=faithful, edges=edges, per_layer=per_layer)
    return res


__all__ = ["DEFAULT_EDGES", "RatioResult", "as_numpy", "bin_index", "bucket_counts", "category_bin_key", "check_edges",
           "fractions", "kth_largest", "magnitude_split", "per_layer_breakdown", "per_layer_counts",
           "ratio_analysis", "ratio_from_gradients", "tally"]
