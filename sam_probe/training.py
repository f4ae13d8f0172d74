"""A small, honest trainer (no files): SGD and SAM variants on a :class:`DataSelection`.

Each step draws a minibatch (seeded ``torch.Generator``: a fresh permutation per
epoch, the last batch of an epoch may be smaller; ``batch_size`` 0/None or
``>= N`` = full batch), computes the exact minibatch gradient ``g`` with
:class:`~sam_probe.core.objective.Objective` and, for SAM variants, the perturbed
gradient ``g~ = ∇L_B(w + e)`` on the same batch (docs/metrics.md, "SAM perturbations").

- ``sgd``: direction ``g``; ``sam``: l2 SAM ``g~``; ``asam``, ``usam``, ``linf-sam``:
  the other perturbations; ``late-sam``: SGD for steps ``< switch_step``, then l2 SAM.
- ratio-masked SAM (``samckpt`` = category digits such as ``"1"`` or ``"34"``,
  ``condition`` = c): direction ``g~ · c`` where the parameter's ratio category
  (C1..C4 of ``g~/g``, :func:`~sam_probe.core.categories.categorize`) is chosen,
  ``g~`` elsewhere.  With ``c = 1`` this is exactly plain SAM.
- update: ``d = direction + weight_decay · w``; ``buf = momentum · buf + d``
  (PyTorch SGD, no dampening; ``buf = d`` without momentum); ``w <- w - lr · buf``.

Gradients are taken with the model's dropout off and BatchNorm on batch
statistics; BatchNorm running statistics are then updated as in ordinary
training by one extra no-grad forward in train mode on the same minibatch at the
pre-update weights.

``on_checkpoint(step, state_dict, metrics)`` is called at step 0, every
``checkpoint_every`` steps and after the last step; ``state_dict`` holds detached
CPU clones of parameters and buffers, ``metrics`` plain numbers: ``step``,
``loss`` (and ``accuracy`` for classification) on the minibatch the next step draws,
at the checkpoint weights, and ``phase`` (``sgd``/``sam``).
The model is updated in place; the data is never modified.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from .core.categories import categorize
from .core.objective import Objective
from .core.perturb import perturbation
from .errors import SpecError, suggest
from .loading.data import DataSelection

OPTIMIZERS = ("sgd", "sam", "asam", "usam", "linf-sam", "late-sam")
VARIANT = {"sam": "l2", "asam": "asam", "usam": "usam", "linf-sam": "linf", "late-sam": "l2"}

Callback = Callable[[int, dict[str, Tensor], dict[str, Any]], None]


def batches(n: int, batch_size: int | None, seed: int) -> Iterator[Tensor]:
    """Endless minibatch indices: seeded permutation per epoch (full batch: ``arange(n)``)."""
    if not batch_size or batch_size >= n:
        full = torch.arange(n)
        while True:
            yield full
    g = torch.Generator().manual_seed(int(seed))
    while True:
        perm = torch.randperm(n, generator=g)
        for s in range(0, n, batch_size):
            yield perm[s:s + batch_size]


def category_mask(samckpt: str) -> list[int]:
    """Category digits ``"1".."4"`` -> category codes ``0..3``."""
    digits = str(samckpt).strip()
    if not digits or any(c not in "1234" for c in digits):
        raise SpecError(f"--samckpt {samckpt}: give category digits 1-4 (e.g. 1, 12, 34)")
    return sorted({int(c) - 1 for c in digits})


def masked_direction(g: Tensor, g_tilde: Tensor, codes: list[int], condition: float) -> Tensor:
    """``g~ · c`` on parameters whose ratio category is in ``codes``, ``g~`` elsewhere."""
    cat = categorize(g, g_tilde).to(g.device)
    mask = torch.isin(cat, torch.tensor(codes, dtype=cat.dtype, device=cat.device))
    return torch.where(mask, g_tilde * condition, g_tilde)


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def update_bn_stats(model: nn.Module, x: Tensor) -> None:
    """One no-grad forward in train mode on ``x`` (updates BatchNorm running statistics only)."""
    was = model.training
    model.train()
    with torch.no_grad():
        model(x)
    model.train(was)


def _validate(optimizer: str, switch_step: int | None, samckpt: str | None, steps: int, lr: float) -> None:
    if optimizer not in OPTIMIZERS:
        raise SpecError(f"--optimizer {optimizer}: unknown{suggest(optimizer, OPTIMIZERS)}; "
                        f"choose one of {', '.join(OPTIMIZERS)}")
    if optimizer == "late-sam" and switch_step is None:
        raise SpecError("--optimizer late-sam needs --switch-step (the step at which SGD switches to SAM)")
    if samckpt and optimizer == "sgd":
        raise SpecError("--samckpt needs a SAM optimizer (sam, asam, usam, linf-sam or late-sam), not sgd")
    if steps < 0 or lr <= 0:
        raise SpecError(f"need steps >= 0 and lr > 0 (got steps={steps}, lr={lr})")


def train(model: nn.Module, data: DataSelection, *, optimizer: str = "sgd", lr: float = 0.1, steps: int = 200,
          batch_size: int | None = 64, momentum: float = 0.0, weight_decay: float = 0.0, rho: float = 0.05,
          eta: float = 0.01, switch_step: int | None = None, samckpt: str | None = None, condition: float = 1.0,
          loss: str | None = None, seed: int = 0, checkpoint_every: int = 20,
          on_checkpoint: Callback | None = None) -> list[dict[str, Any]]:
    """Train ``model`` in place (module docstring); returns the checkpoint metrics in order."""
    _validate(optimizer, switch_step, samckpt, steps, lr)
    codes = category_mask(samckpt) if samckpt else None
    loss = loss or data.meta.get("loss")
    params = dict(model.named_parameters())
    names = list(params)
    bn = has_batchnorm(model)
    buf: Tensor | None = None
    history: list[dict[str, Any]] = []
    draw = batches(len(data.inputs), batch_size, seed)

    for step in range(steps + 1):
        idx = next(draw)
        x, y = data.inputs[idx], data.targets[idx]
        obj = Objective(model, x, y, loss, bn_mode="train")
        sam_phase = optimizer != "sgd" and not (optimizer == "late-sam" and step < int(switch_step))
        if step == 0 or step == steps or (checkpoint_every > 0 and step % checkpoint_every == 0):
            metrics = _metrics(obj, step, sam_phase)
            history.append(metrics)
            if on_checkpoint is not None:
                state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
                on_checkpoint(step, state, metrics)
        if step == steps:
            break
        w = obj.flat_params()
        g = obj.grad_flat()
        if sam_phase:
            e = perturbation(obj, g, VARIANT[optimizer], rho, eta, w)
            gt = obj.grad_flat(w + e)
            direction = masked_direction(g, gt, codes, condition) if codes else gt
        else:
            direction = g
        if weight_decay:
            direction = direction + weight_decay * w
        buf = direction if (buf is None or not momentum) else momentum * buf + direction
        if bn:
            update_bn_stats(model, x.to(w.device, w.dtype))
        new = obj.space.unflatten(w - lr * buf)
        with torch.no_grad():
            for n in names:
                params[n].copy_(new[n])
    return history


def _metrics(obj: Objective, step: int, sam_phase: bool) -> dict[str, Any]:
    value, acc = obj.evaluate()
    out: dict[str, Any] = {"step": int(step), "loss": float(value), "phase": "sam" if sam_phase else "sgd"}
    if acc is not None:
        out["accuracy"] = float(acc)
    return out
