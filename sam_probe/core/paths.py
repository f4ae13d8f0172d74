"""Paths between checkpoints (docs/metrics.md, "Paths between checkpoints").

Distance to a reference ``w_ref`` (parameters only, float64):

- ``d_t = ||w_t - w_ref||`` globally and per tensor (``Σ_tensors d_t,n² = d_t²``),
  ``relative_t = d_t / ||w_ref||``;
- escape rate = least-squares slope of ``log d_t`` against the training *step*
  (against the checkpoint index when no steps are given) over the first ``K``
  checkpoints after the reference with ``d_t > 0``; per step, so
  ``d_t = c q^t`` gives ``log q``.

Escape diagnostics (:func:`escape_fits`, :func:`subspace_share`): over the first ``K``
checkpoints after the reference (``τ = t - t_ref > 0``), least-squares fits of
``log d = a + r τ`` (exponential: rate ``r``) and ``log d = a + p log τ`` (power law:
exponent ``p``), each with its ``R²`` and residual RMS in ``log d`` (same number of
parameters, so the larger ``R²`` is the better description); the share of the
displacement ``w_t - w_ref`` in a top-k eigenspace ``V_k`` of the reference,
``‖V_kᵀ (w_t - w_ref)‖² / ‖w_t - w_ref‖²`` (chance ``k / P``).

Linear interpolation ``w(a) = (1-a) w_A + a w_B`` (default 0.05 steps on
``[-0.2, 1.2]``, always holding 0 and 1): floating buffers (BatchNorm running stats) are interpolated
the same way (running variances clamped at 0 when extrapolating), integer
buffers (``num_batches_tracked``) are taken from ``A``; loss and accuracy at every
point, and the barrier ``max_{a ∈ [0,1]} L(w(a)) - ((1-a) L(w_A) + a L(w_B))``
over ``a = 0, 1`` and the grid points inside ``(0, 1)`` (``L(w_A), L(w_B)`` evaluated
at ``a = 0, 1``, also when the grid misses them), so the barrier is ``>= 0``.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .objective import Objective

State = Mapping[str, Tensor]


# ------------------------------------------------------------------ distance
def escape_rate(x: Sequence[float], d: Sequence[float]) -> float | None:
    """Least-squares slope of ``log d`` against ``x`` (points with ``d > 0``; None if < 2 distinct x)."""
    x = np.asarray(x, dtype=np.float64)
    d = np.asarray(d, dtype=np.float64)
    keep = np.isfinite(d) & (d > 0)
    x, y = x[keep], np.log(d[keep])
    if len(x) < 2 or np.ptp(x) == 0:
        return None
    xc = x - x.mean()
    return float((xc @ (y - y.mean())) / (xc @ xc))


def _line_fit(x: np.ndarray, y: np.ndarray) -> dict[str, float] | None:
    """``y = a + b x`` by least squares: ``{slope, intercept, r2, rms}`` (None with < 3 points or constant x)."""
    if len(x) < 3 or np.ptp(x) == 0:
        return None
    A = np.stack([np.ones_like(x), x], axis=1)
    coef, *_ = np.linalg.lstsq(A, y, rcond=None)
    res = y - A @ coef
    ss = float(((y - y.mean()) ** 2).sum())
    return {"slope": float(coef[1]), "intercept": float(coef[0]),
            "r2": float(1.0 - (res @ res) / ss) if ss > 0 else 1.0, "rms": float(np.sqrt((res @ res) / len(y)))}


def escape_fits(x: Sequence[float], d: Sequence[float], ref_x: float) -> dict[str, Any]:
    """Exponential vs power-law fits of ``d`` against ``τ = x - ref_x`` (points with ``τ > 0``, ``d > 0``).

    Returns ``{n, exponential{rate, r2, rms}, power{exponent, r2, rms}, better}``; ``better`` is the
    fit with the larger ``R²`` (None with fewer than 3 points)."""
    tau = np.asarray(x, dtype=np.float64) - float(ref_x)
    dist = np.asarray(d, dtype=np.float64)
    keep = (tau > 0) & np.isfinite(dist) & (dist > 0)
    tau, y = tau[keep], np.log(dist[keep])
    exp_fit, pow_fit = _line_fit(tau, y), _line_fit(np.log(tau) if len(tau) else tau, y)
    out: dict[str, Any] = {"n": int(len(tau)), "exponential": None, "power": None, "better": None}
    if exp_fit is not None:
        out["exponential"] = {"rate": exp_fit["slope"], "r2": exp_fit["r2"], "rms": exp_fit["rms"]}
    if pow_fit is not None:
        out["power"] = {"exponent": pow_fit["slope"], "r2": pow_fit["r2"], "rms": pow_fit["rms"]}
    if exp_fit is not None and pow_fit is not None:
        out["better"] = "exponential" if exp_fit["r2"] > pow_fit["r2"] else "power"
    return out


def subspace_share(V: Tensor, displacements: Sequence[Tensor]) -> list[float | None]:
    """``‖Vᵀ δ‖² / ‖δ‖²`` for each flat displacement ``δ`` (None for ``δ = 0``); ``V`` orthonormal ``[P, k]``."""
    out: list[float | None] = []
    for dl in displacements:
        dl = dl.to(V)
        n2 = float(dl @ dl)
        out.append(None if n2 == 0 else float((V.T @ dl).pow(2).sum()) / n2)
    return out


def same_step_distance(a: Sequence[State], steps_a: Sequence[float], b: Sequence[State],
                       steps_b: Sequence[float]) -> dict[str, list[float]]:
    """``‖w^A_t - w^B_t‖`` at every step both sequences hold (float64, the floating tensors of ``a``)."""
    pos = {float(s): i for i, s in enumerate(steps_b)}
    steps, dist = [], []
    for i, s in enumerate(steps_a):
        j = pos.get(float(s))
        if j is None:
            continue
        names = _float_names(a[i])
        missing = [n for n in names if n not in b[j]]
        if missing:
            raise KeyError(f"the other run lacks tensors {missing[:5]}")
        sq = sum(float((a[i][n].detach().double().cpu() - b[j][n].detach().double().cpu()).pow(2).sum()) for n in names)
        steps.append(float(s))
        dist.append(float(np.sqrt(sq)))
    return {"steps": steps, "distance": dist}


def _float_names(ref: State) -> list[str]:
    return [n for n, t in ref.items() if torch.is_floating_point(t)]


@dataclass
class DistanceResult:
    """Distances of a sequence of checkpoints to a reference (see module docstring)."""

    steps: list[float]
    distance: list[float]
    relative: list[float]
    per_tensor: dict[str, list[float]]
    escape_rate: float | None
    escape_steps: list[float] = field(default_factory=list)  # the points of the fit
    ref_step: float | None = None
    ref_norm: float = 0.0
    escape_by: str = "step"  # "step" or "index"
    escape_fit: dict[str, Any] | None = None  # exponential vs power law (:func:`escape_fits`)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def distance(states: Sequence[State], ref: int | State = 0, *, steps: Sequence[float] | None = None,
             ref_step: float | None = None, k: int = 5) -> DistanceResult:
    """Distances of ``states`` (parameter dicts, in training order) to a reference.

    ``ref``: an index into ``states`` or an external parameter dict (then ``ref_step``,
    if given, says where it lies; without it every checkpoint counts as "after" it).
    Tensors: every floating tensor of the reference (pass parameter dicts; buffers in them
    would count too); every state must hold them.
    ``k``: the number of checkpoints after the reference used for the escape rate
    (slope of ``log d`` per step, or per index when ``steps`` is None).
    """
    if not states:
        raise ValueError("no checkpoints")
    x = [float(s) for s in steps] if steps is not None else [float(i) for i in range(len(states))]
    if len(x) != len(states):
        raise ValueError(f"{len(x)} steps for {len(states)} checkpoints")
    if isinstance(ref, int):
        ref_state, ref_x = states[ref], x[ref]
    else:
        ref_state, ref_x = ref, (None if ref_step is None else float(ref_step))
    return distance_streamed(iter(states), ref_state, x, ref_x, k=k, by="step" if steps is not None else "index")


def _shard(t: Tensor) -> Tensor:
    """This rank's FSDP2 chunk of ``t`` within a shard group (:mod:`.sharded_states`), else ``t``."""
    from . import inner

    if not inner.active():
        return t
    from .sharded_states import shard_of, world_rank

    return shard_of(t, *world_rank())


