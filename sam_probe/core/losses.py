"""Loss terms of one chunk: their sum and how many there are.

Every objective is a mean over *loss terms*, ``L = Σ_terms ℓ / #terms`` over the
whole selection; a chunk contributes ``(Σ ℓ, #terms)``.  Terms are

- ``ce``: one per labelled sample (``[B, C]`` logits, ``[B]`` labels), or one per
  labelled token (``[B, T, C]`` logits, ``[B, T]`` labels; ``[B, C, ...]`` dense
  maps); labels ``-100`` are ignored;
- ``mse`` / ``bce``: one per sample, the mean over its output entries of
  ``(f - y)²`` / binary cross-entropy on logits;
- ``lm``: next-token cross-entropy, one term per predicted token: logits
  ``[B, T, V]`` at position ``t`` against label ``t + 1`` (shift by one), labels
  ``-100`` ignored;
- ``model``: the model's own returned (mean) loss times its term count
  (:func:`term_count`): samples, labelled tokens, or predicted tokens for causal LMs;
- a user function ``fn(outputs, targets[, batch])`` returning one loss per sample
  (``[B]``) or ``(per-term losses, mask)`` (terms where the mask is non-zero).

Weighting by term counts makes the mean over the selection exact whatever the
chunk size (tokens of long sequences count more, as in training).
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import SpecError

LOSSES = ("ce", "mse", "bce", "lm", "model")
IGNORE = -100


class LossError(SpecError, ValueError):
    """A loss cannot be computed from what the model returned (one-line reason)."""


def default_loss(targets: Tensor) -> str:
    """``ce`` for integer class labels, ``mse`` for floating targets."""
    return "ce" if not torch.is_floating_point(targets) else "mse"


def _ce(output: Tensor, targets: Tensor) -> Tensor:
    y = targets.long()
    if output.dim() == 3 and y.dim() == 2 and output.shape[:2] == y.shape:  # [B, T, C] tokens
        return F.cross_entropy(output.reshape(-1, output.shape[-1]), y.reshape(-1), ignore_index=IGNORE,
                               reduction="sum")
    return F.cross_entropy(output, y, ignore_index=IGNORE, reduction="sum")


def shifted(output: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """``(logits[:, :-1], labels[:, 1:])``: position t predicts token t + 1."""
    if output.dim() != 3 or labels.dim() != 2 or output.shape[:2] != labels.shape:
        raise LossError(f"--loss lm needs logits [B, T, V] and token ids [B, T]; got outputs {list(output.shape)} "
                        f"and labels {list(labels.shape)}")
    return output[:, :-1], labels[:, 1:]


def per_sample_loss_sum(loss: str, output: Tensor, targets: Tensor) -> Tensor:
    """``Σ ℓ`` over the terms of one chunk for a built-in loss (see module docstring)."""
    if loss == "ce":
        return _ce(output, targets)
    if loss == "mse":
        t = targets.to(output.dtype).reshape(output.shape)
        return (output - t).pow(2).reshape(output.shape[0], -1).mean(dim=1).sum()
    if loss == "bce":
        t = targets.to(output.dtype).reshape(output.shape)
        per = F.binary_cross_entropy_with_logits(output, t, reduction="none")
        return per.reshape(output.shape[0], -1).mean(dim=1).sum()
    if loss == "lm":
        logits, labels = shifted(output, targets)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).long(),
                               ignore_index=IGNORE, reduction="sum")
    raise ValueError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")


def term_count(loss: str, targets: Tensor | None, batch: int, shift: bool = False) -> int:
    """Loss terms of one chunk from its targets alone (no model): see module docstring.

    ``shift``: ``model`` loss of a causal LM (its labels are shifted inside the model)."""
    if targets is None or loss in ("mse", "bce"):
        return batch
    if loss == "lm" or (loss == "model" and shift and targets.dim() >= 2 and not targets.is_floating_point()):
        return int((targets[:, 1:] != IGNORE).sum())
    if targets.is_floating_point():
        return batch
    return int((targets != IGNORE).sum())


def correct(loss: str, output: Tensor, targets: Tensor | None, shift: bool = False) -> tuple[Tensor, int] | None:
    """``(correct predictions, predictions)`` of one chunk, or ``None`` where accuracy is not defined."""
    if targets is None or not isinstance(output, Tensor):
        return None
    if loss == "bce":
        hit = (output.reshape(targets.shape) > 0).long() == targets.long()
        return hit.sum(), targets.numel()
    if loss not in ("ce", "lm", "model") or targets.is_floating_point():
        return None
    if loss == "lm" or (loss == "model" and shift):
        try:
            output, targets = shifted(output, targets)
        except LossError:
            return None
    if output.dim() == targets.dim() + 1 and output.shape[:-1] == targets.shape:
        pred = output.argmax(-1)
    elif output.dim() == targets.dim() + 1 and output.dim() >= 2 and output.shape[0] == targets.shape[0] \
            and output.shape[2:] == targets.shape[1:]:
        pred = output.argmax(1)
    else:
        return None
    valid = targets != IGNORE
    return ((pred == targets) & valid).sum(), int(valid.sum())


# ------------------------------------------------------------------ user fns
def takes_batch(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` accepts a third argument (the batch) besides outputs and targets."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        return True
    return len([p for p in params if p.kind in (inspect.Parameter.POSITIONAL_ONLY,
                                                inspect.Parameter.POSITIONAL_OR_KEYWORD)]) >= 3


def user_terms(fn: Callable[..., Any], output: Tensor, targets: Tensor | None, batch: Any, n: int,
               with_batch: bool) -> tuple[Tensor, Tensor | int]:
    """``(Σ ℓ, #terms)`` from a user loss: ``[B]`` per-sample losses or ``(losses, mask)``."""
    r = fn(output, targets, batch) if with_batch else fn(output, targets)
    name = getattr(fn, "__name__", "the loss function")
    if isinstance(r, Mapping) and "loss" in r:
        r = (r["loss"], r["mask"]) if "mask" in r else r["loss"]
    if isinstance(r, (tuple, list)) and len(r) == 2 and all(isinstance(t, Tensor) for t in r):
        values, mask = r
        if values.shape != mask.shape:
            raise LossError(f"{name} returned losses {list(values.shape)} and a mask {list(mask.shape)}; "
                            "give them one shape")
        m = mask.to(values.dtype)
        return (values * m).sum(), m.sum()
    if not isinstance(r, Tensor):
        raise LossError(f"{name} returned {type(r).__name__}; return one loss per sample (a [B] tensor) "
                        "or (per-token losses, mask)")
    if r.dim() == 2 and r.shape[1] == 1:
        r = r[:, 0]
    if r.dim() != 1 or r.shape[0] != n:
        raise LossError(f"{name} returned shape {list(r.shape)} for a batch of {n}; return one loss per sample "
                        f"([{n}]), not a mean, or (per-token losses, mask)")
    return r.sum(), n
