"""A small, honest trainer (no files): SGD and SAM variants on a :class:`DataSelection`.

Each step draws a minibatch (seeded ``torch.Generator``: a fresh permutation per
epoch, the last batch of an epoch may be smaller; ``batch_size`` 0/None or
``>= N`` = full batch), computes the exact minibatch gradient ``g`` with
:class:`~sam_probe.core.objective.Objective` and, for SAM variants, the perturbed
gradient ``g~ = ∇L_B(w + e)`` on the same batch (docs/metrics.md, "SAM perturbations").

- ``sgd``: direction ``g``; ``sam``: l2 SAM ``g~``; ``asam``, ``usam``, ``linf-sam``:
  the other perturbations; ``late-sam``: SGD for steps ``< switch_step``, then l2 SAM.
- ratio-masked SAM (the notebook's SAMECKPT; ``samckpt`` = category digits such as
  ``"1"``, ``"12"`` or ``"234"``; the mask ``M`` = parameters whose ratio category of
  ``g~/g`` on the step's minibatch is chosen, :func:`~sam_probe.core.categories.categorize`):

  * ``condition=None`` (*select*): direction ``g~`` on ``M``, ``g`` elsewhere
    (SAM's update on the chosen categories only);
  * ``condition=c`` (*scale*): ``g~ · c`` on ``M``, ``g~`` elsewhere (``c = 1`` is plain SAM);
  * ``random_mask=True``: ``M`` is replaced by a uniformly random set of the same size
    (seeded by ``seed`` and the step): the control that separates *which*
    coordinates from *how many*.

- update: ``d = direction + weight_decay · w``; ``buf = momentum · buf + d``
  (PyTorch SGD, no dampening; ``buf = d`` without momentum); ``u = buf``, or under
  ``project`` (Song et al.'s Dom-SGD / Bulk-SGD) ``u = P_k buf`` (``dom``) or
  ``u = (I - P_k) buf`` (``bulk``) with ``P_k = V_k V_kᵀ`` from the certified top-k
  Hessian eigenvectors of the full training loss (BatchNorm on batch statistics),
  recomputed at every step divisible by ``eigen_every`` (and at the first step);
  ``w <- w - lr · u``.  So the update always lies in (or orthogonal to) the current
  top-k space; momentum still carries the unprojected history.

Gradients are taken with the model's dropout off and BatchNorm on batch
statistics; BatchNorm running statistics are then updated as in ordinary
training by one extra no-grad forward in train mode on the same minibatch at the
pre-update weights.

Models below :data:`ONE_THREAD_BELOW` parameters train on one CPU thread (restored afterwards): their
operations are too small to share, and on busy cores torch's worker threads spin (100 digits-MLP steps:
0.1 s on one thread against 1.7-4.7 s CPU on two shared, loaded cores).

Checkpoints are written at ``checkpoint_steps`` (any set of steps, e.g. from
:func:`parse_checkpoint_steps`), else at every ``checkpoint_every`` steps; always at
the first and the last step.  ``on_checkpoint(step, state_dict, metrics)`` gets
detached CPU clones of parameters and buffers and plain metrics: ``step``, ``loss``
(and ``accuracy`` for classification) on the minibatch the next step draws, at the
checkpoint weights, and ``phase`` (``sgd``/``sam``).  ``state`` (a :class:`TrainState`)
is kept current, so the callback can save what a resume needs: with the same
arguments, ``train(..., start=state at step s)`` continues bit for bit like the
uninterrupted run (tests/test_training.py).
The model is updated in place; the data is never modified.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
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
PROJECTIONS = ("dom", "bulk")
ONE_THREAD_BELOW = 1_000_000  # parameters

Callback = Callable[[int, dict[str, Tensor], dict[str, Any]], None]


@dataclass
class TrainState:
    """What continues a run exactly: the step the weights are at, the minibatches already
    drawn from the seeded stream, the momentum buffer (flat, or None) and the projector."""

    step: int = 0
    draws: int = 0
    momentum_buffer: Tensor | None = None
    projector: Tensor | None = None  # V_k [P, k] of --project (not saved: recomputed on resume)
    projector_step: int | None = None
    projector_eigenvalues: list[float] = field(default_factory=list)


def batches(n: int, batch_size: int | None, seed: int, skip: int = 0) -> Iterator[Tensor]:
    """Endless minibatch indices: seeded permutation per epoch (full batch: ``arange(n)``);
    ``skip`` draws are consumed first (a resumed run continues the same stream)."""
    if not batch_size or batch_size >= n:
        full = torch.arange(n)
        while True:
            yield full
    g = torch.Generator().manual_seed(int(seed))
    per_epoch = -(-n // batch_size)
    for _ in range(skip // per_epoch):  # whole epochs: one permutation each, nothing else drawn
        torch.randperm(n, generator=g)
    first = skip % per_epoch
    while True:
        perm = torch.randperm(n, generator=g)
        for s in range(first * batch_size, n, batch_size):
            yield perm[s:s + batch_size]
        first = 0


def draw_at(n: int, batch_size: int | None, seed: int, draw: int) -> Tensor:
    """The indices of draw number ``draw`` (0-based) of :func:`batches` — the minibatch a step used."""
    return next(batches(n, batch_size, seed, skip=draw))


def parse_checkpoint_steps(text: str | None, last: int) -> set[int] | None:
    """``"0:50:1,50:400:10,1000"`` -> steps: ``a:b:e`` = a, a+e, ... <= b (``a:b`` every step);
    a single number is that step.  None/empty -> None (use ``checkpoint_every``)."""
    if text is None or not str(text).strip():
        return None
    out: set[int] = set()
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            bits = [int(x) for x in part.split(":")]
        except ValueError:
            bits = []
        if len(bits) == 1 and bits[0] >= 0:
            out.add(bits[0])
            continue
        if len(bits) not in (2, 3) or bits[0] < 0 or bits[1] < bits[0] or (len(bits) == 3 and bits[2] < 1):
            raise SpecError(f"--checkpoint-steps {text}: give windows START:STOP:EVERY or steps separated by "
                            "commas, e.g. 0:50:1,50:400:10")
        a, b = bits[0], min(bits[1], last)
        out.update(range(a, b + 1, bits[2] if len(bits) == 3 else 1))
    return out


def category_mask(samckpt: str) -> list[int]:
    """Category digits ``"1".."4"`` -> category codes ``0..3``."""
    digits = str(samckpt).strip()
    if not digits or any(c not in "1234" for c in digits):
        raise SpecError(f"--samckpt {samckpt}: give category digits 1-4 (e.g. 1, 12, 234)")
    return sorted({int(c) - 1 for c in digits})


def category_membership(g: Tensor, g_tilde: Tensor, codes: list[int]) -> Tensor:
    """Bool mask of the parameters whose ratio category (code) is in ``codes``."""
    cat = categorize(g, g_tilde).to(g.device)
    return torch.isin(cat, torch.tensor(codes, dtype=cat.dtype, device=cat.device))


def random_like_mask(mask: Tensor, generator: torch.Generator) -> Tensor:
    """A uniformly random mask with as many entries set as ``mask``."""
    n, m = mask.numel(), int(mask.sum())
    out = torch.zeros(n, dtype=torch.bool)
    out[torch.randperm(n, generator=generator)[:m]] = True
    return out.to(mask.device)


def masked_direction(g: Tensor, g_tilde: Tensor, codes: list[int] | None = None, condition: float | None = None,
                     mask: Tensor | None = None) -> Tensor:
    """SAMECKPT direction on ``mask`` (default: categories ``codes`` of ``g~/g``):
    ``g~`` there and ``g`` elsewhere (``condition=None``), or ``g~ · c`` there and ``g~`` elsewhere."""
    if mask is None:
        mask = category_membership(g, g_tilde, codes or [])
    if condition is None:
        return torch.where(mask, g_tilde, g)
    return torch.where(mask, g_tilde * condition, g_tilde)


def mask_generator(seed: int, step: int) -> torch.Generator:
    """The random-mask control's generator at ``step`` (independent of the minibatch stream)."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(step)) % (2 ** 63))


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def update_bn_stats(model: nn.Module, x: Tensor) -> None:
    """One no-grad forward in train mode on ``x`` (updates BatchNorm running statistics only)."""
    was = model.training
    model.train()
    with torch.no_grad():
        model(x)
    model.train(was)