def distance_streamed(states: Iterable[State], ref_state: State, x: Sequence[float], ref_x: float | None, *,
                      k: int = 5, by: str = "step", each: Callable[[State], None] | None = None) -> DistanceResult:
    """:func:`distance` holding one state at a time: ``states`` is consumed lazily (a generator that
    loads each checkpoint when asked and drops it after), ``x`` their steps (or indices), ``ref_x``
    the reference's (None: every state is after it).  Only the reference's tensors (float64) and the
    per-tensor distances are kept.  ``each(state)`` is called on every state while it is held (e.g.
    its share in an eigenspace).

    Within :func:`~sam_probe.core.inner.sharded` (``--shard-model``) every tensor is first reduced to
    this rank's FSDP2 chunk (dimension 0), so the reference kept is a shard, and the per-tensor
    squared distances are summed over the ranks (one all-reduce per state): the same numbers on
    every rank, equal to one process up to the order of additions."""
    from . import inner

    sharded = inner.active()
    names = _float_names(ref_state)
    w_ref = {n: _shard(ref_state[n].detach()).double().cpu() for n in names}
    if sharded:
        sq = inner.allsum(torch.stack([w.pow(2).sum() for w in w_ref.values()]).sum().reshape(1)
                          if w_ref else torch.zeros(1, dtype=torch.float64))
        ref_norm = float(torch.sqrt(sq[0]))
    else:
        ref_norm = float(torch.sqrt(sum((w.pow(2).sum() for w in w_ref.values()),
                                        torch.zeros((), dtype=torch.float64))))
    per: dict[str, list[float]] = {n: [] for n in names}
    count = 0
    for s in states:  # (no enumerate: it would keep the previous state alive while the next is read)
        missing = [n for n in names if n not in s]
        if missing:
            raise KeyError(f"checkpoint {count} lacks tensors {missing[:5]}")
        if sharded:
            local = torch.stack([(_shard(s[n].detach()).double().cpu() - w_ref[n]).pow(2).sum() for n in names])
            d = inner.allsum(local).sqrt().tolist()
            for n, v in zip(names, d):
                per[n].append(float(v))
        else:
            for n in names:
                per[n].append(float((s[n].detach().double().cpu() - w_ref[n]).norm()))
        if each is not None:
            each(s)
        count += 1
        del s
    if count != len(x):
        raise ValueError(f"{len(x)} steps for {count} checkpoints")
    x = [float(v) for v in x]
    dist = [float(np.sqrt(sum(per[n][i] ** 2 for n in names))) for i in range(count)]
    rel = [d / ref_norm if ref_norm > 0 else float("nan") for d in dist]
    after = [i for i in range(count) if (ref_x is None or x[i] > ref_x) and dist[i] > 0][:k]
    rate = escape_rate([x[i] for i in after], [dist[i] for i in after])
    origin = ref_x if ref_x is not None else (x[after[0]] - 1.0 if after else 0.0)
    fits = escape_fits([x[i] for i in after], [dist[i] for i in after], origin)
    return DistanceResult(
        steps=x, distance=dist, relative=rel, per_tensor=per, escape_rate=rate,
        escape_steps=[x[i] for i in after], ref_step=ref_x, ref_norm=ref_norm,
        escape_by=by, escape_fit=fits,
    )


