"""Persistence of a category's parameter set across checkpoints (docs/metrics.md, "Overlap across steps").

Input: one packed mask per stored step (``np.packbits`` of a length-``P`` bool
vector, see :mod:`.bitpack`), the set ``S_t`` of parameters in category c.
With ``p_s = |S_s| / P`` (independence baseline):

- anchor overlap  ``O(t0, t) = |S_t0 ∩ S_t|``,      ``E[O] = P p_t0 p_t``;
- pairwise        ``|S_a ∩ S_b|`` and Jaccard ``|S_a ∩ S_b| / |S_a ∪ S_b|`` (NaN if both empty),
  Jaccard baseline ``E / (|S_a| + |S_b| - E)`` with ``E = P p_a p_b``;
- persistent core ``K(t0, t) = |∩_{s between t0 and t} S_s|`` over the consecutive
  stored steps from the anchor to ``t`` (forwards for t >= t0, backwards before),
  ``E[K] = P Π_s p_s``;
- IRE link (Wang et al. 2024): flat mask ``F_t`` = coordinates whose ``g_i²`` (or
  its running average over checkpoints) is NOT among the top ``rank`` fraction;
  ``|S_t ∩ F_t|`` with ``E = P p_t q_t``, ``q_t = |F_t| / P``.

Independence is a weak null: an intersection over ``t`` steps of sets holding a
fraction ``p`` of the parameters falls like ``p^t`` under it, so any per-parameter
propensity gives astronomically large lifts.  Informative nulls (:func:`null_baselines`)
for the anchor overlap and the persistent core:

- ``shuffled`` (time order destroyed, each parameter's frequency kept): the other
  ``T - 1`` stored sets put in random order around the anchor.  With ``c_i`` = the
  number of *other* steps holding parameter ``i ∈ S_t0`` and ``j`` other steps in the
  window, ``E[K] = Σ_{i ∈ S_t0} C(c_i, j) / C(T-1, j)`` (exact; ``j = 1`` for the
  anchor overlap);
- ``markov`` (first-order, pooled over parameters, one chain per stored transition):
  stay ``a_s = |S_s ∩ S_s+1| / |S_s|``, enter ``b_s = (|S_s+1| - |S_s ∩ S_s+1|) / (P - |S_s|)``
  (forwards; the reversed chain before the anchor).  ``E[K(t0, t)] = |S_t0| Π a_s``;
  ``E[O(t0, t)] = |S_t0| π_t(in)`` with ``π`` propagated from ``(1, 0)`` at ``t0``.
  The first transition is fitted, so its lift is 1 by construction; later lifts above
  1 mean membership is stickier than one-step memory explains (a persistent subset);
- ``control``: another run's retention at the same steps,
  ``E = |S_t0| · X_control(t0, t) / |S^c_t0|`` for ``X`` = overlap or core.

``lift = observed / expected`` (NaN when expected is 0).  Everything works on
packed bytes viewed as 64-bit words with ``np.bitwise_count`` (lookup table on
numpy < 2): memory is the masks (1 bit per parameter per step) plus one
scratch mask; nothing is unpacked.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import bitpack

_HAS_BITWISE_COUNT = hasattr(np, "bitwise_count")


# ------------------------------------------------------------ mask access
class MaskSet:
    """Packed masks of ``n`` bits as 64-bit word views (no copies) plus tiny tails.

    ``heads[t]``: the first ``n // 64`` words of mask t (a view);
    ``tails[t]``: the remaining bytes with pad bits cleared (a small copy).
    """

    def __init__(self, masks: Sequence[np.ndarray], n: int):
        self.n = int(n)
        self.n_head = (self.n // 64) * 8  # bytes in whole 64-bit words
        self.heads: list[np.ndarray] = []
        tails = []
        for m in masks:
            head, tail = self.split(m)
            self.heads.append(head)
            tails.append(tail)
        self.tails = np.array(tails, dtype=np.uint8).reshape(len(tails), bitpack.n_bytes(self.n) - self.n_head)
        self._buf = np.empty(self.n_head // 8, dtype=np.uint64)
        self._cnt = np.empty(self.n_head // 8, dtype=np.uint8)

    def split(self, m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A packed mask of ``n`` bits -> (64-bit word view, tail bytes with pad bits cleared)."""
        m = np.asarray(m)
        nb = bitpack.n_bytes(self.n)
        if m.dtype != np.uint8 or m.ndim != 1 or m.size != nb:
            raise ValueError(f"expected a packed mask uint8[{nb}] for P={self.n}, got {m.dtype}{list(m.shape)}")
        m = np.ascontiguousarray(m)
        return m[:self.n_head].view(np.uint64), bitpack.clear_tail(m[self.n_head:].copy(), self.n)

    def __len__(self) -> int:
        return len(self.heads)

    def _count_words(self, words: np.ndarray) -> int:
        if not words.size:
            return 0
        if _HAS_BITWISE_COUNT:
            np.bitwise_count(words, out=self._cnt[:words.size])
            return int(self._cnt[:words.size].sum(dtype=np.int64))
        return bitpack.popcount(words.view(np.uint8))

    def size(self, t: int) -> int:
        return self.count(self.heads[t], self.tails[t])

    def count(self, head: np.ndarray, tail: np.ndarray) -> int:
        """Set bits of a mask given as (words, tail bytes)."""
        return self._count_words(head) + bitpack.popcount(tail)

    def inter(self, a: int, b: int) -> int:
        """``|S_a ∩ S_b|``."""
        np.bitwise_and(self.heads[a], self.heads[b], out=self._buf)
        return self._count_words(self._buf) + bitpack.popcount(self.tails[a] & self.tails[b])

    def inter_with(self, t: int, head: np.ndarray, tail: np.ndarray) -> int:
        """``|S_t ∩ M|`` for another mask given as (words, tail bytes)."""
        np.bitwise_and(self.heads[t], head, out=self._buf)
        return self._count_words(self._buf) + bitpack.popcount(self.tails[t] & tail)

    def running_core(self, order: Sequence[int]) -> list[int]:
        """``|S_o0 ∩ ... ∩ S_ok|`` for every prefix of ``order`` (one scratch mask)."""
        if not order:
            return []
        run = self.heads[order[0]].copy()
        tail = self.tails[order[0]].copy()
        out = []
        for t in order:
            np.bitwise_and(run, self.heads[t], out=run)
            tail &= self.tails[t]
            out.append(self._count_words(run) + bitpack.popcount(tail))
        return out


