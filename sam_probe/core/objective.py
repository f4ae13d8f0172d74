"""The training objective of a checkpoint as a pure function of its parameters.

``L(w) = (1/N) Σ_i ℓ(f(x_i; w), y_i)`` over the whole data selection, evaluated
exactly in chunks of ``chunk_size`` samples (each chunk contributes its *sum* of
per-sample losses, the total is divided by ``N``), so gradients and
Hessian-vector products do not depend on the chunk size.  The one exception is
BatchNorm in ``train`` mode, whose batch statistics are those of each chunk.

The model is only ever called through :func:`torch.func.functional_call` with an
explicit parameter dict: the caller's weights, ``.grad`` and BatchNorm running
statistics are never touched.

Data parallel (``shard=True``, the default while :mod:`sam_probe.distributed` is
active): every rank holds the whole selection but sums only over its contiguous
shard ``[lo, hi)`` (:func:`~sam_probe.distributed.shard_range`); loss, correct
counts, gradients and HVPs are all-reduced (summed over ranks) *before* the
division by the global ``N``, so every rank gets the same numbers as one process
(up to the order of floating-point additions).  Subsets (minibatches, m-sharpness
sub-batches) are taken in global indices and sharded again.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vmap

from .. import distributed
from .params import ParamSpace

LOSSES = ("ce", "mse", "bce")
BN_MODES = ("eval", "train")
HVP_METHODS = ("rev-rev", "fwd-rev")

Params = dict[str, Tensor]


def default_loss(targets: Tensor) -> str:
    """``ce`` for integer class labels, ``mse`` for floating targets."""
    return "ce" if not torch.is_floating_point(targets) else "mse"


def per_sample_loss_sum(loss: str, output: Tensor, targets: Tensor) -> Tensor:
    """Σ_i ℓ(f_i, y_i) over the samples of one chunk.

    ``ce``: cross-entropy on logits; ``mse``: mean over output entries of
    (f - y)² per sample; ``bce``: binary cross-entropy on logits.
    """
    if loss == "ce":
        return F.cross_entropy(output, targets.long(), reduction="sum")
    if loss == "mse":
        t = targets.to(output.dtype).reshape(output.shape)
        per = (output - t).pow(2).reshape(output.shape[0], -1).mean(dim=1)
        return per.sum()
    if loss == "bce":
        t = targets.to(output.dtype).reshape(output.shape)
        per = F.binary_cross_entropy_with_logits(output, t, reduction="none")
        return per.reshape(output.shape[0], -1).mean(dim=1).sum()
    raise ValueError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")


def correct_count(loss: str, output: Tensor, targets: Tensor) -> Tensor | None:
    """Number of correct predictions in a chunk, or ``None`` for regression."""
    if loss == "ce":
        return (output.argmax(dim=1) == targets.long()).sum()
    if loss == "bce":
        return ((output.reshape(targets.shape) > 0).long() == targets.long()).sum()
    return None


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


class Objective:
    """Mean loss of ``model`` over ``(inputs, targets)`` as a function of a parameter dict.

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
        inputs: Tensor,
        targets: Tensor,
        loss: str | None = None,
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
    ):
        if bn_mode not in BN_MODES:
            raise ValueError(f"bn_mode must be one of {BN_MODES}, got {bn_mode!r}")
        if hvp_method not in HVP_METHODS:
            raise ValueError(f"hvp_method must be one of {HVP_METHODS}, got {hvp_method!r}")
        if len(inputs) != len(targets):
            raise ValueError(f"{len(inputs)} inputs but {len(targets)} targets")
        if len(inputs) == 0:
            raise ValueError("the data selection is empty")
        self.model = model
        self.loss_name = loss or default_loss(targets)
        if self.loss_name not in LOSSES:
            raise ValueError(f"unknown loss {self.loss_name!r}; choose one of {', '.join(LOSSES)}")
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
        self.inputs = _cast(inputs)
        self.targets = targets.detach().to(self.device)
        if self.targets.is_floating_point():
            self.targets = self.targets.to(dtype)
        self.n_samples = len(self.inputs)
        self.chunk_size = int(chunk_size) if chunk_size else self.n_samples
        if self.chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        self.vector_block = int(vector_block) if vector_block else None
        self.sharded = distributed.active() if shard is None else bool(shard)
        self.world = distributed.world_size() if self.sharded else 1
        self.rank = distributed.rank() if self.sharded else 0
        self.lo, self.hi = distributed.shard_range(self.n_samples, self.world, self.rank,
                                                   int(chunk_size) if chunk_size else None)
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
    def denominator(self) -> float:
        """What chunk loss sums are divided by: the number of loss terms of the whole
        selection (samples; predicted tokens for token-level losses)."""
        return self.n_samples

    @property
    def n_local(self) -> int:
        """Samples in this rank's shard (``n_samples`` in one process)."""
        return self.hi - self.lo

    def chunks(self) -> Iterator[tuple[Tensor, Tensor]]:
        """This rank's shard in chunks of ``chunk_size`` (the whole selection in one process)."""
        for s in range(self.lo, self.hi, self.chunk_size):
            e = min(s + self.chunk_size, self.hi)
            yield self.inputs[s:e], self.targets[s:e]

    def _reduce(self, t: Tensor) -> Tensor:
        """Sum ``t`` over ranks in place when sharded (identity otherwise)."""
        if self.sharded and self.world > 1:
            distributed.all_reduce_sum(t)
        return t

    def _same(self, **kw) -> dict:
        return dict(params=self.params, buffers=self.buffers, bn_mode=self.bn_mode, chunk_size=self.chunk_size,
                    dtype=self.dtype, device=self.device, hvp_method=self.hvp_method,
                    vector_block=self.vector_block, shard=self.sharded, **kw)

    def subset(self, index: Tensor) -> "Objective":
        """The same objective on the samples ``index`` (e.g. a seeded minibatch)."""
        index = torch.as_tensor(index, device=self.device)
        return Objective(self.model, self.inputs[index], self.targets[index], self.loss_name, **self._same())

    def with_params(self, params: Mapping[str, Tensor] | Tensor) -> "Objective":
        """The same data and model at other parameters (dict or flat vector)."""
        if isinstance(params, Tensor):
            params = self.space.unflatten(params)
        kw = self._same()
        kw["params"] = params
        return Objective(self.model, self.inputs, self.targets, self.loss_name, **kw)

    def rechunked(self, chunk_size: int | None, vector_block: int | None = None) -> "Objective":
        """The same objective evaluated in other chunk and vector-block sizes (memory only)."""
        kw = self._same()
        kw.update(chunk_size=chunk_size, vector_block=vector_block)
        return Objective(self.model, self.inputs, self.targets, self.loss_name, **kw)

    def _as_dict(self, params: Mapping[str, Tensor] | Tensor | None) -> Params:
        if params is None:
            return self.params
        if isinstance(params, Tensor):
            return self.space.unflatten(params)
        return dict(params)

    # ------------------------------------------------------------- hooks
    # A chunk is what :meth:`chunks` yields, ``(x, y)``; curvature operators and
    # other analyses go through these three hooks only, never through the model.
    def outputs(self, params: Params, x: Tensor) -> Tensor:
        """Model outputs ``f(x; w)`` of one chunk's inputs, differentiable in ``params``.

        Call inside :func:`analysis_mode` (the methods of this class do)."""
        return functional_call(self.model, (params, self.buffers), (x,), strict=False)

    def loss_sum_from_outputs(self, out: Tensor, y: Tensor) -> Tensor:
        """``Σ_i ℓ(f_i, y_i)`` of one chunk from its outputs (differentiable in ``out``)."""
        return per_sample_loss_sum(self.loss_name, out, y)

    def mode(self) -> contextlib.AbstractContextManager:
        """The evaluation context every forward pass of this objective runs in."""
        return analysis_mode(self.model, self.bn_mode)

    def _loss_sum(self, params: Params, x: Tensor, y: Tensor) -> Tensor:
        return self.loss_sum_from_outputs(self.outputs(params, x), y)

    def forward(self, x: Tensor, params: Mapping[str, Tensor] | Tensor | None = None) -> Tensor:
        """Model outputs ``f(x; w)`` (no gradient tracking)."""
        with analysis_mode(self.model, self.bn_mode), torch.no_grad():
            return functional_call(self.model, (self._as_dict(params), self.buffers), (x.to(self.device, self.dtype),), strict=False)

    # ---------------------------------------------------------------- values
    def loss(self, params: Mapping[str, Tensor] | Tensor | None = None) -> float:
        """``L(w)`` as a Python float."""
        return self.evaluate(params)[0]

    def evaluate(self, params: Mapping[str, Tensor] | Tensor | None = None) -> tuple[float, float | None]:
        """``(L(w), accuracy)``; accuracy is ``None`` for regression losses."""
        p = self._as_dict(params)
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)  # [Σ loss, Σ correct]
        has_acc = self.loss_name != "mse"
        with analysis_mode(self.model, self.bn_mode), torch.no_grad():
            for x, y in self.chunks():
                out = functional_call(self.model, (p, self.buffers), (x,), strict=False)
                sums[0] += per_sample_loss_sum(self.loss_name, out, y).double()
                c = correct_count(self.loss_name, out, y)
                if c is None:
                    has_acc = False
                else:
                    sums[1] += c.double()
        total, correct = self._reduce(sums).tolist()
        acc = int(round(correct)) / self.n_samples if has_acc else None
        return total / self.denominator, acc

    def grad(self, params: Mapping[str, Tensor] | Tensor | None = None) -> Params:
        """``∇L(w)`` as a dict, exact mean over all chunks."""
        p = self._as_dict(params)
        g_fn = grad(self._loss_sum)
        acc: Params | None = None
        with analysis_mode(self.model, self.bn_mode):
            for x, y in self.chunks():
                g = g_fn(p, x, y)
                acc = g if acc is None else {k: acc[k] + g[k] for k in acc}
        self.n_grad += 1
        if acc is None:  # an empty shard contributes zeros
            acc = {k: torch.zeros_like(p[k]) for k in self.space.names}
        if self.sharded and self.world > 1:
            acc = self.space.unflatten(self._reduce(self.space.flatten(acc)))
        return {k: v / self.denominator for k, v in acc.items()}

    def grad_flat(self, params: Mapping[str, Tensor] | Tensor | None = None) -> Tensor:
        """``∇L(w)`` as a flat ``[P]`` vector."""
        return self.space.flatten(self.grad(params))

    # ----------------------------------------------------------- curvature
    def _grad_graph(self, p: Params, x: Tensor, y: Tensor) -> tuple[list[Tensor], list[Tensor], list[int]]:
        """Leaves ``w``, the differentiable chunk gradient ``∇Σℓ`` (``create_graph``) and
        the indices of the gradient entries that depend on ``w`` (others are 0 in ``H``)."""
        leaves = [p[k].detach().requires_grad_(True) for k in self.space.names]
        with torch.enable_grad():
            loss = self._loss_sum(dict(zip(self.space.names, leaves)), x, y)
            g = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
        live = [i for i, gi in enumerate(g) if gi is not None and gi.requires_grad]
        return leaves, [g[i] for i in live], live

    def _hvp_from_graph(self, graph: tuple[list[Tensor], list[Tensor], list[int]], Vt: Tensor, retain: bool) -> Tensor:
        """``[b, P]`` rows ``(H_chunk v)ᵀ`` by one double-backward pass per row of ``Vt``."""
        leaves, g, live = graph
        out = torch.zeros_like(Vt)
        if not g:
            return out
        sl = list(self.space.slices().values())
        for j in range(Vt.shape[0]):
            vj = self.space.unflatten(Vt[j])
            hv = torch.autograd.grad(g, leaves, grad_outputs=[vj[self.space.names[i]] for i in live],
                                     retain_graph=retain or j < Vt.shape[0] - 1, allow_unused=True)
            for s, h in zip(sl, hv):
                if h is not None:
                    out[j, s] = h.reshape(-1)
        return out

    def _hvp_chunk_fwdrev(self, p: Params, V: Params, x: Tensor, y: Tensor) -> Params:
        g_fn = grad(self._loss_sum)

        def one(v: Params) -> Params:
            return jvp(lambda q: g_fn(q, x, y), (p,), (v,))[1]

        return vmap(one)(V)

    @contextlib.contextmanager
    def reuse_graph(self) -> Iterator[None]:
        """Within this block, ``rev-rev`` HVPs at :attr:`params` of a single-chunk
        objective keep the first-order graph ``∇L(w)`` alive between calls, so each
        further HVP is one double-backward pass (no forward, no first backward).

        Memory: that chunk's activations and gradient graph, held until exit.
        Objectives with several chunks, ``fwd-rev`` or explicit ``params`` are unaffected.
        """
        prev = getattr(self, "_reuse", False)
        self._reuse = True
        try:
            yield
        finally:
            self._reuse = prev
            if not prev:
                self._graph_cache = None

    def _cached_graph(self) -> tuple[list[Tensor], list[Tensor], list[int]] | None:
        if (not getattr(self, "_reuse", False) or self.hvp_method != "rev-rev" or self.chunk_size < self.n_local
                or self.n_local == 0):
            return None
        if getattr(self, "_graph_cache", None) is None:
            with analysis_mode(self.model, self.bn_mode):
                self._graph_cache = self._grad_graph(self.params, self.inputs[self.lo:self.hi],
                                                     self.targets[self.lo:self.hi])
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
            with analysis_mode(self.model, self.bn_mode):
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
