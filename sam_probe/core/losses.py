"""Loss objects: what one chunk contributes to the objective, and the loss's output-space curvature.

Every objective is a mean over *loss terms*, ``L = Σ_terms ℓ / #terms`` over the whole
selection; a chunk contributes ``(Σ ℓ, #terms)`` (:meth:`Loss.chunk_sum`, :meth:`Loss.term_count`).
Terms are (``docs/metrics.md``, "Losses"):

- :class:`CrossEntropy` (``ce``): one per labelled sample (``[B, C]`` logits, ``[B]`` labels), per
  labelled token (``[B, T, C]`` logits, ``[B, T]`` labels) or per labelled pixel (``[B, C, ...]``
  maps); labels ``-100`` are ignored;
- :class:`MeanSquaredError` / :class:`BinaryCrossEntropy` (``mse`` / ``bce``): one per sample, the
  mean over its output entries of ``(f - y)²`` / binary cross-entropy on logits;
- :class:`NextToken` (``lm``): next-token cross-entropy, one term per predicted token: logits
  ``[B, T, V]`` at position ``t`` against label ``t + 1``, labels ``-100`` ignored;
- :class:`ModelOwnLoss` (``model``): the model's own returned (mean) loss times its term count;
- :class:`UserLoss`: a function ``fn(outputs, targets[, batch])`` returning one loss per sample
  (``[B]``) or ``(per-term losses, mask)`` (terms where the mask is non-zero).

Weighting by term counts makes the mean over the selection exact whatever the chunk size.

Output space.  A loss sees its outputs as *terms*: :meth:`Loss.terms` views a tensor shaped like the
outputs (with leading dimensions) as ``[..., B, R, M]``: ``R`` term positions per sample, ``M``
entries each (``ce``: ``R`` tokens or pixels, ``M = C`` classes; per-sample losses: ``R = 1``), and
:meth:`Loss.term_mask` says which positions are terms.  On that view each loss gives its output
Hessian product ``H_ℓ U`` (:meth:`Loss.output_hessian_product`, closed form where one exists,
otherwise double backward of :meth:`Loss.chunk_sum`) and the output gradients ``q = ∂ℓ(f, ŷ)/∂f`` of
labels ``ŷ`` drawn from its predictive distribution (:meth:`Loss.sampled_output_gradients`), from
which the curvature operators are built.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .batches import batch_len
from .errors import CurvatureError, LossError, opt
from .registry import LOSS_REGISTRY

LOSSES = LOSS_REGISTRY.names
IGNORE = -100


def default_loss(targets: Tensor) -> str:
    """``ce`` for integer class labels, ``mse`` for floating targets."""
    return "ce" if not torch.is_floating_point(targets) else "mse"


def resolve(loss: "str | Loss | Callable[..., Any]", name: str | None = None, *, shift_labels: bool = False) -> "Loss":
    """The loss object of a registered name, a :class:`Loss` (as is) or a user function."""
    if isinstance(loss, Loss):
        return loss
    if callable(loss):
        return UserLoss(loss, name)
    cls = LOSS_REGISTRY.get(loss).load()
    return cls(shift_labels=shift_labels) if cls is ModelOwnLoss else cls()


class Loss:
    """``ℓ(f, y)`` summed over the terms of a chunk (module docstring)."""

    name = ""
    needs_targets = True  # the chunk sum needs targets
    from_outputs = True  # the chunk sum is a function of the model's outputs (not the model's own loss)
    closed_form = False  # H_ℓ in closed form
    noise: str | None = None  # what the Fisher's draws are made from: 'u' uniform, 'n' normal, None: no Fisher
    counted_by_evaluation = False  # the term count needs the loss itself (user functions)

    # ------------------------------------------------------------- values
    def chunk_sum(self, out: Tensor, y: Tensor | None, x: Any = None) -> Tensor:  # pragma: no cover - abstract
        """``Σ ℓ`` over the terms of one chunk, differentiable in ``out`` (safe under ``vmap``)."""
        raise NotImplementedError

    def term_count(self, y: Tensor | None, batch: int) -> int:
        """Loss terms of one chunk from its targets alone (no model)."""
        return batch

    def correct(self, out: Any, y: Tensor | None) -> tuple[Tensor, int] | None:
        """``(correct predictions, predictions)`` of one chunk, or ``None`` where accuracy is undefined."""
        return None

    def targets_from_inputs(self, x: Any) -> Tensor | None:
        """Targets of token-only data (``lm``: the ids); ``None`` otherwise."""
        return None

    def _need(self, y: Tensor | None) -> Tensor:
        if y is None:
            raise LossError(f"needs targets; the data has none (token-only data: {opt('loss', 'lm')})",
                            option="loss", value=self.name)
        return y

    # ------------------------------------------------------- output space
    def terms(self, t: Tensor, out: Tensor, y: Tensor | None) -> Tensor:
        """``t`` (shaped ``[..., *out.shape]``) viewed as ``[..., B, R, M]`` term blocks."""
        lead = t.shape[:t.dim() - out.dim()]
        return t.reshape(*lead, out.shape[0], 1, -1)

    def untermed(self, t: Tensor, out: Tensor, y: Tensor | None) -> Tensor:
        """The inverse of :meth:`terms`."""
        return t.reshape(*t.shape[:-3], *out.shape)

    def term_mask(self, out: Tensor, y: Tensor | None) -> Tensor | None:
        """``[B, R]`` 1 where a position is a loss term (``None``: all are)."""
        return None

    def n_term_positions(self, out: Tensor, y: Tensor | None) -> int:
        """``R`` of :meth:`terms`."""
        return 1

    def output_hessian_product(self, out: Tensor, y: Tensor | None, U: Tensor, x: Any = None) -> Tensor:
        """``H_ℓ U`` for ``U`` = ``[b, *out.shape]`` (closed form in subclasses; here double backward)."""
        return self.autograd_output_hessian_product(out, y, U, x)

    def autograd_output_hessian_product(self, out: Tensor, y: Tensor | None, U: Tensor, x: Any = None) -> Tensor:
        """``H_ℓ U`` by forward-over-reverse differentiation of :meth:`chunk_sum` in output space."""
        from torch.func import grad, jvp, vmap

        g = grad(lambda o: self.chunk_sum(o, y, x))
        return vmap(lambda u: jvp(g, (out,), (u,))[1])(U)

    def output_gradient(self, out: Tensor, y: Tensor | None, x: Any = None) -> Tensor:
        """``q = ∂(Σ ℓ)/∂f`` at the observed labels (the empirical Fisher's), shaped like ``out``."""
        from torch.func import grad

        return grad(lambda o: self.chunk_sum(o, y, x))(out.detach())

    def noise_width(self, out: Tensor, y: Tensor | None) -> int:
        """Random numbers per sample and draw for :meth:`sampled_output_gradients`."""
        return out[0].numel()

    def sampled_output_gradients(self, out: Tensor, y: Tensor | None, noise: Tensor) -> Tensor:
        """``q_s = ∂ℓ(f, ŷ_s)/∂f`` for labels drawn from the predictive distribution, ``[S, *out.shape]``;
        ``noise``: ``[B, S, noise_width]`` uniforms (``noise='u'``) or normals (``'n'``)."""
        raise CurvatureError(f"needs a predictive distribution; the loss {self.name!r} has none (ce, lm, mse, "
                             f"bce): use {opt('curvature', 'ggn')} or {opt('curvature', 'ef')}",
                             option="curvature", value="fisher")

    def fisher_scale(self) -> float:
        """``E[F̂] = fisher_scale · G`` (docs)."""
        return 1.0


# ------------------------------------------------------------- classifiers
def _categorical_q(p: Tensor, u: Tensor, mask: Tensor | None) -> Tensor:
    """``q = p − onehot(ŷ)`` with ``ŷ ~ p`` by inversion of uniforms: ``p`` ``[B, R, C]``, ``u`` ``[S, B, R]``
    -> ``[S, B, R, C]`` (zero outside ``mask``)."""
    C = p.shape[-1]
    cum = p.cumsum(-1)
    q = p.unsqueeze(0) if u.shape[0] == 1 else p.unsqueeze(0).repeat(u.shape[0], *([1] * p.dim()))  # p is ours
    for s in range(u.shape[0]):  # label = #{c: cum_c < u}: no [S, ..., C] index or one-hot tensors
        lab = (cum < u[s].unsqueeze(-1)).sum(-1, keepdim=True).clamp_max_(C - 1)
        q[s].scatter_add_(-1, lab, torch.full_like(lab, -1, dtype=p.dtype))
    return q if mask is None else q.mul_(mask.unsqueeze(-1))


def _softmax_hessian_product(p: Tensor, U: Tensor, mask: Tensor | None) -> Tensor:
    """``(diag p − p pᵀ) U`` per term: ``p`` ``[B, R, C]``, ``U`` ``[b, B, R, C]``, in O(|U|) extra memory."""
    r = U * p
    r.addcmul_(p, r.sum(-1, keepdim=True), value=-1)
    if mask is not None:
        r.mul_(mask.unsqueeze(-1))
    return r


class CrossEntropy(Loss):
    """Cross-entropy on logits over the class axis: ``[B, C]``, ``[B, T, C]`` (tokens) or ``[B, C, ...]``
    (dense maps); integer labels (``-100`` ignored) or class probabilities ``[B, C]``."""

    name = "ce"
    closed_form = True
    noise = "u"

    @staticmethod
    def tokens(out: Tensor, y: Tensor) -> bool:
        """``[B, T, C]`` logits with ``[B, T]`` labels: the class axis is the last."""
        return out.dim() == 3 and y.dim() == 2 and tuple(out.shape[:2]) == tuple(y.shape)

    def _labels(self, out: Tensor, y: Tensor | None) -> Tensor:
        return self._need(y)

    def chunk_sum(self, out: Tensor, y: Tensor | None, x: Any = None) -> Tensor:
        y = self._need(y)
        if y.is_floating_point():
            return F.cross_entropy(out, y.to(out.dtype), reduction="sum")
        y = y.long()
        if self.tokens(out, y):
            return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), ignore_index=IGNORE,
                                   reduction="sum")
        return F.cross_entropy(out, y, ignore_index=IGNORE, reduction="sum")

    def term_count(self, y: Tensor | None, batch: int) -> int:
        if y is None or y.is_floating_point():
            return batch
        return int((y != IGNORE).sum())

    def correct(self, out: Any, y: Tensor | None) -> tuple[Tensor, int] | None:
        if y is None or not isinstance(out, Tensor) or y.is_floating_point():
            return None
        y = self._labels(out, y)
        if out.dim() == y.dim() + 1 and out.shape[:-1] == y.shape:
            pred = out.argmax(-1)
        elif out.dim() == y.dim() + 1 and out.dim() >= 2 and out.shape[0] == y.shape[0] \
                and out.shape[2:] == y.shape[1:]:
            pred = out.argmax(1)
        else:
            return None
        valid = y != IGNORE
        return ((pred == y) & valid).sum(), int(valid.sum())

    # output space: the class axis last, term positions (tokens, pixels) in the middle
    def _class_last(self, out: Tensor, y: Tensor | None) -> bool:
        return out.dim() <= 2 or (y is not None and not y.is_floating_point() and self.tokens(out, y))

    def terms(self, t: Tensor, out: Tensor, y: Tensor | None) -> Tensor:
        k = t.dim() - out.dim()
        B, C = out.shape[0], (out.shape[-1] if self._class_last(out, y) else out.shape[1])
        if not self._class_last(out, y):
            t = t.movedim(k + 1, -1)
        return t.reshape(*t.shape[:k], B, -1, C)

    def untermed(self, t: Tensor, out: Tensor, y: Tensor | None) -> Tensor:
        k = t.dim() - 3
        if self._class_last(out, y):
            return t.reshape(*t.shape[:k], *out.shape)
        moved = (out.shape[0], *out.shape[2:], out.shape[1])
        return t.reshape(*t.shape[:k], *moved).movedim(-1, k + 1)

    def n_term_positions(self, out: Tensor, y: Tensor | None) -> int:
        C = out.shape[-1] if self._class_last(out, y) else out.shape[1]
        return out[0].numel() // C

    def term_mask(self, out: Tensor, y: Tensor | None) -> Tensor | None:
        y = self._labels(out, y)
        if y.is_floating_point():
            return y.sum(1).reshape(out.shape[0], -1).to(out.dtype)  # Σ_c y_c: H_ℓ of soft labels scales by it
        valid = (y != IGNORE).to(out.dtype).reshape(out.shape[0], -1)
        return None if bool(valid.all()) else valid

    def output_hessian_product(self, out: Tensor, y: Tensor | None, U: Tensor, x: Any = None) -> Tensor:
        p = self.terms(torch.softmax(out.detach(), dim=-1 if self._class_last(out, y) else 1), out, y)
        return self.untermed(_softmax_hessian_product(p, self.terms(U, out, y), self.term_mask(out, y)), out, y)

    def output_gradient(self, out: Tensor, y: Tensor | None, x: Any = None) -> Tensor:
        """``softmax(f) − onehot(y)`` per labelled term (0 at ignored labels), in one output-sized tensor."""
        labels = self._labels(out, y)
        if labels.is_floating_point():
            return super().output_gradient(out, y, x)
        p = self.terms(torch.softmax(out.detach(), dim=-1 if self._class_last(out, y) else 1), out, y)
        valid = (labels != IGNORE).reshape(p.shape[:-1]).unsqueeze(-1)
        lab = labels.reshape(p.shape[:-1]).unsqueeze(-1).long().clamp(0, p.shape[-1] - 1)
        p.scatter_add_(-1, lab, valid.to(p.dtype).neg())
        return self.untermed(p.mul_(valid), out, y)

    def noise_width(self, out: Tensor, y: Tensor | None) -> int:
        return self.n_term_positions(out, y)

    def sampled_output_gradients(self, out: Tensor, y: Tensor | None, noise: Tensor) -> Tensor:
        p = self.terms(torch.softmax(out.detach(), dim=-1 if self._class_last(out, y) else 1), out, y)
        mask = self.term_mask(out, y)
        if mask is not None:
            mask = mask.sqrt()  # soft labels scale H_ℓ by Σ_c y_c, so each q by its root; 0/1 masks unchanged
        q = _categorical_q(p, noise.permute(1, 0, 2), mask)
        return self.untermed(q, out, y)


