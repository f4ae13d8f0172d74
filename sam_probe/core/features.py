"""Minor-first / major-last feature learning (docs/metrics.md, "Features"; Moon, Si, Yun 2026).

Input features ``j = 1..d`` are the entries of the flattened input ``x ∈ R^d``.

- strength ``s_j`` from the data: ``mean-abs``: ``mean_i |x_ij|``; ``corr``:
  ``|mean_i y_i x_ij|`` with binary labels mapped to ±1 (``{0,1} -> {-1,+1}``) or
  real regression targets as they are (several outputs: the norm over outputs).
- minor features: the ``floor(q d)`` weakest (ties by index), ``q`` = ``minor_fraction``.
- importance ``a_j`` of a checkpoint (:func:`importance`):

  * ``coef``: ``|β_j|`` of the end-to-end linear map (``model.end_to_end_coefficients(params)``
    when the model has it; else ``u ⊙ v`` for a diagonal-linear net with parameters
    ``u, v``; else ``W`` of a model that is one ``Linear``); ``β [out, d]`` -> column norms;
  * ``column-norm``: ``||W1[:, j]||`` of the first ``Linear`` (on flattened inputs);
  * ``saliency``: ``mean_i |∂f_{y_i}(x_i) / ∂x_ij|`` with ``f_y`` the logit of the
    true class (``ce``) or the output (one output; several: their sum), BatchNorm
    in eval mode, by ``torch.func.grad``;
  * ``auto``: ``coef`` if available, else ``column-norm`` if the first parametrised
    layer is a ``Linear`` on the flattened input, else ``saliency``.

- per checkpoint ``t``: minor mass ``Σ_minor a_j / Σ_j a_j``; dominant index
  ``argmax_j a_j`` and its strength rank (0 = strongest); Spearman correlation of the
  growth ``log a_j(t+1) - log a_j(t)`` (``a`` floored at ``floor``) with ``s_j``
  (negative = minor first), reported at ``t`` (None at the last checkpoint or
  when undefined).
- collapse: a checkpoint whose total importance ``Σ_j a_j`` is not finite, is 0, or is
  below :data:`COLLAPSE` (1e-3) of its largest value so far in the run (a model that
  shrank to nothing, not one that is still small at init) predicts (almost)
  nothing from its inputs (e.g. SAM at a tiny init, Moon, Si & Yun's first regime): it
  is flagged ``collapsed`` and has no dominant feature, strength rank, minor mass or
  growth correlation (None), since its normalised shares are rounding noise.
- images: heat-map ``a`` reshaped to ``image_shape``; background mass = share of
  ``Σ a`` on features whose mean intensity over the (raw or given) images is below
  ``threshold · max_j mean intensity``.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.stats import spearmanr
from torch import Tensor, nn
from torch.func import functional_call, grad

from .objective import Objective, analysis_mode

from .names import IMPORTANCES, STRENGTHS  # noqa: F401 - re-exported
FLOOR = 1e-30
COLLAPSE = 1e-3  # total importance below this fraction of its peak over the run: the model has vanished


def collapsed(importance: Any) -> np.ndarray:
    """Per checkpoint (rows of ``importance [T, d]``), whether the model has collapsed (module docstring)."""
    A = np.abs(np.asarray(importance, dtype=float))
    if A.ndim == 1:
        A = A[None, :]
    tot = A.sum(axis=1)
    finite = np.isfinite(tot)
    peak = np.maximum.accumulate(np.where(finite, tot, 0.0))  # the largest total so far
    return ~finite | (tot <= 0) | (tot < COLLAPSE * peak)


# ------------------------------------------------------------------ strength
def flat_inputs(x: Tensor | np.ndarray) -> np.ndarray:
    """``[N, ...] -> [N, d]`` float64."""
    a = x.detach().cpu().double().numpy() if isinstance(x, Tensor) else np.asarray(x, dtype=np.float64)
    return a.reshape(a.shape[0], -1)


def feature_strength(x: Tensor | np.ndarray, y: Tensor | np.ndarray | None = None,
                     method: str = "mean-abs") -> np.ndarray:
    """``s_j``: ``mean-abs`` = ``mean_i |x_ij|``; ``corr`` = ``|mean_i y_i x_ij|`` (module docstring)."""
    X = flat_inputs(x)
    if method == "mean-abs":
        return np.abs(X).mean(axis=0)
    if method != "corr":
        raise ValueError(f"unknown strength {method!r}; choose one of {', '.join(STRENGTHS)}")
    if y is None:
        raise ValueError("strength 'corr' needs labels")
    yt = torch.as_tensor(y).detach().cpu()
    Y = yt.double().numpy().reshape(len(X), -1)
    if not torch.is_floating_point(yt) or np.all(np.isin(Y, (0.0, 1.0))):
        vals = np.unique(Y)
        if len(vals) > 2:
            raise ValueError("strength 'corr' needs binary (or ±1, or real) labels, got several classes")
        if np.all(np.isin(vals, (0.0, 1.0))):
            Y = 2.0 * Y - 1.0
    M = Y.T @ X / len(X)  # [outputs, d]
    return np.linalg.norm(M, axis=0)


def minor_mask(strength: np.ndarray, fraction: float = 0.5) -> np.ndarray:
    """Boolean mask of the ``floor(fraction · d)`` weakest features (stable: ties by index)."""
    s = np.asarray(strength, dtype=np.float64)
    n = int(math.floor(fraction * len(s) + 1e-9))
    mask = np.zeros(len(s), dtype=bool)
    mask[np.argsort(s, kind="stable")[:n]] = True
    return mask


def strength_ranks(strength: np.ndarray) -> np.ndarray:
    """Rank of each feature by strength, 0 = strongest (ties by index)."""
    order = np.argsort(-np.asarray(strength, dtype=np.float64), kind="stable")
    ranks = np.empty(len(order), dtype=np.int64)
    ranks[order] = np.arange(len(order))
    return ranks


# ---------------------------------------------------------------- importance
def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def end_to_end_coefficients(model: nn.Module, params: dict[str, Tensor]) -> Tensor | None:
    """``β`` (``[d]`` or ``[out, d]``) of a model that is linear in ``x``, or None.

    ``model.end_to_end_coefficients(params)`` if defined; else ``u ⊙ v`` when the
    parameters are exactly ``u, v``; else the ``weight`` of a model made of one ``nn.Linear``.
    """
    fn = getattr(model, "end_to_end_coefficients", None)
    if callable(fn):
        return torch.as_tensor(fn(params))
    leaves = {_leaf(n): t for n, t in params.items()}
    if len(leaves) == len(params) and set(leaves) == {"u", "v"}:
        return leaves["u"] * leaves["v"]
    owners = [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]
    if len(owners) == 1 and isinstance(owners[0], nn.Linear):
        w = [t for n, t in params.items() if _leaf(n) == "weight"]
        return w[0] if len(w) == 1 else None
    return None


def first_linear_weight(model: nn.Module, params: dict[str, Tensor], d: int) -> Tensor | None:
    """``W1 [out, d]`` of the first parametrised layer when it is an ``nn.Linear`` with ``d``
    inputs (a layer on the flattened input), else None."""
    for name, m in model.named_modules():
        if any(True for _ in m.parameters(recurse=False)):
            key = f"{name}.weight" if name else "weight"
            if isinstance(m, nn.Linear) and m.in_features == d and key in params:
                return params[key]
            return None
    return None


def saliency(obj: Objective, params: dict[str, Tensor] | None = None, chunk_size: int | None = None) -> np.ndarray:
    """``mean_i |∂f_{y_i}(x_i) / ∂x_ij|`` over ``obj``'s data (``[d]``, float64), BatchNorm in eval mode."""
    p = obj.params if params is None else params
    n = obj.n_samples
    cs = chunk_size or obj.chunk_size

    def picked(x: Tensor, y: Tensor) -> Tensor:
        out = functional_call(obj.model, (p, obj.buffers), (x,), strict=False)
        out = out.reshape(out.shape[0], -1)
        if out.shape[1] > 1 and not torch.is_floating_point(y):
            return out.gather(1, y.long().reshape(-1, 1)).sum()
        return out.sum()  # samples are independent in eval mode: row i holds ∂f(x_i)/∂x_i

    total = None
    with analysis_mode(obj.model, "eval"):
        for s in range(0, n, cs):
            x, y = obj.inputs[s:s + cs], obj.targets[s:s + cs]
            gx = grad(picked)(x, y).reshape(len(x), -1).abs().sum(0)
            total = gx if total is None else total + gx
    return (total / n).detach().cpu().double().numpy()


