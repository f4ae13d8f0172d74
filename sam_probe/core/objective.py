"""The training objective of a checkpoint as a pure function of its parameters.

``L(w) = Σ_terms ℓ(f(x; w), y) / #terms`` over the whole data selection: terms
are samples for ``ce``/``mse``/``bce`` and per-sample user losses, labelled or
predicted tokens for token-level losses (``lm``, token ``ce``, a causal LM's own
loss; :mod:`sam_probe.core.losses`).  It is evaluated exactly in chunks of
``chunk_size`` samples: each chunk contributes its *sum* of loss terms and the
total is divided by the term count of the whole selection (:attr:`denominator`),
so losses, gradients and Hessian-vector products do not depend on the chunk size.
The one exception is BatchNorm in ``train`` mode, whose batch statistics are
those of each chunk.

Data (:mod:`sam_probe.core.batches`): ``x`` a tensor or a dict of tensors passed
as keyword arguments (``input_ids``, ``attention_mask``, ...; keys the model's
``forward`` does not take are dropped), ``y`` a tensor or ``None``; a dict's
``labels`` (or ``label``) are the targets, and are passed to the model only for
``loss='model'``.  Floating tensors follow ``dtype``; integer and bool tensors
keep theirs.  Outputs may be tensors, tuples (first element) or dicts /
``ModelOutput`` (``logits``; ``loss`` for ``loss='model'``).  Streamed sources
(datasets, iterables) are read chunk by chunk on every pass.

The model is only ever called through :func:`torch.func.functional_call` with an
explicit parameter dict: the caller's weights, ``.grad`` and BatchNorm running
statistics are never touched.  Every pass runs attention through PyTorch's math
scaled-dot-product backend, the one whose derivatives are themselves
differentiable (fused kernels have no double backward).

Data parallel (``shard=True``, the default while :mod:`sam_probe.distributed` is
active): every rank holds the whole selection but sums only over its contiguous
shard ``[lo, hi)`` (:func:`~sam_probe.distributed.shard_range`); loss, correct
counts, term counts, gradients and HVPs are all-reduced (summed over ranks)
*before* the division, so every rank gets the same numbers as one process (up
to the order of floating-point additions).  Subsets (minibatches, m-sharpness
sub-batches) are taken in global indices and sharded again.
"""
from __future__ import annotations

import contextlib
import inspect
import re
from collections.abc import Iterator, Mapping
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vmap

from .. import distributed
from ..errors import SpecError
from . import losses as _losses
from .batches import Batches, TensorBatches, batch_len, cast
from .losses import LOSSES, LossError, default_loss, per_sample_loss_sum  # noqa: F401  (re-exported)
from .params import ParamSpace

BN_MODES = ("eval", "train")
from .names import HVP_METHODS  # noqa: E402 - re-exported
LABEL_KEYS = ("labels", "label")
_CAUSAL_LM = re.compile(r"(CausalLM|LMHeadModel)$")

Params = dict[str, Tensor]


class DoubleBackwardError(SpecError):
    """An operation of the model has no second derivative (or no forward-mode one) in PyTorch."""


def correct_count(loss: str, output: Tensor, targets: Tensor) -> Tensor | None:
    """Number of correct predictions in a chunk, or ``None`` where accuracy is undefined."""
    c = _losses.correct(loss, output, targets)
    return None if c is None else c[0]


def _is_batchnorm(m: nn.Module) -> bool:
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
                if _is_batchnorm(m):
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
        raise LossError("--loss model: the model returned no scalar loss; put labels in the batch "
                        "(a 'labels' field or targets) or choose --loss ce/lm/...")
    return loss.reshape(())


_NO_SECOND = (re.compile(r"derivative for (?:aten::)?'?([\w.:]+?)'? is not implemented"),
              re.compile(r"forward AD with (?:aten::)?([\w.:]+) that does not support it"))