class NextToken(CrossEntropy):
    """Next-token cross-entropy: logits ``[B, T, V]`` at ``t`` against labels ``[B, T]`` at ``t + 1``."""

    name = "lm"

    @staticmethod
    def check(out: Tensor, labels: Tensor) -> None:
        if out.dim() != 3 or labels.dim() != 2 or out.shape[:2] != labels.shape:
            raise LossError(f"needs logits [B, T, V] and token ids [B, T]; got outputs {list(out.shape)} and "
                            f"labels {list(labels.shape)}", option="loss", value="lm")

    @staticmethod
    def shifted(out: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """``(logits[:, :-1], labels[:, 1:])``: position t predicts token t + 1."""
        NextToken.check(out, labels)
        return out[:, :-1], labels[:, 1:]

    def _labels(self, out: Tensor, y: Tensor | None) -> Tensor:
        """Labels aligned with the logits: ``y[:, t + 1]`` at ``t``, ``-100`` at the last position."""
        y = self._need(y)
        self.check(out, y)
        return torch.cat([y[:, 1:], torch.full_like(y[:, :1], IGNORE)], 1)

    def chunk_sum(self, out: Tensor, y: Tensor | None, x: Any = None) -> Tensor:
        logits, labels = self.shifted(out, self._need(y))
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).long(),
                               ignore_index=IGNORE, reduction="sum")

    def term_count(self, y: Tensor | None, batch: int) -> int:
        return batch if y is None else int((y[:, 1:] != IGNORE).sum())

    def targets_from_inputs(self, x: Any) -> Tensor:
        ids = x.get("input_ids") if isinstance(x, Mapping) else x
        if not isinstance(ids, Tensor) or ids.is_floating_point():
            raise LossError("needs integer token ids (inputs, or an 'input_ids' field)", option="loss", value="lm")
        mask = x.get("attention_mask") if isinstance(x, Mapping) else None
        if isinstance(mask, Tensor):
            return torch.where(mask.bool(), ids, torch.full_like(ids, IGNORE))
        return ids

    def correct(self, out: Any, y: Tensor | None) -> tuple[Tensor, int] | None:
        try:
            return super().correct(out, y)
        except LossError:
            return None

    def _class_last(self, out: Tensor, y: Tensor | None) -> bool:
        return True