def importance(obj: Objective, method: str = "auto", params: dict[str, Tensor] | None = None,
               chunk_size: int | None = None) -> tuple[np.ndarray, str]:
    """``(a [d] float64, method used)`` at ``params`` (default ``obj.params``); see module docstring."""
    if method not in IMPORTANCES:
        raise ValueError(f"unknown importance {method!r}; choose one of {', '.join(IMPORTANCES)}")
    p = obj.params if params is None else params
    d = int(np.prod(obj.inputs.shape[1:]))

    def as_abs(beta: Tensor) -> np.ndarray:
        b = beta.detach().cpu().double()
        a = b.abs() if b.dim() == 1 else b.reshape(-1, b.shape[-1]).norm(dim=0)
        if a.numel() != d:
            raise ValueError(f"coefficients have {a.numel()} entries for {d} input features")
        return a.numpy()

    if method in ("auto", "coef"):
        beta = end_to_end_coefficients(obj.model, p)
        if beta is not None:
            return as_abs(beta), "coef"
        if method == "coef":
            raise ValueError("importance 'coef' needs a linear or diagonal-linear model "
                             "(or a model.end_to_end_coefficients(params) method)")
    if method in ("auto", "column-norm"):
        W = first_linear_weight(obj.model, p, d)
        if W is None and method == "column-norm":
            W = next((t for t in p.values() if t.dim() == 2 and t.shape[1] == d), None)
            if W is None:
                raise ValueError(f"importance 'column-norm' needs a first Linear layer with {d} inputs")
        if W is not None:
            return W.detach().cpu().double().norm(dim=0).numpy(), "column-norm"
    return saliency(obj, p, chunk_size), "saliency"