def top_space(obj: Objective, k: int, tol: float, seed: int, warm: Tensor | None = None,
              max_hvp: int | None = None) -> tuple[Tensor, list[float]]:
    """Certified top-k Hessian eigenvectors of ``obj`` (orthonormalised in float64 and cast back)
    and their eigenvalues; raises :class:`SpecError` when a pair misses ``tol``."""
    from .core.lanczos import top_eigen

    res = top_eigen(obj, k, tol=tol, seed=seed, warm=warm, max_hvp=max_hvp)
    if not res.all_converged:
        bad = [f"{r:.1e}" for r, c in zip(res.residuals, res.converged) if not c]
        raise SpecError(f"--project: the top-{k} eigenvectors did not reach --eigen-tol {tol:g} (residuals {bad}); "
                        "raise --eigen-max-hvp or loosen --eigen-tol")
    V, _ = torch.linalg.qr(res.eigenvectors.double())
    return V.to(res.eigenvectors.dtype), [float(x) for x in res.eigenvalues]


def project(V: Tensor, v: Tensor, kind: str) -> Tensor:
    """``P_k v`` (``dom``) or ``v - P_k v`` (``bulk``) for orthonormal ``V``."""
    dom = V @ (V.T @ v)
    return dom if kind == "dom" else v - dom


