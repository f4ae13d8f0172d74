"""How the model is called: modes, attention backend, keyword inputs, what its return holds.

- :func:`analysis_mode`: evaluation mode (dropout off), BatchNorm with running statistics
  (``eval``) or with batch statistics that are never written back (``train``); every flag is
  restored on exit.
- :func:`math_attention`: ``F.scaled_dot_product_attention`` through PyTorch's math backend, whose
  derivatives are themselves differentiable (fused kernels have no double backward).
- :class:`ModelCall`: ``f(x; w)`` through :func:`torch.func.functional_call` with an explicit
  parameter dict (the model's own weights, ``.grad`` and buffers are never touched); a dict batch
  is passed as keyword arguments, keys the ``forward`` does not take are dropped (and recorded).
- :func:`unwrap_logits` / :func:`unwrap_loss`: the prediction tensor / the model's own scalar loss of
  a return value that may be a tensor, a tuple, a dict or a ``ModelOutput``.
- :func:`split_labels`: a dict batch's ``labels`` (or ``label``) are its targets, passed to the
  model only when it computes its own loss.
"""
from __future__ import annotations

import contextlib
import inspect
import re
from collections.abc import Iterator, Mapping
from typing import Any

from torch import Tensor, nn
from torch.func import functional_call

from .errors import LossError, opt

BN_MODES = ("eval", "train")
LABEL_KEYS = ("labels", "label")
_CAUSAL_LM = re.compile(r"(CausalLM|LMHeadModel)$")

Params = dict[str, Tensor]


def is_batchnorm(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.batchnorm._BatchNorm)


@contextlib.contextmanager
def analysis_mode(model: nn.Module, bn_mode: str) -> Iterator[None]:
    """Put ``model`` in evaluation mode (dropout off); with ``bn_mode='train'``
    BatchNorm layers use batch statistics *without* updating running stats.

    Every module's ``training`` flag and BN's ``track_running_stats`` are
    restored on exit.
    """
    if bn_mode not in BN_MODES:
        raise ValueError(f"bn_mode must be one of {BN_MODES}, got {bn_mode!r}")
    saved = [(m, m.training, getattr(m, "track_running_stats", None)) for m in model.modules()]
    try:
        model.eval()
        if bn_mode == "train":
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.train()
                    # running stats are then neither used nor updated
                    m.track_running_stats = False
        yield
    finally:
        for m, training, track in saved:
            m.training = training
            if track is not None:
                m.track_running_stats = track


@contextlib.contextmanager
def math_attention() -> Iterator[None]:
    """``F.scaled_dot_product_attention`` through the math backend (twice differentiable)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - torch < 2.3
        yield
        return
    with sdpa_kernel([SDPBackend.MATH]):
        yield


def has_attention(model: nn.Module) -> bool:
    """Whether ``model`` has attention layers (a class named ``*Attention*`` or ``nn.MultiheadAttention``)."""
    return any(isinstance(m, nn.MultiheadAttention) or "Attention" in type(m).__name__ for m in model.modules())


def is_causal_lm(model: nn.Module) -> bool:
    """A causal language model, whose own loss shifts its labels (``*ForCausalLM``, ``*LMHeadModel``)."""
    return bool(_CAUSAL_LM.search(type(model).__name__))


def unwrap_logits(out: Any) -> Tensor:
    """The prediction tensor of a model's return: a tensor, ``logits`` of a dict / ``ModelOutput``,
    or the first element of a tuple (the second when the first is a scalar loss)."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, Mapping) or hasattr(out, "logits"):
        if isinstance(out, Mapping) and "logits" in out:
            return out["logits"]
        if not isinstance(out, Mapping) and getattr(out, "logits", None) is not None:
            return out.logits
        if isinstance(out, Mapping):
            for k, v in out.items():
                if k != "loss" and isinstance(v, Tensor):
                    return v
    if isinstance(out, (tuple, list)) and out:
        first = out[0]
        if isinstance(first, Tensor) and first.dim() == 0 and len(out) > 1:
            return unwrap_logits(out[1])
        return unwrap_logits(first)
    raise LossError(f"the model returned {type(out).__name__}; return a tensor, a tuple or a dict with 'logits'")


def unwrap_loss(out: Any) -> Tensor:
    """The scalar loss a model computed itself (``loss`` of a dict / ``ModelOutput``, or a tuple's first)."""
    loss = None
    if isinstance(out, Mapping):
        loss = out.get("loss")
    elif hasattr(out, "loss"):
        loss = out.loss
    elif isinstance(out, (tuple, list)) and out:
        loss = out[0]
    elif isinstance(out, Tensor):
        loss = out
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise LossError(f"the model returned no scalar loss; put labels in the batch (a 'labels' field or "
                        f"targets) or choose {opt('loss')} ce/lm/...", option="loss", value="model")
    return loss.reshape(())


def split_labels(x: Any, y: Tensor | None, pass_labels: bool) -> tuple[Any, Tensor | None]:
    """A dict batch's ``labels``/``label`` as the targets (when ``y`` is ``None``); they stay in
    the batch (renamed ``labels``) only when ``pass_labels`` (the model computes its own loss)."""
    if not isinstance(x, Mapping):
        return x, y
    key = next((k for k in LABEL_KEYS if k in x), None)
    if key is None:
        return x, y
    if y is None:
        y = x[key]
    if not pass_labels:
        x = {k: v for k, v in x.items() if k != key}
    elif key != "labels":
        x = {("labels" if k == key else k): v for k, v in x.items()}
    return x, y


class ModelCall:
    """``f(x; w)`` of ``model`` with explicit parameters and buffers (module docstring)."""

    def __init__(self, model: nn.Module, buffers: Params):
        self.model = model
        self.buffers = buffers
        self._accepted: set[str] | None = None
        self._inspected = False
        self.dropped_keys: set[str] = set()

    def _kwargs(self, x: Mapping[str, Tensor]) -> dict[str, Tensor]:
        if not self._inspected:
            self._inspected = True
            try:
                ps = inspect.signature(self.model.forward).parameters.values()
                self._accepted = None if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in ps) \
                    else {p.name for p in ps}
            except (TypeError, ValueError):
                self._accepted = None
        if self._accepted is None:
            return dict(x)
        kept = {k: v for k, v in x.items() if k in self._accepted}
        self.dropped_keys.update(k for k in x if k not in self._accepted)
        return kept

    def __call__(self, params: Params, x: Any, labels: Tensor | None = None) -> Any:
        """The model's raw return for inputs ``x`` (``labels`` passed for its own loss)."""
        if isinstance(x, Mapping):
            return functional_call(self.model, (params, self.buffers), (), self._kwargs(x), strict=False)
        kwargs = None
        if labels is not None:
            kwargs = self._kwargs({"labels": labels})
            if not kwargs:
                raise LossError(f"the model's forward takes no labels, so it computes no loss; choose "
                                f"{opt('loss')} ce, lm or a function", option="loss", value="model")
        return functional_call(self.model, (params, self.buffers), (x,), kwargs, strict=False)