def pair_distance(a: State, b: State) -> float:
    """``‖a - b‖`` over ``a``'s floating tensors (float64; :func:`same_step_distance` for one pair; within
    a shard group each rank sums its chunks and the sums are all-reduced)."""
    from . import inner

    names = _float_names(a)
    missing = [n for n in names if n not in b]
    if missing:
        raise KeyError(f"the other run lacks tensors {missing[:5]}")
    if inner.active():
        local = sum((float((_shard(a[n].detach()).double().cpu() - _shard(b[n].detach()).double().cpu())
                           .pow(2).sum()) for n in names), 0.0)
        return float(np.sqrt(float(inner.allsum(torch.tensor([local], dtype=torch.float64))[0])))
    sq = sum(float((a[n].detach().double().cpu() - b[n].detach().double().cpu()).pow(2).sum()) for n in names)
    return float(np.sqrt(sq))


# ------------------------------------------------------------- interpolation
def interpolate_state(a: State, b: State, alpha: float) -> dict[str, Tensor]:
    """``(1-α) a + α b`` on floating tensors, ``a``'s value on the others (integer buffers);
    names ending in ``running_var`` are clamped at 0."""
    out = {}
    for n, ta in a.items():
        if torch.is_floating_point(ta) and n in b:
            t = torch.lerp(ta, b[n].to(ta), alpha)
            if n.endswith("running_var"):
                t = t.clamp_min(0)
            out[n] = t
        else:
            out[n] = ta.clone()
    return out