def _validate(optimizer: str, switch_step: int | None, samckpt: str | None, steps: int, lr: float,
              random_mask: bool, project_kind: str | None, k: int, eigen_every: int, start: int) -> None:
    if optimizer not in OPTIMIZERS:
        raise SpecError(f"--optimizer {optimizer}: unknown{suggest(optimizer, OPTIMIZERS)}; "
                        f"choose one of {', '.join(OPTIMIZERS)}")
    if optimizer == "late-sam" and switch_step is None:
        raise SpecError("--optimizer late-sam needs --switch-step (the step at which SGD switches to SAM)")
    if samckpt and optimizer == "sgd":
        raise SpecError("--samckpt needs a SAM optimizer (sam, asam, usam, linf-sam or late-sam), not sgd")
    if random_mask and not samckpt:
        raise SpecError("--random-mask needs --samckpt (the random mask has the size of the category mask)")
    if steps < 0 or lr <= 0:
        raise SpecError(f"need steps >= 0 and lr > 0 (got steps={steps}, lr={lr})")
    if start > steps:
        raise SpecError(f"the run starts at step {start}, after --steps {steps} (--steps is the last step)")
    if project_kind is not None:
        if project_kind not in PROJECTIONS:
            raise SpecError(f"--project {project_kind}: choose dom or bulk")
        if k < 1 or eigen_every < 1:
            raise SpecError("--project needs --k >= 1 and --eigen-every >= 1")


def train(model: nn.Module, data: DataSelection, **kw: Any) -> list[dict[str, Any]]:
    """Train ``model`` in place (module docstring; arguments of :func:`train_steps`), on one thread for
    models below :data:`ONE_THREAD_BELOW` parameters on the CPU."""
    small = sum(p.numel() for p in model.parameters()) < ONE_THREAD_BELOW and all(
        p.device.type == "cpu" for p in model.parameters())
    before = torch.get_num_threads()
    if small:
        torch.set_num_threads(1)
    try:
        return train_steps(model, data, **kw)
    finally:
        if small:
            torch.set_num_threads(before)


