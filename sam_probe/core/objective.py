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
statistics are never touched; every pass runs attention through PyTorch's math
scaled-dot-product backend (:mod:`sam_probe.core.model_calls`).  The loss is an
object (:mod:`sam_probe.core.losses`) and Hessian-vector products are made by the
engine of ``hvp_method`` (:mod:`sam_probe.core.hessian`).

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
from collections.abc import Iterator, Mapping
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .. import distributed
from . import losses as _losses
from .batches import Batches, TensorBatches, batch_len, cast
from .errors import DoubleBackwardError, LossError, opt  # noqa: F401 - DoubleBackwardError re-exported
from .hessian import ENGINES, HessianProducts, resolve_auto
from .losses import LOSSES, Loss, default_loss  # noqa: F401 - re-exported
from .model_calls import (BN_MODES, LABEL_KEYS, ModelCall, analysis_mode, has_attention,  # noqa: F401 - re-exported
                          is_causal_lm, math_attention, split_labels, unwrap_logits, unwrap_loss)
from .names import HVP_METHODS
from .params import ParamSpace

Params = dict[str, Tensor]


class Objective:
    """Mean loss of ``model`` over a data selection as a function of a parameter dict.

    ``inputs``: a tensor or dict of tensors (with ``targets``: a tensor or ``None``),
    or a :class:`~sam_probe.core.batches.Batches` source (``targets=None``).
    ``loss``: a name of :data:`LOSSES`, a :class:`~sam_probe.core.losses.Loss` or a callable
    ``fn(outputs, targets[, batch])`` (see :mod:`sam_probe.core.losses`); ``loss_name`` labels a
    callable.  ``shift_labels``: whether ``loss='model'`` shifts labels inside the model (causal
    LMs; default from the class name).  ``hvp_method``: ``rev-rev``, ``fwd-rev``, ``fd`` or
    ``auto`` (:mod:`sam_probe.core.hessian`).

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
        loss: str | Loss | Callable[..., Any] | None = None,
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
        _hvp_note: str | None = None,
        _share_params: bool = False,
    ):
        if bn_mode not in BN_MODES:
            raise ValueError(f"bn_mode must be one of {BN_MODES}, got {bn_mode!r}")
        if hvp_method not in HVP_METHODS:
            raise ValueError(f"hvp_method must be one of {HVP_METHODS}, got {hvp_method!r}")
        self.model = model
        self.bn_mode = bn_mode
        self._hvp_method = hvp_method
        self._hvp_note = _hvp_note
        self._products: HessianProducts | None = None
        src_params = dict(model.named_parameters()) if params is None else dict(params)
        src_buffers = dict(model.named_buffers()) if buffers is None else dict(buffers)
        if device is None:
            device = next(iter(src_params.values())).device if src_params else torch.device("cpu")
        self.device = torch.device(device)
        if dtype is None:
            dtype = next(iter(src_params.values())).dtype if src_params else torch.float32
        self.dtype = dtype

        def _cast(t: Tensor, share: bool = False) -> Tensor:
            t = t.detach()
            same = t.device == self.device and (t.dtype == dtype or not t.is_floating_point())
            if share and same:  # another objective's private copy (read only): no second copy
                return t
            t = t.to(device=self.device, dtype=dtype) if t.is_floating_point() else t.to(self.device)
            return t.clone()

        self.params: Params = {k: _cast(v, _share_params) for k, v in src_params.items()}
        self.buffers: Params = {k: _cast(v) for k, v in src_buffers.items()}
        self.space = ParamSpace(self.params)
        self.call = ModelCall(model, self.buffers)
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
        self.shift_labels = is_causal_lm(model) if shift_labels is None else bool(shift_labels)
        if loss is None:
            loss = self._default_loss()
        self.loss_obj: Loss = _losses.resolve(loss, loss_name, shift_labels=self.shift_labels)
        self.loss_name: str = self.loss_obj.name
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
            raise LossError("this analysis needs the data in memory as tensors; streamed datasets are only read "
                            "chunk by chunk (load a .pt/.npz file or return tensors from the factory)",
                            option="data")
        return self.data

    @property
    def loss_fn(self) -> Callable[..., Any] | None:
        """The user's loss function (``None`` for a built-in loss)."""
        return self.loss_obj.fn if isinstance(self.loss_obj, _losses.UserLoss) else None

    @property
    def is_custom_loss(self) -> bool:
        return isinstance(self.loss_obj, _losses.UserLoss)

    @property
    def denominator(self) -> float:
        """What chunk loss sums are divided by: the number of loss terms of the whole
        selection (samples; labelled / predicted tokens for token-level losses), summed
        over ranks.  Counted once from the targets (a forward pass for user losses)."""
        if self._denom is None:
            loss = self.loss_obj
            if loss.counted_by_evaluation:
                self.evaluate()  # sets _denom
            elif isinstance(self.data, TensorBatches):  # every rank holds the whole selection: count it all
                n = 0
                for s in range(0, self.n_samples, self.chunk_size):
                    x, y = self._prepare(*next(self.data.slices(s, min(s + self.chunk_size, self.n_samples),
                                                                self.chunk_size)))
                    n += loss.term_count(y, batch_len(x))
                self._denom = float(n)
            else:  # streamed: each rank counts its shard
                t = torch.zeros(1, dtype=torch.float64, device=self.device)
                for x, y in self.chunks():
                    t += loss.term_count(y, batch_len(x))
                self._denom = float(self.reduce(t).item())
            if not self._denom > 0:
                raise LossError("the selection has no loss terms (every label is -100?)", option="loss",
                                value=self.loss_name)
        return self._denom

    @property
    def n_local(self) -> int:
        """Samples in this rank's shard (``n_samples`` in one process)."""
        return self.hi - self.lo

    def _default_loss(self) -> str:
        x, y = split_labels(cast(self.data.first(1)[0], self.device, self.dtype), self.data.first(1)[1], False)
        return default_loss(y) if y is not None else "lm"

    def _prepare(self, x: Any, y: Tensor | None) -> tuple[Any, Tensor | None]:
        """Device/dtype, the labels of a dict batch as targets, and ``lm`` targets from the token ids."""
        x = cast(x, self.device, self.dtype)
        y = None if y is None else cast(y, self.device, self.dtype)
        x, y = split_labels(x, y, pass_labels=not self.loss_obj.from_outputs)
        if y is None:
            y = self.loss_obj.targets_from_inputs(x)
        return x, y

    def chunks(self) -> Iterator[tuple[Any, Tensor | None]]:
        """This rank's shard in chunks of ``chunk_size`` (the whole selection in one process)."""
        for x, y in self.data.slices(self.lo, self.hi, self.chunk_size):
            yield self._prepare(x, y)

    def first_chunk(self, n: int = 2) -> tuple[Any, Tensor | None]:
        """The first ``n`` samples of the selection, prepared (probes)."""
        return self._prepare(*self.data.first(min(n, self.n_samples)))

    def reduce(self, t: Tensor) -> Tensor:
        """Sum ``t`` over ranks in place when sharded (identity otherwise)."""
        if self.sharded and self.world > 1:
            distributed.all_reduce_sum(t)
        return t

    _reduce = reduce

    def _same(self, **kw) -> dict:
        base = dict(params=self.params, buffers=self.buffers, bn_mode=self.bn_mode, chunk_size=self.chunk_size,
                    dtype=self.dtype, device=self.device, hvp_method=self.hvp_method,
                    vector_block=self.vector_block, shard=self.sharded, shift_labels=self.shift_labels,
                    _hvp_note=self._hvp_note)
        base.update(kw)
        return base

    def subset(self, index: Tensor, shard: bool | None = None) -> "Objective":
        """The same objective on the samples ``index`` (e.g. a seeded minibatch)."""
        kw = self._same() if shard is None else self._same(shard=shard)
        chunk = kw["chunk_size"]
        kw["chunk_size"] = chunk if chunk < self.n_samples else None
        return Objective(self.model, self.data.take(torch.as_tensor(index)), None, self.loss_obj, **kw,
                         _share_params=True)  # the same parameters: m-sharpness makes one subset per sub-batch

    def with_params(self, params: Mapping[str, Tensor] | Tensor, buffers: Mapping[str, Tensor] | None = None
                    ) -> "Objective":
        """The same data and model at other parameters (dict or flat vector), and optionally buffers."""
        if isinstance(params, Tensor):
            params = self.space.unflatten(params)
        kw = self._same(params=params, _denominator=self._shared_denominator())
        if buffers is not None:
            kw["buffers"] = buffers
        return Objective(self.model, self.data, None, self.loss_obj, **kw)

    def rechunked(self, chunk_size: int | None, vector_block: int | None = None) -> "Objective":
        """The same objective evaluated in other chunk and vector-block sizes (memory only)."""
        kw = self._same(chunk_size=chunk_size, vector_block=vector_block, _denominator=self._shared_denominator())
        return Objective(self.model, self.data, None, self.loss_obj, **kw)

    def in_dtype(self, dtype: torch.dtype) -> "Objective":
        """The same objective with parameters, buffers, inputs and products in ``dtype`` (e.g. the float32
        twin that certifies a half-precision run's eigenpairs, :mod:`sam_probe.core.precision`)."""
        kw = self._same(dtype=dtype, _denominator=self._shared_denominator())
        return Objective(self.model, self.data, None, self.loss_obj, **kw)

    def _shared_denominator(self) -> float | None:
        """The term count for an objective on the same data (user losses count their own terms)."""
        return None if self.is_custom_loss else self._denom

    def _as_dict(self, params: Mapping[str, Tensor] | Tensor | None) -> Params:
        if params is None:
            return self.params
        if isinstance(params, Tensor):
            return self.space.unflatten(params)
        return dict(params)

    @property
    def dropped_keys(self) -> set[str]:
        """Batch fields the model's ``forward`` does not take (not passed)."""
        return self.call.dropped_keys

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
        if self._hvp_note:
            out.append(self._hvp_note)
        return out

    def check_inputs(self, n: int = 2) -> None:
        """One forward pass (and loss) on the first ``n`` samples: raises if the model does not take the data.
        With ``hvp_method='auto'`` this also picks the product method (one probe product)."""
        x, y = self.first_chunk(n)
        with self.mode(), torch.no_grad():
            self._terms(self.params, x, y)
        if self._hvp_method == "auto":
            self.hessian_products  # noqa: B018 - resolves auto

    # ------------------------------------------------------------- hooks
    # A chunk is what :meth:`chunks` yields, ``(x, y)``; curvature operators and
    # other analyses go through these hooks only, never through the model
    # (:class:`~sam_probe.core.protocols.ObjectiveLike`).
    def outputs(self, params: Params, x: Any) -> Tensor:
        """Model outputs ``f(x; w)`` of one chunk's inputs (the logits), differentiable in ``params``.

        Call inside :meth:`mode` (the methods of this class do)."""
        return unwrap_logits(self.call(params, x))

    def loss_sum_from_outputs(self, out: Tensor, y: Tensor | None, x: Any = None) -> Tensor:
        """``Σ ℓ`` over one chunk's loss terms from its outputs (differentiable in ``out``).

        ``x`` (the chunk's inputs) is only needed by user loss functions; without it the batch
        length is the outputs' leading dimension.  No term count is taken here, so this is safe
        under ``vmap`` (the curvature operators call it per sample)."""
        return self.loss_obj.chunk_sum(out, y, x)

    def mode(self) -> contextlib.AbstractContextManager:
        """The evaluation context every forward pass of this objective runs in (eval mode, BN mode,
        math attention)."""
        stack = contextlib.ExitStack()
        stack.enter_context(analysis_mode(self.model, self.bn_mode))
        stack.enter_context(math_attention())
        return stack

    def _terms(self, params: Params, x: Any, y: Tensor | None) -> tuple[Tensor, Any, Tensor | None]:
        """``(Σ ℓ, #terms, logits)`` of one chunk."""
        loss = self.loss_obj
        if not loss.from_outputs:  # the model's own loss
            raw = self.call(params, x, labels=y if not isinstance(x, Mapping) else None)
            count = loss.term_count(y, batch_len(x))
            try:
                logits = unwrap_logits(raw)
            except LossError:
                logits = None
            return unwrap_loss(raw) * count, count, logits
        out = self.outputs(params, x)
        if isinstance(loss, _losses.UserLoss):
            s, c = loss.sum_and_count(out, y, x, batch_len(x))
            return s, c, out
        return loss.chunk_sum(out, y, x), loss.term_count(y, batch_len(x)), out

    def chunk_loss(self, params: Params, x: Any, y: Tensor | None) -> Tensor:
        """``Σ ℓ`` of one chunk as a function of the parameters."""
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
        has_acc = True
        with self.mode(), torch.no_grad():
            for x, y in self.chunks():
                s, c, out = self._terms(p, x, y)
                sums[0] += s.double()
                sums[3] += float(c)
                hit = self.loss_obj.correct(out, y) if has_acc else None
                if hit is None:
                    has_acc = False
                else:
                    sums[1] += hit[0].double()
                    sums[2] += hit[1]
        total, correct, predicted, terms = self.reduce(sums).tolist()
        if self._denom is None and terms > 0:
            self._denom = terms
        acc = (int(round(correct)) / predicted if predicted > 0 else 0.0) if has_acc else None
        return total / self.denominator, acc

    def grad(self, params: Mapping[str, Tensor] | Tensor | None = None) -> Params:
        """``∇L(w)`` as a dict, exact mean over all chunks."""
        return self.space.unflatten(self.grad_flat(params))

    def grad_flat(self, params: Mapping[str, Tensor] | Tensor | None = None, count: bool = True) -> Tensor:
        """``∇L(w)`` as a flat ``[P]`` vector, exact mean over all chunks (``count``: in :attr:`n_grad`).

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
                loss = self.chunk_loss(pd, x, y)
                gs = torch.autograd.grad(loss, leaves, allow_unused=True) if loss.requires_grad else [None] * len(leaves)
                flat = torch.cat([(g if g is not None else torch.zeros_like(w)).reshape(-1)
                                  for g, w in zip(gs, leaves)])
                acc = flat if acc is None else acc.add_(flat)
        if count:
            self.n_grad += 1
        if acc is None:  # an empty shard contributes zeros
            acc = torch.zeros(self.space.size, dtype=self.dtype, device=self.device)
        acc = self.reduce(acc)
        return acc.div_(self.denominator)

    # ------------------------------------------------------- Hessian products
    @property
    def hvp_method(self) -> str:
        """The product method (``auto`` resolved once the first product or :meth:`check_inputs` ran)."""
        return self._products.method if self._products is not None else self._hvp_method

    @property
    def hessian_products(self) -> HessianProducts:
        """The product engine of :attr:`hvp_method` (:mod:`sam_probe.core.hessian`), built on first use."""
        if self._products is None:
            method = self._hvp_method
            if method == "auto":
                method, note = resolve_auto(self)
                self._hvp_note = note or self._hvp_note
            self._products = ENGINES[method](self)
        return self._products

    @property
    def keep_graphs(self) -> bool:
        """Inside :meth:`reuse_graph`, keep every chunk's gradient graph (``rev-rev``; set by the memory
        planner when they fit the budget)."""
        return self.hessian_products.keep_graphs

    @keep_graphs.setter
    def keep_graphs(self, value: bool) -> None:
        self.hessian_products.keep_graphs = bool(value)

    def reuse_graph(self) -> contextlib.AbstractContextManager:
        """Within this block, ``rev-rev`` products at :attr:`params` keep the first-order graph ``∇L(w)``
        alive between calls (one chunk, or every chunk jointly with :attr:`keep_graphs`), so each further
        product is one double-backward pass.  Memory: the kept chunks' activations and gradient graphs,
        held until exit.  Other methods and explicit ``params`` are unaffected."""
        return self.hessian_products.reuse_graph()

    def hvp(self, v: Mapping[str, Tensor] | Tensor, params: Mapping[str, Tensor] | Tensor | None = None) -> Params | Tensor:
        """``H v`` for one vector (dict in, dict out; flat in, flat out)."""
        if isinstance(v, Tensor):
            return self.hvp_block(v.reshape(-1, 1), params)[:, 0]
        flat = self.space.flatten(v).reshape(-1, 1)
        return self.space.unflatten(self.hvp_block(flat, params)[:, 0])

    def hvp_block(self, V: Tensor, params: Mapping[str, Tensor] | Tensor | None = None) -> Tensor:
        """``H V`` for a block ``V`` of shape ``[P, b]`` (``b`` HVPs, counted), by the engine of
        :attr:`hvp_method`.  Blocks wider than ``vector_block`` are done ``vector_block`` columns at a
        time; an inexact engine's error estimates of the block are in ``hessian_products.last_error``."""
        V = V.to(device=self.device, dtype=self.dtype)
        if V.dim() != 2 or V.shape[0] != self.space.size:
            raise ValueError(f"V must be [P={self.space.size}, b], got {tuple(V.shape)}")
        engine = self.hessian_products
        p = None if params is None else self._as_dict(params)
        b, vb = V.shape[1], self.vector_block
        if vb and b > vb:
            outs, errs = [], []
            for s in range(0, b, vb):
                outs.append(engine.matmat(V[:, s:s + vb], p))
                errs.append(engine.last_error)
            out = torch.cat(outs, dim=1)
            engine.last_error = None if any(e is None for e in errs) else torch.cat(errs)
        else:
            out = engine.matmat(V, p)
        self.n_hvp += b
        return out

    def hvp_operator(self, params: Mapping[str, Tensor] | Tensor | None = None) -> Callable[[Tensor], Tensor]:
        """``V ↦ H V`` on flat blocks ``[P, b]`` (or ``[P]``) for the eigensolvers."""

        def matmat(V: Tensor) -> Tensor:
            if V.dim() == 1:
                return self.hvp_block(V.reshape(-1, 1), params)[:, 0]
            return self.hvp_block(V, params)

        return matmat