@dataclass
class InterpolationResult:
    """Loss / accuracy along the segment from ``A`` to ``B`` (see module docstring)."""

    alphas: list[float]
    loss: list[float]
    accuracy: list[float | None]
    barrier: float
    barrier_alpha: float
    loss_a: float
    loss_b: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_alphas(points: int = 29, lo: float = -0.2, hi: float = 1.2) -> np.ndarray:
    """``points`` equally spaced values on ``[lo, hi]`` (rounded to 12 decimals, so that 0.05
    steps land on 0 and 1 exactly), with ``0`` and ``1`` always among them: the curve
    always shows the two checkpoints' own losses."""
    grid = {round(float(x), 12) + 0.0 for x in np.linspace(lo, hi, points)}
    return np.array(sorted(grid | {0.0, 1.0}))


def interpolate(obj: Objective, a: State, b: State, alphas: Sequence[float] | None = None, *,
                points: int = 29, lo: float = -0.2, hi: float = 1.2) -> InterpolationResult:
    """Evaluate ``obj`` (model, data, loss, BN mode) at ``w(α)`` for every ``α``.

    ``a``, ``b``: state dicts holding at least ``obj``'s parameter names; buffers missing
    from them are taken from ``obj.buffers``.  Each point is a fresh :class:`Objective`
    with the interpolated parameters *and* buffers.  Floating endpoint tensors are cast
    to ``obj``'s dtype *before* interpolating, so a float64 curve carries no float32
    rounding of the checkpoints' own values.
    """
    al = [float(x) for x in (default_alphas(points, lo, hi) if alphas is None else alphas)]
    pnames, bnames = obj.space.names, list(obj.buffers)
    missing = [n for n in pnames if n not in a or n not in b]
    if missing:
        raise KeyError(f"endpoint states lack parameters {missing[:5]}")
    def cast(t: Tensor) -> Tensor:
        return t.to(device=obj.device, dtype=obj.dtype) if torch.is_floating_point(t) else t.to(obj.device)

    sa = {**{n: obj.buffers[n] for n in bnames}, **{n: cast(a[n]) for n in pnames + bnames if n in a}}
    sb = {**{n: obj.buffers[n] for n in bnames}, **{n: cast(b[n]) for n in pnames + bnames if n in b}}

    def at(alpha: float) -> tuple[float, float | None]:
        s = interpolate_state(sa, sb, alpha)
        return obj.with_params({n: s[n] for n in pnames}, buffers={n: s[n] for n in bnames}).evaluate()

    vals = [at(x) for x in al]
    loss = [v[0] for v in vals]
    acc = [v[1] for v in vals]

    def endpoint(target: float) -> float:
        for x, l in zip(al, loss):
            if abs(x - target) <= 1e-12:
                return l
        return at(target)[0]

    la, lb = endpoint(0.0), endpoint(1.0)
    # the endpoints belong to [0, 1] with gap 0, so the barrier is >= 0
    gaps = [(0.0, 0.0), (1.0, 0.0)]
    gaps += [(x, l - ((1 - x) * la + x * lb)) for x, l in zip(al, loss) if 0.0 < x < 1.0]
    bx, bv = max(gaps, key=lambda t: t[1])
    return InterpolationResult(alphas=al, loss=loss, accuracy=acc, barrier=float(bv), barrier_alpha=float(bx),
                               loss_a=la, loss_b=lb)