def _graph_ops(t: Tensor | None, limit: int = 20000, once_only: bool = False) -> list[str]:
    """Names of custom autograd Functions in ``t``'s graph (candidates for a missing double backward);
    ``once_only``: only those whose backward is ``@once_differentiable``."""
    seen, out, stack = set(), [], [t.grad_fn] if t is not None and t.grad_fn is not None else []
    while stack and len(seen) < limit:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if isinstance(fn, torch.autograd.function.BackwardCFunction):
            fwd = getattr(fn, "_forward_cls", None)
            if once_only and getattr(getattr(fwd, "backward", None), "__wrapped__", None) is None:
                stack.extend(f for f, _ in fn.next_functions)
                continue
            name = type(fn).__name__.removesuffix("Backward")
            if name not in out:
                out.append(name)
        stack.extend(f for f, _ in fn.next_functions)
    return out


def _second_order_error(exc: BaseException, method: str, graph_of: Tensor | None = None) -> Exception | None:
    """A :class:`DoubleBackwardError` naming the op when ``exc`` says a derivative is missing."""
    msg = str(exc)
    op = None
    for rx in _NO_SECOND:
        m = rx.search(msg)
        if m:
            op = m.group(1).removesuffix("_backward")
            break
    if "once_differentiable" in msg:
        ops = _graph_ops(graph_of, once_only=True) or _graph_ops(graph_of)
        what = f"custom autograd function {', '.join(ops)}" if ops else "a custom autograd function"
        return DoubleBackwardError(f"Hessian-vector products need the second derivative of {what}, whose backward "
                                   "is @once_differentiable (neither --hvp method can differentiate it); remove "
                                   "that decorator so its backward is differentiable")
    if op is None and "double backward" not in msg.lower():
        return None
    if method == "rev-rev":
        return DoubleBackwardError(f"Hessian-vector products need the second derivative of {op or 'an operation'}, "
                                   "which PyTorch does not implement; rerun with --hvp fwd-rev (forward-over-reverse)")
    return DoubleBackwardError(f"--hvp fwd-rev needs the forward-mode derivative of {op or 'an operation'}, which "
                               "PyTorch does not implement; use the default --hvp rev-rev")