# ------------------------------------------------------------- statistics
def _lift(obs: np.ndarray, exp: np.ndarray) -> np.ndarray:
    obs = np.asarray(obs, dtype=float)
    exp = np.asarray(exp, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(exp > 0, obs / np.where(exp > 0, exp, 1.0), np.nan)


def sizes(ms: MaskSet) -> np.ndarray:
    """``|S_t|`` for every step (int64)."""
    return np.array([ms.size(t) for t in range(len(ms))], dtype=np.int64)


def intersection_matrix(ms: MaskSet) -> np.ndarray:
    """Symmetric ``[T, T]`` int64 matrix of ``|S_a ∩ S_b|`` (diagonal = sizes)."""
    T = len(ms)
    out = np.zeros((T, T), dtype=np.int64)
    for a in range(T):
        out[a, a] = ms.size(a)
        for b in range(a + 1, T):
            out[a, b] = out[b, a] = ms.inter(a, b)
    return out


def jaccard_from(inter: np.ndarray, sz: np.ndarray) -> np.ndarray:
    """``inter / (|S_a| + |S_b| - inter)``, NaN where the union is empty."""
    s = np.asarray(sz, dtype=float)
    union = s[:, None] + s[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / np.where(union > 0, union, 1.0), np.nan)


def jaccard(inter: np.ndarray) -> np.ndarray:
    """Jaccard matrix from an intersection matrix (NaN where both sets are empty)."""
    return jaccard_from(inter, np.diag(inter))


def expected_pairwise(sz: np.ndarray, n: int) -> np.ndarray:
    """``E|S_a ∩ S_b| = P p_a p_b = |S_a| |S_b| / P`` for all pairs."""
    s = np.asarray(sz, dtype=float)
    return np.outer(s, s) / n if n else np.zeros((s.size, s.size))


def jaccard_expected(sz: np.ndarray, n: int) -> np.ndarray:
    """Plug-in Jaccard baseline ``E / (|S_a| + |S_b| - E)`` with ``E = P p_a p_b``."""
    return jaccard_from(expected_pairwise(sz, n), sz)


def anchor_overlap(ms: MaskSet, i0: int, sz: np.ndarray, inter: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """``O(t0, t)``, ``E = |S_t0| |S_t| / P`` and lift for every step (row ``i0`` of ``inter`` if given)."""
    T = len(ms)
    obs = inter[i0].copy() if inter is not None else np.array(
        [sz[i0] if t == i0 else ms.inter(i0, t) for t in range(T)], dtype=np.int64)
    exp = sz[i0] * np.asarray(sz, dtype=float) / ms.n if ms.n else np.zeros(T)
    return {"overlap": obs, "expected": exp, "lift": _lift(obs, exp)}


def persistent_core(ms: MaskSet, i0: int, sz: np.ndarray) -> dict[str, np.ndarray]:
    """``K(t0, t)`` over the consecutive steps between ``i0`` and ``t``; ``E = P Π p_s``."""
    T = len(ms)
    size = np.zeros(T, dtype=np.int64)
    fwd = ms.running_core(list(range(i0, T)))
    bwd = ms.running_core(list(range(i0, -1, -1)))
    size[i0:] = fwd
    size[:i0 + 1] = bwd[::-1]
    exp = np.zeros(T)
    if ms.n:
        logp = np.log(np.maximum(np.asarray(sz, dtype=float), 0.0) / ms.n, where=np.asarray(sz) > 0,
                      out=np.full(T, -np.inf))
        for t in range(T):
            lo, hi = min(i0, t), max(i0, t)
            exp[t] = ms.n * math.exp(float(logp[lo:hi + 1].sum()))
    return {"size": size, "expected": exp, "lift": _lift(size, exp)}


# ---------------------------------------------------------------------- IRE
def _numpy_1d(x: Any) -> np.ndarray:
    """Flat numpy view/copy of a torch tensor or array (low-precision floats -> float64)."""
    if hasattr(x, "detach"):
        import torch

        x = x.detach().cpu()
        x = (x if x.dtype in (torch.float32, torch.float64) else x.double()).numpy()
    return np.asarray(x).reshape(-1)


def sharp_count(n: int, rank: float) -> tuple[int, np.ndarray | None]:
    """``(k, mask)``: ``k = round(rank · n)`` sharp coordinates, and the packed flat mask when it needs
    no scores (``k = 0``: every coordinate flat; ``k = n``: none), else ``None``."""
    if not 0.0 <= rank <= 1.0:
        raise ValueError(f"rank must be in [0, 1], got {rank}")
    k = int(round(rank * n))
    if k == 0:
        return k, bitpack.clear_tail(np.packbits(np.ones(n, dtype=bool)), n)
    if k == n:
        return k, np.zeros(bitpack.n_bytes(n), dtype=np.uint8)
    return k, None


def flat_mask(score: Any, rank: float) -> np.ndarray:
    """Packed mask of the coordinates NOT among the top ``rank`` fraction of ``score``.

    ``k = round(rank · P)`` coordinates with the largest score are "sharp"; ties at
    the threshold go to the lowest indices, so ``|F| = P - k`` exactly.
    """
    s = _numpy_1d(score)
    n = s.size
    k, trivial = sharp_count(n, rank)
    if trivial is not None:
        return trivial
    thr = np.partition(s, n - k)[n - k]  # k-th largest
    sharp = s > thr
    need = k - int(sharp.sum())
    if need > 0:
        ties = np.flatnonzero(s == thr)[:need]
        sharp[ties] = True
    np.logical_not(sharp, out=sharp)
    return np.packbits(sharp)


class RunningSquare:
    """Running average of ``g²`` across checkpoints, in float64.

    ``beta=None``: cumulative mean ``v_t = (1/t) Σ_{s<=t} g_s²``;
    else EMA ``v_1 = g_1²``, ``v_t = β v_{t-1} + (1-β) g_t²``.
    """

    def __init__(self, beta: float | None = None):
        if beta is not None and not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        self.beta = beta
        self.count = 0
        self.value: np.ndarray | None = None

    def update(self, g: Any) -> np.ndarray:
        sq = np.square(_numpy_1d(g).astype(np.float64))
        self.count += 1
        if self.value is None:
            self.value = sq
        elif self.beta is None:
            self.value += (sq - self.value) / self.count
        else:
            self.value *= self.beta
            self.value += (1.0 - self.beta) * sq
        return self.value


def ire_flat_masks(grads: Iterable[Any], rank: float, average: str = "none",
                   beta: float | None = None) -> list[np.ndarray]:
    """Flat masks, one per gradient (streamed): score ``g²`` (``average='none'``) or its
    running average (``'running'``: cumulative mean, or EMA when ``beta`` is set)."""
    if average not in ("none", "running"):
        raise ValueError("average must be 'none' or 'running'")
    run = RunningSquare(beta)
    out = []
    for g in grads:
        score = run.update(g) if average == "running" else np.square(_numpy_1d(g))
        out.append(flat_mask(score, rank))
    return out


def ire_overlap(ms: MaskSet, flat: Iterable[np.ndarray], sz: np.ndarray) -> dict[str, np.ndarray]:
    """``|S_t ∩ F_t|``, ``E = |S_t| |F_t| / P``, lift, ``|F_t|``.

    ``flat``: one mask for all steps, or one per step, consumed one at a time (a
    generator reading them from disk keeps only one flat mask in memory).
    """
    T = len(ms)
    items = [flat[0]] * T if isinstance(flat, Sequence) and len(flat) == 1 else flat
    obs = np.zeros(T, dtype=np.int64)
    fsz = np.zeros(T, dtype=np.int64)
    t = -1
    for t, f in enumerate(items):
        if t >= T:
            raise ValueError(f"more flat masks than the {T} steps")
        head, tail = ms.split(f)
        obs[t] = ms.inter_with(t, head, tail)
        fsz[t] = ms.count(head, tail)
    if t != T - 1:
        raise ValueError(f"need 1 or {T} flat masks, got {t + 1}")
    exp = np.asarray(sz, dtype=float) * fsz / ms.n if ms.n else np.zeros(T)
    return {"overlap": obs, "expected": exp, "lift": _lift(obs, exp), "flat_size": fsz}


# ------------------------------------------------------------------ nulls
NULLS = ("independence", "shuffled", "markov", "control")


def other_step_counts(ms: MaskSet, i0: int, block_words: int = 1 << 16) -> np.ndarray:
    """Histogram ``h[c]`` (``c = 0..T-1``) of how many *other* stored steps hold each member of ``S_t0``.

    Streams over blocks of ``block_words`` 64-bit words (memory: one count block and one
    unpacked block, 3 bytes per bit of the block), never a length-``P`` count vector."""
    T = len(ms)
    hist = np.zeros(T, dtype=np.int64)
    others = [t for t in range(T) if t != i0]
    nw = ms.n_head // 8
    dtype = np.uint16 if T < 65535 else np.uint32

    def add(anchor_bits: np.ndarray, others_of) -> None:
        cnt = np.zeros(anchor_bits.size, dtype=dtype)
        for t in others:  # one unpacked block at a time
            cnt += others_of(t)
        hist[:] += np.bincount(cnt[anchor_bits.astype(bool)], minlength=T)[:T]

    for lo in range(0, nw, block_words):
        hi = min(nw, lo + block_words)
        add(np.unpackbits(ms.heads[i0][lo:hi].view(np.uint8)),
            lambda t, lo=lo, hi=hi: np.unpackbits(ms.heads[t][lo:hi].view(np.uint8)))
    if ms.tails.shape[1]:
        add(np.unpackbits(ms.tails[i0]), lambda t: np.unpackbits(ms.tails[t]))
    return hist


def shuffled_expectation(hist: np.ndarray, T: int, j: int) -> float:
    """``Σ_c h[c] C(c, j) / C(T-1, j)``: the mean core over ``j`` other steps drawn without order."""
    if j == 0:
        return float(hist.sum())
    c = np.arange(len(hist), dtype=float)
    ratio = np.ones_like(c)
    for i in range(j):  # C(c, j) / C(T-1, j) = Π_i (c - i) / (T - 1 - i)
        ratio *= np.maximum(c - i, 0.0) / (T - 1 - i)
    return float(hist @ ratio)


def shuffled_null(ms: MaskSet, i0: int, sz: np.ndarray) -> dict[str, np.ndarray]:
    """``shuffled`` expectations of the anchor overlap and the core at every step (module docstring)."""
    T = len(ms)
    if T < 2:
        return {"anchor": np.array([float(sz[i0])]), "persistent": np.array([float(sz[i0])])}
    hist = other_step_counts(ms, i0)
    anchor = np.full(T, shuffled_expectation(hist, T, 1))
    core = np.array([shuffled_expectation(hist, T, abs(t - i0)) for t in range(T)])
    anchor[i0] = core[i0] = float(sz[i0])
    return {"anchor": anchor, "persistent": core}


def markov_null(ms: MaskSet, i0: int, sz: np.ndarray, consecutive: Sequence[int] | None = None
                ) -> dict[str, np.ndarray]:
    """``markov`` expectations (module docstring); ``consecutive[s] = |S_s ∩ S_s+1|`` if known."""
    T, n = len(ms), float(ms.n)
    size = np.asarray(sz, dtype=float)
    inter = np.array([ms.inter(s, s + 1) for s in range(T - 1)] if consecutive is None else consecutive, dtype=float)
    anchor = np.zeros(T)
    core = np.zeros(T)
    anchor[i0] = core[i0] = size[i0]

    def ratio(a: float, b: float) -> float:
        return a / b if b > 0 else 0.0

    for direction in (1, -1):
        pin, keep = 1.0, 1.0
        t = i0
        while 0 <= t + direction < T:
            s, nxt = (t, t + 1) if direction == 1 else (t - 1, t)  # the transition between steps s and s+1
            frm, to = (s, nxt) if direction == 1 else (nxt, s)
            stay = ratio(inter[s], size[frm])
            enter = ratio(size[to] - inter[s], n - size[frm])
            pin = pin * stay + (1.0 - pin) * enter
            keep *= stay
            t += direction
            anchor[t] = size[i0] * pin
            core[t] = size[i0] * keep
    return {"anchor": anchor, "persistent": core}


def control_null(observed_anchor_size: float, control: "OverlapResult", steps: Sequence[int]) -> dict[str, np.ndarray]:
    """``control`` expectations at ``steps``: the control run's retention of its own anchor set
    (same anchor step) applied to this run's anchor size (NaN where the control lacks a step)."""
    pos = {s: i for i, s in enumerate(control.steps)}
    a0 = float(control.sizes[pos[control.anchor_step]]) if control.anchor_step in pos else 0.0
    out = {"anchor": np.full(len(steps), np.nan), "persistent": np.full(len(steps), np.nan)}
    if a0 <= 0:
        return out
    for k, s in enumerate(steps):
        if s in pos:
            out["anchor"][k] = observed_anchor_size * control.anchor["overlap"][pos[s]] / a0
            out["persistent"][k] = observed_anchor_size * control.persistent["size"][pos[s]] / a0
    return out


def null_baselines(ms: MaskSet, i0: int, sz: np.ndarray, anchor: dict[str, np.ndarray],
                   persistent: dict[str, np.ndarray], control: "OverlapResult | None" = None,
                   steps: Sequence[int] | None = None) -> dict[str, dict[str, dict[str, np.ndarray]]]:
    """``{null: {"anchor": {expected, lift}, "persistent": {expected, lift}}}`` for every null."""
    exp = {"independence": {"anchor": anchor["expected"], "persistent": persistent["expected"]},
           "shuffled": shuffled_null(ms, i0, sz), "markov": markov_null(ms, i0, sz)}
    if control is not None:
        exp["control"] = control_null(float(sz[i0]), control, steps if steps is not None else range(len(ms)))
    out = {}
    for name, e in exp.items():
        out[name] = {"anchor": {"expected": e["anchor"], "lift": _lift(anchor["overlap"], e["anchor"])},
                     "persistent": {"expected": e["persistent"], "lift": _lift(persistent["size"], e["persistent"])}}
    return out


# ------------------------------------------------------------------ result
def _clean(x: Any) -> Any:
    """numpy -> lists, NaN/inf -> None."""
    if isinstance(x, np.ndarray):
        return _clean(x.tolist())
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return None if not math.isfinite(float(x)) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


def _clean_tree(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _clean_tree(v) for k, v in x.items()}
    return _clean(x)


@dataclass
class OverlapResult:
    """Overlap statistics of one category over the stored steps."""

    category: str
    steps: list[int]
    n_params: int
    sizes: np.ndarray
    anchor_step: int
    anchor: dict[str, np.ndarray]
    intersections: np.ndarray | None
    jaccard: np.ndarray | None
    jaccard_expected: np.ndarray | None
    persistent: dict[str, np.ndarray]
    ire: dict[str, np.ndarray] | None = None
    ire_rank: float | None = None
    nulls: dict[str, Any] | None = None
    null: str = "independence"  # the null whose expectation and lift fill ``anchor`` and ``persistent``

    def to_dict(self) -> dict[str, Any]:
        """The issue's JSON (NaN -> null), plus lifts, fractions and pairwise baselines."""
        d: dict[str, Any] = {
            "category": self.category,
            "steps": _clean(list(self.steps)),
            "n_params": self.n_params,
            "sizes": _clean(self.sizes),
            "fractions": _clean(self.sizes / self.n_params if self.n_params else self.sizes * 0.0),
            "anchor": {"step": self.anchor_step, **{k: _clean(v) for k, v in self.anchor.items()}},
            "jaccard": _clean(self.jaccard) if self.jaccard is not None else None,
            "persistent": {k: _clean(v) for k, v in self.persistent.items()},
            "ire": None,
        }
        if self.jaccard is not None:
            d["jaccard_expected"] = _clean(self.jaccard_expected)
            d["pairwise"] = {"overlap": _clean(self.intersections),
                             "expected": _clean(expected_pairwise(self.sizes, self.n_params))}
        if self.ire is not None:
            d["ire"] = {"rank": self.ire_rank, **{k: _clean(v) for k, v in self.ire.items()}}
        if self.nulls is not None:
            d["null"] = self.null
            d["nulls"] = _clean_tree(self.nulls)
            chosen = self.nulls.get(self.null)
            if chosen is not None:  # the headline expectation and lift are the chosen null's
                for part in ("anchor", "persistent"):
                    d[part]["expected"] = _clean(chosen[part]["expected"])
                    d[part]["lift"] = _clean(chosen[part]["lift"])
        return d


def overlap_analysis(masks: Sequence[np.ndarray], n: int, steps: Sequence[int] | None = None,
                     category: str = "C1", anchor: int | None = None,
                     flat_masks: Iterable[np.ndarray] | None = None, ire_rank: float | None = None,
                     pairwise: bool = True, null: str = "independence", nulls: bool = True,
                     control: OverlapResult | None = None) -> OverlapResult:
    """All overlap statistics of the sets given as packed masks (``n`` = P bits each).

    ``steps`` label the masks (default 0..T-1, must be increasing); ``anchor`` is a
    step label (default the first); ``flat_masks`` (1 or T, e.g. from
    :func:`ire_flat_masks`, or a generator) adds the IRE link; ``pairwise=False`` skips the
    ``T²/2`` pairwise intersections (Jaccard).  ``nulls``: also the ``shuffled`` and ``markov``
    baselines (and ``control``: another run's result, same anchor step); ``null`` names the one
    whose expectation and lift the JSON's ``anchor`` and ``persistent`` carry.
    """
    if null not in NULLS:
        raise ValueError(f"unknown null {null!r}; choose one of {', '.join(NULLS)}")
    if null == "control" and control is None:
        raise ValueError("the control null needs a control run's overlap result")
    if not masks:
        raise ValueError("no masks given")
    steps = list(range(len(masks))) if steps is None else [int(s) for s in steps]
    if len(steps) != len(masks):
        raise ValueError(f"{len(steps)} steps for {len(masks)} masks")
    if any(b <= a for a, b in zip(steps, steps[1:])):
        raise ValueError("steps must be strictly increasing")
    a_step = steps[0] if anchor is None else int(anchor)
    if a_step not in steps:
        raise ValueError(f"anchor step {a_step} is not among the steps {steps}")
    i0 = steps.index(a_step)
    ms = MaskSet(masks, n)
    sz = sizes(ms)
    inter = intersection_matrix(ms) if pairwise else None
    jac = jaccard(inter) if inter is not None else None
    jexp = jaccard_expected(sz, ms.n) if inter is not None else None
    ire = ire_overlap(ms, flat_masks, sz) if flat_masks is not None else None
    anchor_d, core = anchor_overlap(ms, i0, sz, inter), persistent_core(ms, i0, sz)
    base = null_baselines(ms, i0, sz, anchor_d, core, control, steps) if (nulls or null != "independence") else None
    return OverlapResult(
        category=category, steps=steps, n_params=ms.n, sizes=sz, anchor_step=a_step,
        anchor=anchor_d, intersections=inter, jaccard=jac,
        jaccard_expected=jexp, persistent=core, ire=ire, ire_rank=ire_rank, nulls=base, null=null,
    )


def category_masks(packed_codes: Iterable[bitpack.Packed], category: str | int = "C1") -> list[np.ndarray]:
    """Membership masks of ``category`` from packed codes (streamed: one step at a time)."""
    return [bitpack.membership_mask(p, category) for p in packed_codes]