class MeanSquaredError(Loss):
    """Per sample, the mean over its ``C`` output entries of ``(f − y)²``."""

    name = "mse"
    closed_form = True
    noise = "n"

    def chunk_sum(self, out: Tensor, y: Tensor | None, x: Any = None) -> Tensor:
        t = self._need(y).to(out.dtype).reshape(out.shape)
        return (out - t).pow(2).reshape(out.shape[0], -1).mean(dim=1).sum()

    def output_hessian_product(self, out: Tensor, y: Tensor | None, U: Tensor, x: Any = None) -> Tensor:
        return U * (2.0 / out[0].numel())

    def sampled_output_gradients(self, out: Tensor, y: Tensor | None, noise: Tensor) -> Tensor:
        """``ŷ = f + sqrt(M/2) ε`` (ℓ is then the NLL up to a constant), so ``q = −sqrt(2/M) ε``."""
        M = out[0].numel()
        return -(2.0 / M) ** 0.5 * noise.permute(1, 0, 2).reshape(noise.shape[1], *out.shape)


class BinaryCrossEntropy(Loss):
    """Per sample, the mean over its ``C`` output entries of the binary cross-entropy on logits."""

    name = "bce"
    closed_form = True
    noise = "u"

    def chunk_sum(self, out: Tensor, y: Tensor | None, x: Any = None) -> Tensor:
        t = self._need(y).to(out.dtype).reshape(out.shape)
        per = F.binary_cross_entropy_with_logits(out, t, reduction="none")
        return per.reshape(out.shape[0], -1).mean(dim=1).sum()

    def correct(self, out: Any, y: Tensor | None) -> tuple[Tensor, int] | None:
        if y is None or not isinstance(out, Tensor):
            return None
        hit = (out.reshape(y.shape) > 0).long() == y.long()
        return hit.sum(), y.numel()

    def output_hessian_product(self, out: Tensor, y: Tensor | None, U: Tensor, x: Any = None) -> Tensor:
        s = torch.sigmoid(out.detach())
        return U * (s * (1 - s) / out[0].numel())

    def sampled_output_gradients(self, out: Tensor, y: Tensor | None, noise: Tensor) -> Tensor:
        s = torch.sigmoid(out.detach()).unsqueeze(0)
        z = noise.permute(1, 0, 2).reshape(noise.shape[1], *out.shape)
        return (s - (z < s).to(s.dtype)) / out[0].numel()

    def fisher_scale(self) -> float:
        return float("nan")  # 1 / C: depends on the outputs (docs)