# ------------------------------------------------------------------- images
def background_mask(images: Tensor | np.ndarray, threshold: float = 0.05) -> np.ndarray:
    """Features whose mean intensity over samples is below ``threshold · max_j mean_j`` (``[d]`` bool)."""
    m = flat_inputs(images).mean(axis=0)
    return m < threshold * m.max()


def mass(a: np.ndarray, mask: np.ndarray) -> float:
    """``Σ_mask a / Σ a`` (NaN when ``Σ a = 0``)."""
    tot = float(np.sum(a))
    return float(np.sum(a[mask])) / tot if tot > 0 else float("nan")


# -------------------------------------------------------------------- result
@dataclass
class FeaturesResult:
    """Per-checkpoint feature statistics (module docstring)."""

    steps: list[float]
    strength: np.ndarray
    importance: np.ndarray  # [T, d]
    minor: np.ndarray  # [d] bool
    minor_mass: list[float | None]  # None where the model collapsed (``collapsed``)
    dominant_index: list[int | None]
    dominant_strength_rank: list[int | None]
    spearman_growth_strength: list[float | None]
    method: str = "auto"
    strength_method: str = "mean-abs"
    minor_fraction: float = 0.5
    image_shape: tuple[int, ...] | None = None
    background_mass: list[float | None] | None = None
    background: np.ndarray | None = None  # [d] bool
    collapsed: list[bool] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def heatmaps(self) -> np.ndarray | None:
        """``[T, *image_shape]`` importance maps (None without an image shape)."""
        if self.image_shape is None:
            return None
        return self.importance.reshape(len(self.importance), *self.image_shape)

    def to_dict(self) -> dict[str, Any]:
        rows = []
        for t, step in enumerate(self.steps):
            row = {"step": int(step) if float(step).is_integer() else step, "minor_mass": self.minor_mass[t], "dominant_index": self.dominant_index[t],
                   "dominant_strength_rank": self.dominant_strength_rank[t],
                   "spearman_growth_strength": self.spearman_growth_strength[t]}
            if self.collapsed is not None:
                row["collapsed"] = bool(self.collapsed[t])
            if self.background_mass is not None:
                row["background_mass"] = self.background_mass[t]
            rows.append(row)
        out: dict[str, Any] = {
            "results": rows, "strength": self.strength.tolist(), "importance": self.importance.tolist(),
            "minor": np.flatnonzero(self.minor).tolist(), "method": self.method,
            "strength_method": self.strength_method, "minor_fraction": self.minor_fraction,
            "collapse_threshold": COLLAPSE,
        }
        if self.image_shape is not None:
            out["image_shape"] = list(self.image_shape)
            out["heatmaps"] = self.heatmaps().tolist()
        if self.background is not None:
            out["background"] = np.flatnonzero(self.background).tolist()
        out.update(self.extra)
        return out