def train_steps(model: nn.Module, data: DataSelection, *, optimizer: str = "sgd", lr: float = 0.1, steps: int = 200,
          batch_size: int | None = 64, momentum: float = 0.0, weight_decay: float = 0.0, rho: float = 0.05,
          eta: float = 0.01, switch_step: int | None = None, samckpt: str | None = None,
          condition: float | None = None, random_mask: bool = False, project: str | None = None, k: int = 10,
          eigen_every: int = 10, eigen_tol: float = 1e-3, eigen_max_hvp: int | None = None,
          loss: str | None = None, seed: int = 0, checkpoint_every: int = 20,
          checkpoint_steps: Iterable[int] | None = None, start: TrainState | None = None,
          state: TrainState | None = None, on_checkpoint: Callback | None = None) -> list[dict[str, Any]]:
    """Train ``model`` in place (module docstring) up to step ``steps``; returns the checkpoint metrics.

    ``start``: where a resumed run stands (its step, draws and momentum buffer); ``state``:
    a :class:`TrainState` kept current for the callback (one is made when not given).
    """
    st = state if state is not None else TrainState()
    if start is not None:
        st.step, st.draws = int(start.step), int(start.draws)
        st.momentum_buffer = None if start.momentum_buffer is None else start.momentum_buffer.detach().clone()
    first = st.step
    _validate(optimizer, switch_step, samckpt, steps, lr, random_mask, project, k, eigen_every, first)
    codes = category_mask(samckpt) if samckpt else None
    loss = loss or data.meta.get("loss")
    params = dict(model.named_parameters())
    names = list(params)
    bn = has_batchnorm(model)
    history: list[dict[str, Any]] = []
    wanted = None if checkpoint_steps is None else {int(s) for s in checkpoint_steps}
    draw = batches(len(data.inputs), batch_size, seed, skip=st.draws)
    full = None
    if project is not None:
        full = (data.inputs, data.targets)
    buf = None if st.momentum_buffer is None else st.momentum_buffer

    for step in range(first, steps + 1):
        idx = next(draw)
        x, y = data.inputs[idx], data.targets[idx]
        obj = Objective(model, x, y, loss, bn_mode="train")
        sam_phase = optimizer != "sgd" and not (optimizer == "late-sam" and step < int(switch_step))
        due = (wanted is not None and step in wanted) or (
            wanted is None and checkpoint_every > 0 and step % checkpoint_every == 0)
        if step == first or step == steps or due:
            metrics = _metrics(obj, step, sam_phase)
            if st.projector is not None:
                metrics["projector_step"] = st.projector_step
                metrics["projector_eigenvalues"] = list(st.projector_eigenvalues)
            history.append(metrics)
            if on_checkpoint is not None:
                sd = {kk: v.detach().cpu().clone() for kk, v in model.state_dict().items()}
                on_checkpoint(step, sd, metrics)
        if step == steps:
            break
        st.draws += 1
        w = obj.flat_params()
        g = obj.grad_flat()
        if sam_phase:
            e = perturbation(obj, g, VARIANT[optimizer], rho, eta, w)
            gt = obj.grad_flat(w + e)
            if codes:
                mask = category_membership(g, gt, codes)
                if random_mask:
                    mask = random_like_mask(mask, mask_generator(seed, step))
                direction = masked_direction(g, gt, condition=condition, mask=mask)
            else:
                direction = gt
        else:
            direction = g
        if weight_decay:
            direction = direction + weight_decay * w
        buf = direction if (buf is None or not momentum) else momentum * buf + direction
        st.momentum_buffer = buf if momentum else None
        u = buf
        if project is not None:
            if st.projector is None or step % eigen_every == 0:
                whole = Objective(model, full[0], full[1], loss, bn_mode="train")
                st.projector, st.projector_eigenvalues = top_space(whole, k, eigen_tol, seed, st.projector,
                                                                   eigen_max_hvp)
                st.projector_step = step
            u = project_update(st.projector, buf, project)
        if bn:
            update_bn_stats(model, x.to(w.device, w.dtype))
        new = obj.space.unflatten(w - lr * u)
        with torch.no_grad():
            for n in names:
                params[n].copy_(new[n])
        st.step = step + 1
    return history


def project_update(V: Tensor, v: Tensor, kind: str) -> Tensor:
    """:func:`project` in ``V``'s dtype and device, returned in ``v``'s."""
    return project(V, v.to(V), kind).to(v)


def _metrics(obj: Objective, step: int, sam_phase: bool) -> dict[str, Any]:
    value, acc = obj.evaluate()
    out: dict[str, Any] = {"step": int(step), "loss": float(value), "phase": "sam" if sam_phase else "sgd"}
    if acc is not None:
        out["accuracy"] = float(acc)
    return out