class Objective:
    """Mean loss of ``model`` over a data selection as a function of a parameter dict.

    ``inputs``: a tensor or dict of tensors (with ``targets``: a tensor or ``None``),
    or a :class:`~sam_probe.core.batches.Batches` source (``targets=None``).
    ``loss``: one of :data:`LOSSES` or a callable ``fn(outputs, targets[, batch])``
    (see :mod:`sam_probe.core.losses`); ``loss_name`` labels a callable.
    ``shift_labels``: whether ``loss='model'`` shifts labels inside the model (causal
    LMs; default from the class name).

    Parameters are copied (``detach().clone()``) at construction into
    :attr:`params`; ``space`` maps them to flat vectors of ``P`` entries.
    Counters :attr:`n_grad` and :attr:`n_hvp` record the passes made.
    ``vector_block`` caps how many vectors one HVP pass handles (larger blocks are
    split; memory only).  ``shard`` (default: whether :mod:`sam_probe.distributed`
    is active) sums over this rank's shard and all-reduces (see module docstring).
    """

    def __init__(
        self,
        model: nn.Module,
        inputs: Any,
        targets: Tensor | None = None,
        loss: str | Callable[..., Any] | None = None,
        *,
        params: Mapping[str, Tensor] | None = None,
        buffers: Mapping[str, Tensor] | None = None,
        bn_mode: str = "eval",
        chunk_size: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        hvp_method: str = "rev-rev",
        vector_block: int | None = None,
        shard: bool | None = None,
        loss_name: str | None = None,
        shift_labels: bool | None = None,
        _denominator: float | None = None,
    ):
        if bn_mode not in BN_MODES:
            raise ValueError(f"bn_mode must be one of {BN_MODES}, got {bn_mode!r}")
        if hvp_method not in HVP_METHODS:
            raise ValueError(f"hvp_method must be one of {HVP_METHODS}, got {hvp_method!r}")
        self.model = model
        self.bn_mode = bn_mode
        self.hvp_method = hvp_method
        src_params = dict(model.named_parameters()) if params is None else dict(params)
        src_buffers = dict(model.named_buffers()) if buffers is None else dict(buffers)
        if device is None:
            device = next(iter(src_params.values())).device if src_params else torch.device("cpu")
        self.device = torch.device(device)
        if dtype is None:
            dtype = next(iter(src_params.values())).dtype if src_params else torch.float32
        self.dtype = dtype

        def _cast(t: Tensor) -> Tensor:
            t = t.detach()
            t = t.to(device=self.device, dtype=dtype) if t.is_floating_point() else t.to(self.device)
            return t.clone()

        self.params: Params = {k: _cast(v) for k, v in src_params.items()}
        self.buffers: Params = {k: _cast(v) for k, v in src_buffers.items()}
        self.space = ParamSpace(self.params)
        if isinstance(inputs, Batches):
            if targets is not None:
                raise ValueError("pass targets inside the Batches source")
            data = inputs
        else:
            if isinstance(inputs, Tensor):
                inputs = inputs.detach()
            if targets is not None and batch_len(inputs) != len(targets):
                raise ValueError(f"{batch_len(inputs)} inputs but {len(targets)} targets")
            data = TensorBatches(inputs, None if targets is None else targets.detach())
        if isinstance(data, TensorBatches):
            data = data.cast(self.device, dtype)  # once, in memory
        self.data = data
        self.n_samples = data.n
        if self.n_samples == 0:
            raise ValueError("the data selection is empty")
        self.loss_fn: Callable[..., Any] | None = None
        if callable(loss):
            self.loss_fn = loss
            self.loss_name = loss_name or getattr(loss, "__name__", "custom")
            self._fn_batch = _losses.takes_batch(loss)
        else:
            self.loss_name = loss or self._default_loss()
            if self.loss_name not in LOSSES:
                raise ValueError(f"unknown loss {self.loss_name!r}; choose one of {', '.join(LOSSES)}")
        self.shift_labels = is_causal_lm(model) if shift_labels is None else bool(shift_labels)
        self.chunk_size = int(chunk_size) if chunk_size else self.n_samples
        if self.chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        self.vector_block = int(vector_block) if vector_block else None
        self.sharded = distributed.active() if shard is None else bool(shard)
        self.world = distributed.world_size() if self.sharded else 1
        self.rank = distributed.rank() if self.sharded else 0
        self.lo, self.hi = distributed.shard_range(self.n_samples, self.world, self.rank,
                                                   int(chunk_size) if chunk_size else None)
        self._denom = _denominator
        self._accepted: set[str] | None | bool = False  # not yet inspected
        self.dropped_keys: set[str] = set()
        self.n_grad = 0
        self.n_hvp = 0

    # ------------------------------------------------------------------ basics
    @property
    def n_params(self) -> int:
        return self.space.size

    def flat_params(self) -> Tensor:
        """The parameters ``w`` as one flat vector (a copy)."""
        return self.space.flatten(self.params)

    @property
    def inputs(self) -> Any:
        """The in-memory inputs (tensor or dict); streamed data has none."""
        return self._in_memory().x

    @property
    def targets(self) -> Tensor | None:
        """The in-memory targets (``None`` when they are the dict's labels or absent)."""
        return self._in_memory().y

    def _in_memory(self) -> TensorBatches:
        if not isinstance(self.data, TensorBatches):
            raise SpecError("this analysis needs the data in memory as tensors; streamed datasets are only read "
                            "chunk by chunk (load a .pt/.npz file or return tensors from the factory)")
        return self.data

    @property
    def is_custom_loss(self) -> bool:
        return self.loss_fn is not None

    @property
    def denominator(self) -> float:
        """What chunk loss sums are divided by: the number of loss terms of the whole
        selection (samples; labelled / predicted tokens for token-level losses), summed
        over ranks.  Counted once from the targets (a forward pass for user losses)."""
        if self._denom is None:
            if self.loss_name in ("mse", "bce") and not self.is_custom_loss:
                self._denom = float(self.n_samples)
            elif self.is_custom_loss:
                self.evaluate()  # sets _denom
            elif isinstance(self.data, TensorBatches):  # every rank holds the whole selection: count it all
                n = 0
                for s in range(0, self.n_samples, self.chunk_size):
                    x, y = self._prepare(*next(self.data.slices(s, min(s + self.chunk_size, self.n_samples),
                                                                self.chunk_size)))
                    n += _losses.term_count(self.loss_name, y, batch_len(x), self.shift_labels)
                self._denom = float(n)
            else:  # streamed: each rank counts its shard
                n = torch.zeros(1, dtype=torch.float64, device=self.device)
                for x, y in self.chunks():
                    n += _losses.term_count(self.loss_name, y, batch_len(x), self.shift_labels)
                self._denom = float(self._reduce(n).item())
            if not self._denom > 0:
                raise SpecError(f"--loss {self.loss_name}: the selection has no loss terms (every label is -100?)")
        return self._denom

    @property
    def n_local(self) -> int:
        """Samples in this rank's shard (``n_samples`` in one process)."""
        return self.hi - self.lo

    def _default_loss(self) -> str:
        x, y = self._prepare(*self.data.first(1), loss="ce")
        if y is not None:
            return default_loss(y)
        return "lm"

    def _prepare(self, x: Any, y: Tensor | None, loss: str | None = None) -> tuple[Any, Tensor | None]:
        """Device/dtype, the labels of a dict batch as targets, and ``lm`` targets from the token ids."""
        loss = loss or self.loss_name
        x = cast(x, self.device, self.dtype)
        y = None if y is None else cast(y, self.device, self.dtype)
        if isinstance(x, Mapping):
            key = next((k for k in LABEL_KEYS if k in x), None)
            if key is not None:
                if y is None:
                    y = x[key]
                if loss != "model":
                    x = {k: v for k, v in x.items() if k != key}
                elif key != "labels":
                    x = {("labels" if k == key else k): v for k, v in x.items()}
        if loss == "lm" and y is None:
            ids = x.get("input_ids") if isinstance(x, Mapping) else x
            if not isinstance(ids, Tensor) or ids.is_floating_point():
                raise LossError("--loss lm needs integer token ids (inputs, or an 'input_ids' field)")
            y = ids
            mask = x.get("attention_mask") if isinstance(x, Mapping) else None
            if isinstance(mask, Tensor):
                y = torch.where(mask.bool(), ids, torch.full_like(ids, _losses.IGNORE))
        return x, y

    def chunks(self) -> Iterator[tuple[Any, Tensor | None]]:
        """This rank's shard in chunks of ``chunk_size`` (the whole selection in one process)."""
        for x, y in self.data.slices(self.lo, self.hi, self.chunk_size):
            yield self._prepare(x, y)

    def _reduce(self, t: Tensor) -> Tensor:
        """Sum ``t`` over ranks in place when sharded (identity otherwise)."""
        if self.sharded and self.world > 1:
            distributed.all_reduce_sum(t)
        return t

    def _same(self, **kw) -> dict:
        base = dict(params=self.params, buffers=self.buffers, bn_mode=self.bn_mode, chunk_size=self.chunk_size,
                    dtype=self.dtype, device=self.device, hvp_method=self.hvp_method,
                    vector_block=self.vector_block, shard=self.sharded, loss_name=self.loss_name,
                    shift_labels=self.shift_labels)
        base.update(kw)
        return base

    @property
    def _loss_arg(self) -> str | Callable[..., Any]:
        return self.loss_fn if self.loss_fn is not None else self.loss_name

    def subset(self, index: Tensor, shard: bool | None = None) -> "Objective":
        """The same objective on the samples ``index`` (e.g. a seeded minibatch)."""
        kw = self._same() if shard is None else self._same(shard=shard)
        chunk = kw["chunk_size"]
        kw["chunk_size"] = chunk if chunk < self.n_samples else None
        return Objective(self.model, self.data.take(torch.as_tensor(index)), None, self._loss_arg, **kw)

    def with_params(self, params: Mapping[str, Tensor] | Tensor, buffers: Mapping[str, Tensor] | None = None
                    ) -> "Objective":
        """The same data and model at other parameters (dict or flat vector), and optionally buffers."""
        if isinstance(params, Tensor):
            params = self.space.unflatten(params)
        kw = self._same(params=params, _denominator=self._shared_denominator())
        if buffers is not None:
            kw["buffers"] = buffers
        return Objective(self.model, self.data, None, self._loss_arg, **kw)

    def rechunked(self, chunk_size: int | None, vector_block: int | None = None) -> "Objective":
        """The same objective evaluated in other chunk and vector-block sizes (memory only)."""
        kw = self._same(chunk_size=chunk_size, vector_block=vector_block, _denominator=self._shared_denominator())
        return Objective(self.model, self.data, None, self._loss_arg, **kw)

    def _shared_denominator(self) -> float | None:
        """The term count for an objective on the same data (user losses count their own terms)."""
        return None if self.is_custom_loss else self._denom

    def _as_dict(self, params: Mapping[str, Tensor] | Tensor | None) -> Params:
        if params is None:
            return self.params
        if isinstance(params, Tensor):
            return self.space.unflatten(params)
        return dict(params)

    # ------------------------------------------------------------- the model
    def _kwargs(self, x: Mapping[str, Tensor]) -> dict[str, Tensor]:
        if self._accepted is False:
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

    def _call(self, params: Params, x: Any, labels: Tensor | None = None) -> Any:
        if isinstance(x, Mapping):
            return functional_call(self.model, (params, self.buffers), (), self._kwargs(x), strict=False)
        kwargs = None
        if labels is not None:
            kwargs = self._kwargs({"labels": labels})
            if not kwargs:
                raise LossError("--loss model: the model's forward takes no labels, so it computes no loss; "
                                "choose --loss ce, lm or a function")
        return functional_call(self.model, (params, self.buffers), (x,), kwargs, strict=False)

    @property
    def notes(self) -> list[str]:
        """One-line facts about how the model is run (for the user, not warnings)."""
        out = []
        if has_attention(self.model):
            out.append("attention runs through PyTorch's math scaled-dot-product backend (fused kernels have no "
                       "double backward, which Hessian-vector products need)")
        if self.dropped_keys:
            out.append(f"batch fields the model's forward does not take are not passed: "
                       f"{', '.join(sorted(self.dropped_keys))}")
        return out

    def check_inputs(self, n: int = 2) -> None:
        """One forward pass (and loss) on the first ``n`` samples: raises if the model does not take the data."""
        x, y = self._prepare(*self.data.first(n))
        with self.mode(), torch.no_grad():
            self._terms(self.params, x, y)

    # ------------------------------------------------------------- hooks
    # A chunk is what :meth:`chunks` yields, ``(x, y)``; curvature operators and
    # other analyses go through these three hooks only, never through the model.
    def outputs(self, params: Params, x: Any) -> Tensor:
        """Model outputs ``f(x; w)`` of one chunk's inputs (the logits), differentiable in ``params``.

        Call inside :meth:`mode` (the methods of this class do)."""
        return unwrap_logits(self._call(params, x))

    def loss_sum_from_outputs(self, out: Tensor, y: Tensor | None, x: Any = None) -> Tensor:
        """``Σ ℓ`` over one chunk's loss terms from its outputs (differentiable in ``out``).

        ``x`` (the chunk's inputs) is only needed by user loss functions; without it the batch
        length is the outputs' leading dimension.  No term count is taken here, so this is safe
        under ``vmap`` (the curvature operators call it per sample)."""
        if self.loss_fn is None and self.loss_name != "model":
            if y is None:
                raise LossError(f"--loss {self.loss_name} needs targets; the data has none "
                                "(token-only data: --loss lm)")
            return per_sample_loss_sum(self.loss_name, out, y)
        return self._terms_from_outputs(out, y, x)[0]

    def mode(self) -> contextlib.AbstractContextManager:
        """The evaluation context every forward pass of this objective runs in (eval mode, BN mode,
        math attention)."""
        stack = contextlib.ExitStack()
        stack.enter_context(analysis_mode(self.model, self.bn_mode))
        stack.enter_context(math_attention())
        return stack

    def _terms_from_outputs(self, out: Tensor, y: Tensor | None, x: Any) -> tuple[Tensor, Any]:
        if self.loss_fn is not None:
            n = batch_len(x) if x is not None else int(out.shape[0])
            return _losses.user_terms(self.loss_fn, out, y, x, n, self._fn_batch)
        if self.loss_name == "model":
            raise LossError("--loss model is computed inside the model, not from its outputs; "
                            "choose --loss ce, lm or a function for this analysis")
        if y is None:
            raise LossError(f"--loss {self.loss_name} needs targets; the data has none (token-only data: --loss lm)")
        return (per_sample_loss_sum(self.loss_name, out, y),
                _losses.term_count(self.loss_name, y, batch_len(x), self.shift_labels))

    def _terms(self, params: Params, x: Any, y: Tensor | None) -> tuple[Tensor, Any, Tensor]:
        """``(Σ ℓ, #terms, logits)`` of one chunk."""
        if self.loss_name == "model" and self.loss_fn is None:
            raw = self._call(params, x, labels=y if not isinstance(x, Mapping) else None)
            count = _losses.term_count("model", y, batch_len(x), self.shift_labels)
            try:
                logits = unwrap_logits(raw)
            except LossError:
                logits = None
            return unwrap_loss(raw) * count, count, logits
        out = self.outputs(params, x)
        s, c = self._terms_from_outputs(out, y, x)
        return s, c, out

    def _loss_sum(self, params: Params, x: Any, y: Tensor | None) -> Tensor:
        return self._terms(params, x, y)[0]

    def forward(self, x: Any, params: Mapping[str, Tensor] | Tensor | None = None) -> Tensor:
        """Model outputs ``f(x; w)`` (no gradient tracking)."""
        with self.mode(), torch.no_grad():
            return self.outputs(self._as_dict(params), cast(x, self.device, self.dtype))

    # ---------------------------------------------------------------- values
    def loss(self, params: Mapping[str, Tensor] | Tensor | None = None) -> float:
        """``L(w)`` as a Python float."""
        return self.evaluate(params)[0]

    def evaluate(self, params: Mapping[str, Tensor] | Tensor | None = None) -> tuple[float, float | None]:
        """``(L(w), accuracy)``; accuracy (over samples or predicted tokens) is ``None`` where undefined."""
        p = self._as_dict(params)
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)  # [Σ loss, Σ correct, Σ predictions, Σ terms]
        has_acc = self.loss_fn is None and self.loss_name != "mse"
        with self.mode(), torch.no_grad():
            for x, y in self.chunks():
                s, c, out = self._terms(p, x, y)
                sums[0] += s.double()
                sums[3] += float(c)
                hit = _losses.correct(self.loss_name, out, y, self.shift_labels) if has_acc else None
                if hit is None:
                    has_acc = False
                else:
                    sums[1] += hit[0].double()
                    sums[2] += hit[1]
        total, correct, predicted, terms = self._reduce(sums).tolist()
        if self._denom is None and terms > 0:
            self._denom = terms
        acc = (int(round(correct)) / predicted if predicted > 0 else 0.0) if has_acc else None
        return total / self.denominator, acc

    def grad(self, params: Mapping[str, Tensor] | Tensor | None = None) -> Params:
        """``∇L(w)`` as a dict, exact mean over all chunks."""
        return self.space.unflatten(self.grad_flat(params))

    def grad_flat(self, params: Mapping[str, Tensor] | Tensor | None = None) -> Tensor:
        """``∇L(w)`` as a flat ``[P]`` vector, exact mean over all chunks.

        One reverse pass per chunk with :func:`torch.autograd.grad` on detached leaves
        (no ``torch.func`` transform, no per-tensor accumulation dicts): the same cost as a
        plain ``autograd.grad`` of the same loss, plus one flat copy."""
        p = self._as_dict(params)
        names = self.space.names
        leaves = [p[k].detach().requires_grad_(True) for k in names]
        pd = dict(zip(names, leaves))
        acc: Tensor | None = None
        with self.mode(), torch.enable_grad():
            for x, y in self.chunks():
                loss = self._loss_sum(pd, x, y)
                gs = torch.autograd.grad(loss, leaves, allow_unused=True) if loss.requires_grad else [None] * len(leaves)
                flat = torch.cat([(g if g is not None else torch.zeros_like(w)).reshape(-1)
                                  for g, w in zip(gs, leaves)])
                acc = flat if acc is None else acc.add_(flat)
        self.n_grad += 1
        if acc is None:  # an empty shard contributes zeros
            acc = torch.zeros(self.space.size, dtype=self.dtype, device=self.device)
        acc = self._reduce(acc)
        return acc.div_(self.denominator)

    # ----------------------------------------------------------- curvature
    def _grad_graph(self, p: Params, x: Any, y: Tensor | None) -> tuple[list[Tensor], list[Tensor], list[int], Tensor]:
        """Leaves ``w``, the differentiable chunk gradient ``∇Σℓ`` (``create_graph``), the indices
        of the gradient entries that depend on ``w`` (others are 0 in ``H``), and the chunk loss."""
        return self._grad_graph_of(p, [(x, y)])

    def _grad_graph_of(self, p: Params, chunks) -> tuple[list[Tensor], list[Tensor], list[int], Tensor]:
        """:meth:`_grad_graph` of the summed loss of several chunks on shared leaves: each chunk is
        its own forward pass (its own BatchNorm batch in train mode), and one double backward
        through the joint graph then gives ``Σ_c H_c v`` (kept graphs, :attr:`keep_graphs`)."""
        leaves = [p[k].detach().requires_grad_(True) for k in self.space.names]
        with torch.enable_grad():
            named = dict(zip(self.space.names, leaves))
            loss = None
            for x, y in chunks:
                part = self._loss_sum(named, x, y)
                loss = part if loss is None else loss + part
            try:
                g = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
            except RuntimeError as exc:
                raise (_second_order_error(exc, "rev-rev", loss) or exc) from None
        self._check_graph(loss)
        live = [i for i, gi in enumerate(g) if gi is not None and gi.requires_grad]
        return leaves, [g[i] for i in live], live, loss

    def _hvp_from_graph(self, graph: tuple, Vt: Tensor, retain: bool) -> Tensor:
        """``[b, P]`` rows ``(H_chunk v)ᵀ`` by one double-backward pass per row of ``Vt``."""
        leaves, g, live, loss = graph
        out = torch.zeros_like(Vt)
        if not g:
            return out
        sl = list(self.space.slices().values())
        for j in range(Vt.shape[0]):
            vj = self.space.unflatten(Vt[j])
            try:
                hv = torch.autograd.grad(g, leaves, grad_outputs=[vj[self.space.names[i]] for i in live],
                                         retain_graph=retain or j < Vt.shape[0] - 1, allow_unused=True)
            except RuntimeError as exc:
                raise (_second_order_error(exc, "rev-rev", loss) or exc) from None
            for s, h in zip(sl, hv):
                if h is not None:
                    out[j, s] = h.reshape(-1)
        return out

    def _check_graph(self, loss: Tensor) -> None:
        """Once per objective: refuse ``@once_differentiable`` functions in the loss graph (differentiating
        their backward silently yields no curvature in either HVP method)."""
        if getattr(self, "_graph_checked", False):
            return
        if _graph_ops(loss, once_only=True):
            raise _second_order_error(RuntimeError("once_differentiable"), self.hvp_method, loss)
        self._graph_checked = True

    def _hvp_chunk_fwdrev(self, p: Params, V: Params, x: Any, y: Tensor | None) -> Params:
        if not getattr(self, "_graph_checked", False):
            with torch.enable_grad():
                self._check_graph(self._loss_sum({k: t.detach().requires_grad_(True) for k, t in p.items()}, x, y))
        g_fn = grad(self._loss_sum)

        def one(v: Params) -> Params:
            return jvp(lambda q: g_fn(q, x, y), (p,), (v,))[1]

        try:
            return vmap(one)(V)
        except (RuntimeError, NotImplementedError) as exc:
            raise (_second_order_error(exc, "fwd-rev") or exc) from None

    @contextlib.contextmanager
    def reuse_graph(self) -> Iterator[None]:
        """Within this block, ``rev-rev`` HVPs at :attr:`params` of a single-chunk
        objective keep the first-order graph ``∇L(w)`` alive between calls, so each
        further HVP is one double-backward pass (no forward, no first backward).  With
        :attr:`keep_graphs` (set by the memory planner when every chunk's graph fits the
        ``--max-memory`` budget) the graphs of *all* chunks are kept as one joint graph, so
        a chunked HVP is one double backward, as for an unchunked objective.

        Memory: the kept chunks' activations and gradient graphs, held until exit.
        Other multi-chunk objectives, ``fwd-rev`` or explicit ``params`` are unaffected.
        """
        prev = getattr(self, "_reuse", False)
        self._reuse = True
        try:
            yield
        finally:
            self._reuse = prev
            if not prev:
                self._graph_cache = None

    keep_graphs: bool = False  # keep every chunk's gradient graph inside reuse_graph (memory planner)

    def _cached_graph(self) -> tuple | None:
        """The kept first-order graph inside :meth:`reuse_graph` (one chunk, or every chunk jointly
        with :attr:`keep_graphs`), or ``None``."""
        if not getattr(self, "_reuse", False) or self.hvp_method != "rev-rev" or self.n_local == 0:
            return None
        if self.chunk_size < self.n_local and not self.keep_graphs:
            return None
        if getattr(self, "_graph_cache", None) is None:
            with self.mode():
                self._graph_cache = self._grad_graph_of(self.params, self.chunks())
        return self._graph_cache

    def hvp(self, v: Mapping[str, Tensor] | Tensor, params: Mapping[str, Tensor] | Tensor | None = None) -> Params | Tensor:
        """``H v`` for one vector (dict in, dict out; flat in, flat out)."""
        if isinstance(v, Tensor):
            return self.hvp_block(v.reshape(-1, 1), params)[:, 0]
        flat = self.space.flatten(v).reshape(-1, 1)
        return self.space.unflatten(self.hvp_block(flat, params)[:, 0])

    def hvp_block(self, V: Tensor, params: Mapping[str, Tensor] | Tensor | None = None) -> Tensor:
        """``H V`` for a block ``V`` of shape ``[P, b]`` (``b`` HVPs, counted).

        ``rev-rev``: per chunk, one graph of ``∇Σℓ`` (``create_graph``) and one
        double-backward pass per vector (inside :meth:`reuse_graph` the graph is
        kept between calls); ``fwd-rev``: ``vmap`` of ``jvp(grad)`` over the block.
        Blocks wider than ``vector_block`` are done ``vector_block`` columns at a time.
        """
        p = self._as_dict(params)
        V = V.to(device=self.device, dtype=self.dtype)
        if V.dim() != 2 or V.shape[0] != self.space.size:
            raise ValueError(f"V must be [P={self.space.size}, b], got {tuple(V.shape)}")
        b = V.shape[1]
        vb = self.vector_block
        if vb and b > vb:
            return torch.cat([self.hvp_block(V[:, s:s + vb], params) for s in range(0, b, vb)], dim=1)
        Vt = V.T.contiguous()
        cached = self._cached_graph() if params is None else None
        if cached is not None:
            out = self._hvp_from_graph(cached, Vt, retain=True)
        else:
            out = torch.zeros_like(Vt)
            with self.mode():
                if self.hvp_method == "fwd-rev":
                    Vd = self.space.unflatten(Vt)
                    for x, y in self.chunks():
                        out += self.space.flatten_batched(self._hvp_chunk_fwdrev(p, Vd, x, y))
                else:
                    for x, y in self.chunks():
                        out += self._hvp_from_graph(self._grad_graph(p, x, y), Vt, retain=False)
        self.n_hvp += b
        return (self._reduce(out) / self.denominator).T.contiguous()

    def hvp_operator(self, params: Mapping[str, Tensor] | Tensor | None = None) -> Callable[[Tensor], Tensor]:
        """``V ↦ H V`` on flat blocks ``[P, b]`` (or ``[P]``) for the eigensolvers."""

        def matmat(V: Tensor) -> Tensor:
            if V.dim() == 1:
                return self.hvp_block(V.reshape(-1, 1), params)[:, 0]
            return self.hvp_block(V, params)

        return matmat