def growth_spearman(a0: np.ndarray, a1: np.ndarray, strength: np.ndarray, floor: float = FLOOR) -> float | None:
    """Spearman ρ between ``log max(a1, floor) - log max(a0, floor)`` and ``strength`` (None if undefined)."""
    gr = np.log(np.maximum(a1, floor)) - np.log(np.maximum(a0, floor))
    if np.ptp(gr) == 0 or np.ptp(strength) == 0:
        return None
    r = spearmanr(gr, strength).statistic
    return None if not np.isfinite(r) else float(r)


def analyse_features(importances: Sequence[np.ndarray], strength: np.ndarray, steps: Sequence[float] | None = None,
                     *, minor_fraction: float = 0.5, image_shape: Sequence[int] | None = None,
                     background: np.ndarray | None = None, floor: float = FLOOR, method: str = "auto",
                     strength_method: str = "mean-abs") -> FeaturesResult:
    """Statistics of importance vectors ``a(t)`` (in training order) against ``strength``.

    ``background``: ``[d]`` bool mask (:func:`background_mask`) for the background mass.
    """
    A = np.stack([np.asarray(a, dtype=np.float64).reshape(-1) for a in importances])
    s = np.asarray(strength, dtype=np.float64).reshape(-1)
    if A.shape[1] != len(s):
        raise ValueError(f"importance has {A.shape[1]} features, strength {len(s)}")
    steps = [float(x) for x in (range(len(A)) if steps is None else steps)]
    if len(steps) != len(A):
        raise ValueError(f"{len(steps)} steps for {len(A)} checkpoints")
    if image_shape is not None and int(np.prod(image_shape)) != len(s):
        raise ValueError(f"image shape {tuple(image_shape)} does not hold {len(s)} features")
    minor = minor_mask(s, minor_fraction)
    ranks = strength_ranks(s)
    dead = collapsed(A)
    dom = [None if dead[t] else int(np.argmax(a)) for t, a in enumerate(A)]
    return FeaturesResult(
        steps=steps, strength=s, importance=A, minor=minor,
        minor_mass=[None if dead[t] else mass(a, minor) for t, a in enumerate(A)], dominant_index=dom,
        dominant_strength_rank=[None if j is None else int(ranks[j]) for j in dom],
        spearman_growth_strength=[None if dead[t] or dead[t + 1] else growth_spearman(A[t], A[t + 1], s, floor)
                                  for t in range(len(A) - 1)] + [None],
        collapsed=[bool(x) for x in dead],
        method=method, strength_method=strength_method, minor_fraction=float(minor_fraction),
        image_shape=None if image_shape is None else tuple(int(x) for x in image_shape),
        background_mass=None if background is None else [None if dead[t] else mass(a, background)
                                                          for t, a in enumerate(A)],
        background=background,
    )


def features(objectives: Iterable[Objective], steps: Sequence[float] | None = None, *,
             strength: str = "mean-abs", importance_method: str = "auto", minor_fraction: float = 0.5,
             image_shape: Sequence[int] | None = None, images: Tensor | np.ndarray | None = None,
             background_threshold: float | None = 0.05, floor: float = FLOOR,
             chunk_size: int | None = None) -> FeaturesResult:
    """Feature analysis of a run: one :class:`Objective` per checkpoint (same data).

    Strength from the first objective's inputs/targets.  With ``image_shape`` the
    heat-maps and the background mass (mean intensity of ``images``, default the
    objective's inputs; ``background_threshold=None`` skips it) are reported.
    """
    imps, used, first = [], [], None
    for obj in objectives:
        if first is None:
            first = obj
        a, m = importance(obj, importance_method, chunk_size=chunk_size)
        imps.append(a)
        used.append(m)
    if first is None:
        raise ValueError("no checkpoints")
    s = feature_strength(first.inputs, first.targets, strength)
    bg = None
    if image_shape is not None and background_threshold is not None:
        bg = background_mask(first.inputs if images is None else images, background_threshold)
    return analyse_features(imps, s, steps, minor_fraction=minor_fraction, image_shape=image_shape,
                            background=bg, floor=floor, method=used[0] if len(set(used)) == 1 else ",".join(used),
                            strength_method=strength)