# --------------------------------------------------------------- the model's
class ModelOwnLoss(Loss):
    """The loss the model returns itself (``labels`` passed in), times its term count: samples,
    labelled tokens, or predicted tokens for causal LMs (``shift_labels``)."""

    name = "model"
    from_outputs = False

    def __init__(self, shift_labels: bool = False):
        self.shift_labels = bool(shift_labels)

    def _shifts(self, y: Tensor | None) -> bool:
        return self.shift_labels and y is not None and y.dim() >= 2 and not y.is_floating_point()

    def chunk_sum(self, out: Tensor, y: Tensor | None, x: Any = None) -> Tensor:
        raise LossError(f"is computed inside the model, not from its outputs; choose {opt('loss')} ce, lm or a "
                        "function for this analysis", option="loss", value="model")

    def term_count(self, y: Tensor | None, batch: int) -> int:
        if y is None or y.is_floating_point():
            return batch
        if self._shifts(y):
            return int((y[:, 1:] != IGNORE).sum())
        return int((y != IGNORE).sum())

    def correct(self, out: Any, y: Tensor | None) -> tuple[Tensor, int] | None:
        if y is None or not isinstance(out, Tensor) or y.is_floating_point():
            return None
        if self.shift_labels:
            if out.dim() != 3 or y.dim() != 2 or out.shape[:2] != y.shape:
                return None
            return CrossEntropy().correct(out[:, :-1], y[:, 1:])
        return CrossEntropy().correct(out, y)



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


class UserLoss(Loss):
    """A user function ``fn(outputs, targets[, batch])`` returning ``[B]`` per-sample losses or
    ``(per-term losses, mask)``; its term count comes from what it returns."""

    needs_targets = False
    counted_by_evaluation = True

    def __init__(self, fn: Callable[..., Any], name: str | None = None):
        self.fn = fn
        self.name = str(name or getattr(fn, "__name__", "custom"))
        self.with_batch = takes_batch(fn)

    def sum_and_count(self, out: Tensor, y: Tensor | None, x: Any, n: int) -> tuple[Tensor, Tensor | int]:
        """``(Σ ℓ, #terms)`` of one chunk of ``n`` samples."""
        r = self.fn(out, y, x) if self.with_batch else self.fn(out, y)
        name = getattr(self.fn, "__name__", "the loss function")
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

    def chunk_sum(self, out: Tensor, y: Tensor | None, x: Any = None) -> Tensor:
        n = batch_len(x) if x is not None else int(out.shape[0])
        return self.sum_and_count(out, y, x, n)[0]
