"""SAM perturbations, the perturbed gradient and SAM sharpness.

With ``g = ∇L(w)`` on a batch (docs/metrics.md, "SAM perturbations"):

- ``l2``   (Foret et al. 2021): ``e = ρ g / ||g||`` (global norm)
- ``linf``: ``e = ρ sign(g)``
- ``usam`` (unnormalised): ``e = ρ g``
- ``asam`` (Kwon et al. 2021): ``e = ρ T² g / ||T g||`` with ``T = |w| + η`` on
  weights and ``T = 1`` on biases (``η = 0`` gives the davda54 variant)

The perturbed gradient is ``g~ = ∇L(w + e)`` on the SAME batch.  With
m-sharpness the selection is cut into consecutive sub-batches of ``m`` samples,
each perturbed with its own gradient; ``g``, ``g~`` and the sharpness are the
means over sub-batches weighted by their loss terms (samples, or tokens for
token-level losses), so the weights sum to 1 and undo each sub-batch's division.  Weight decay is in neither gradient.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import inner
from .objective import Objective

from .names import VARIANTS  # noqa: F401 - re-exported
NORM_FLOOR = 1e-12


def _is_bias(name: str) -> bool:
    return "bias" in name.rsplit(".", 1)[-1]


def asam_scale(obj: Objective, w: Tensor, eta: float) -> Tensor:
    """Flat ``T``: ``|w| + η`` on weights, 1 on biases."""
    parts = []
    for name, sl in obj.space.slices().items():
        seg = w[sl]
        parts.append(torch.ones_like(seg) if _is_bias(name) else seg.abs() + eta)
    return torch.cat(parts) if parts else w.clone()


def perturbation(obj: Objective, g: Tensor, variant: str = "l2", rho: float = 0.05, eta: float = 0.01,
                 w: Tensor | None = None) -> Tensor:
    """Flat SAM perturbation ``e`` for flat gradient ``g`` (see module docstring)."""
    if variant == "l2":
        return rho * g / max(inner.norm(g), NORM_FLOOR)
    if variant == "linf":
        return rho * torch.sign(g)
    if variant == "usam":
        return rho * g
    if variant == "asam":
        w = obj.flat_params() if w is None else w
        t = asam_scale(obj, w, eta)
        return rho * t * t * g / max(inner.norm(t * g), NORM_FLOOR)
    raise ValueError(f"unknown SAM variant {variant!r}; choose one of {', '.join(VARIANTS)}")


#: Entries per chunk of the chunkwise loops over flat vectors (a multiple of 8, so packed bit
#: planes of chunks concatenate): temporaries are O(CHUNK), never parameter-sized.
CHUNK = 1 << 20


def chunk_size(chunk: int | None = None) -> int:
    """``chunk`` (default :data:`CHUNK`, read at call time) rounded down to a multiple of 8, at least 8."""
    c = CHUNK if chunk is None else int(chunk)
    return max(8, c - c % 8)


def _global_norm(v: Tensor) -> Tensor:
    """``max(||v||, NORM_FLOOR)`` as a 0-dim tensor of ``v``'s dtype, accumulated in float64 (a float32
    ``v.norm()`` is off by ~1e-4 at 10⁷ entries, :mod:`.inner`); over all ranks when ``v`` is a shard."""
    return torch.tensor(inner.norm(v), dtype=v.dtype, device=v.device).clamp_min(NORM_FLOOR)


def perturbed_point(obj: Objective, g: Tensor, variant: str = "l2", rho: float = 0.05, eta: float = 0.01,
                    chunk: int | None = None) -> Tensor:
    """``w + e`` as ONE new flat vector, filled chunk by chunk.

    Entry for entry the same floating-point operations as ``w + perturbation(obj, g, ...)``
    (so bit-identical), without its parameter-sized temporaries: ``w`` is read from the
    model's tensors, ``e`` exists one chunk at a time.  ``asam`` needs ``||T g||`` over the
    whole vector, so it holds one more vector (``T g``) until the norm is taken.
    """
    if variant not in ("l2", "linf", "usam", "asam"):
        raise ValueError(f"unknown SAM variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    chunk = chunk_size(chunk)
    out = obj.flat_params()  # w; updated in place, chunk by chunk
    if variant == "l2":
        nrm = _global_norm(g)
        for s in range(0, out.numel(), chunk):
            out[s:s + chunk].add_(rho * g[s:s + chunk] / nrm)
        return out
    if variant in ("linf", "usam"):
        for s in range(0, out.numel(), chunk):
            gc = g[s:s + chunk]
            out[s:s + chunk].add_(rho * torch.sign(gc) if variant == "linf" else rho * gc)
        return out

    def pieces():  # (slice of the flat vector, is a bias), within one tensor each
        for name, sl in obj.space.slices().items():
            for s in range(sl.start, sl.stop, chunk):
                yield slice(s, min(s + chunk, sl.stop)), _is_bias(name)

    def scale(sl: slice, bias: bool) -> Tensor:  # T on one piece, as asam_scale computes it
        return torch.ones_like(out[sl]) if bias else out[sl].abs() + eta

    tg = torch.empty_like(g)
    for sl, bias in pieces():
        torch.mul(scale(sl, bias), g[sl], out=tg[sl])
    nrm = _global_norm(tg)
    del tg
    for sl, bias in pieces():
        t = scale(sl, bias)
        out[sl].add_(rho * t * t * g[sl] / nrm)
    return out


def sub_batches(obj: Objective, m: int | None) -> list[tuple[Objective, float]]:
    """``[(objective on sub-batch, weight T_b / T)]`` with ``T`` the loss terms (``denominator``);
    the whole selection when ``m`` is None."""
    if not m or m >= obj.n_samples:
        return [(obj, 1.0)]
    out = []
    for s in range(0, obj.n_samples, m):
        idx = torch.arange(s, min(s + m, obj.n_samples), device=obj.device)
        sub = obj.subset(idx)
        out.append((sub, sub.denominator / obj.denominator))
    return out


@dataclass
class PerturbedGradient:
    """``g`` and ``g~ = ∇L(w + e)`` as flat vectors (term-weighted over sub-batches)."""

    grad: Tensor
    perturbed_grad: Tensor
    loss: float
    perturbed_loss: float


def perturbed_gradient(obj: Objective, rho: float = 0.05, variant: str = "l2", m: int | None = None,
                       eta: float = 0.01, with_loss: bool = True) -> PerturbedGradient:
    """Current and perturbed gradient on the same data (m-sharpness when ``m`` is set).

    ``with_loss=False`` skips the two extra forward passes for the losses (then NaN).
    """
    subs = sub_batches(obj, m)
    g: Tensor | None = None
    gt: Tensor | None = None
    loss = 0.0 if with_loss else float("nan")
    ploss = 0.0 if with_loss else float("nan")
    for sub, weight in subs:
        gb = sub.grad_flat()
        point = perturbed_point(sub, gb, variant, rho, eta)  # w + e
        if len(subs) > 1 and g is None:  # accumulation buffers; with the whole selection there are none
            g, gt = torch.zeros_like(gb), torch.zeros_like(gb)
        if g is None:
            g = gb
        else:  # add this sub-batch's g before its g~ is computed: at most 4 vectors alive
            g.add_(gb, alpha=weight)
        del gb
        gtb = sub.grad_flat(point)
        if gt is None:
            gt = gtb
        else:
            gt.add_(gtb, alpha=weight)
        del gtb
        if with_loss:
            loss += weight * sub.loss()
            ploss += weight * sub.loss(point)
        del point
        if sub is not obj:  # sub-batch passes; obj counts its own
            obj.n_grad += 2
    assert g is not None and gt is not None
    return PerturbedGradient(g, gt, loss, ploss)


def sam_sharpness(obj: Objective, rho: float = 0.05, variant: str = "l2", m: int | None = None,
                  eta: float = 0.01) -> float:
    """``L(w + e) - L(w)`` (term-weighted mean over sub-batches of size ``m``)."""
    w = obj.flat_params()
    total = 0.0
    for sub, weight in sub_batches(obj, m):
        e = perturbation(sub, sub.grad_flat(), variant, rho, eta, w)
        total += weight * (sub.loss(w + e) - sub.loss())
        if sub is not obj:
            obj.n_grad += 1
    return total
