"""Model-sharded objectives: the model under FSDP2, every parameter-sized vector a shard.

:class:`ShardedObjective` wraps a model with ``torch.distributed.fsdp.fully_shard``
(each transformer block, i.e. each element of a parameterised ``nn.ModuleList``, else
each top-level child with parameters, then the root), so rank ``r`` of ``R`` holds
only its shard ``w_r`` of each parameter (FSDP2 shards dimension 0 of every tensor).
Every parameter-sized vector is held the same way: ``v_r`` = the entries of ``v``
belonging to ``w_r``, flattened tensor by tensor (:class:`ShardSpace`), and the
solvers sum their inner products over ranks (:mod:`sam_probe.core.inner`).

Loss and gradient.  The data selection of ``N`` samples is split into ``R`` contiguous
parts (every rank the same number of chunks); with ``T`` loss terms in all::

    L(w) = (1/T) Σ_r Σ_{chunks c of rank r} Σ_{terms i ∈ c} ℓ_i(w)

Each rank back-propagates ``R · Σ_c ℓ / T`` through FSDP's own backward, whose
reduce-scatter averages over ranks, so the gradient shard left on rank ``r`` is
``(∇L)_r``.  (With fewer samples than ranks every rank uses all of them, unscaled.)

Hessian products.  Double backward is not available through FSDP's hooks, so products
are central differences of gradients with one Richardson step (as ``--hvp fd``,
:class:`sam_probe.core.hessian.FiniteDifferenceProducts`)::

    D(h) = (∇L(w + h v) − ∇L(w − h v)) / 2h,      H v ≈ (4 D(h/2) − D(h)) / 3,

(retried at ``h/16`` where a kink was crossed: :func:`sam_probe.core.hessian.extrapolated_difference`)

``h = ε^¼ · max(rms(w), 0.01) · √N / ‖v‖`` (``ε`` the dtype's machine epsilon) and
the error estimate ``‖D(h/2) − D(h)‖/3 + 4 ε (‖g₊‖ + ‖g₋‖)/h`` (norms over all
ranks), which the solvers add to each residual before certifying.  Four gradients
per product.  The weights are set to ``w ± h v`` *in place* on the sharded copy and
restored from a saved shard after each gradient (exactly: copied back, never
subtracted); the caller's model is never touched (``copy=True``, the default).

Whole vectors.  :func:`gather_flat` assembles a shard vector on rank 0 in one process's flat
order (what ``ratios`` stores: codes and masks byte for byte as one process writes them);
:func:`local_state` cuts whole tensors (a checkpoint's state) to this rank's shards, as FSDP2 does
(``interpolate``: :class:`ShardedPath`).

Memory per rank: the model shard ``P/R``, its gradient shard, the saved shard and the
solver's ``k + c`` vector shards, i.e. ``(3 + k + c) · P / R`` entries, plus one
transformer block gathered at a time and the activations of one chunk.
"""
from __future__ import annotations

import copy as _copy
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from . import inner
from . import losses as _losses
from .batches import batch_len
from .errors import LossError, SpecError, opt
from .hessian import extrapolated_difference
from .model_calls import BN_MODES, analysis_mode, split_labels, unwrap_logits, unwrap_loss
from .operator_base import CurvatureOperator


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules that get their own ``fully_shard`` before the root: every element (with
    parameters) of a ``nn.ModuleList`` (transformer blocks), else every top-level child with
    parameters."""
    blocks = [m for ml in model.modules() if isinstance(ml, nn.ModuleList) for m in ml
              if any(True for _ in m.parameters())]
    if blocks:
        return blocks
    return [c for c in model.children() if any(True for _ in c.parameters())]


def fully_shard_model(model: nn.Module, group: Any = None, device: torch.device | str | None = None) -> nn.Module:
    """``model`` wrapped in place by FSDP2 over ``group`` (:func:`shard_units`, then the root) on ``device``
    (default: where its parameters are; meta-device parameters are sharded for ``device``)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    group = group if group is not None else dist.group.WORLD
    dev = torch.device(device) if device is not None else next(iter(model.parameters())).device
    ranks = dist.get_process_group_ranks(group)
    mesh = DeviceMesh.from_group(group, dev.type, mesh=torch.tensor(ranks)) if group is not dist.group.WORLD \
        else DeviceMesh(dev.type, torch.arange(dist.get_world_size()))
    for unit in shard_units(model):
        fully_shard(unit, mesh=mesh, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, reshard_after_forward=True)
    return model


def reshard(model: nn.Module) -> None:
    """Every FSDP unit of ``model`` back to its sharded parameters (a unit left gathered after a forward
    pass would otherwise compute with its gathered copy, not with shards changed since)."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def _local(p: Tensor) -> Tensor:
    """The local shard of a (DTensor) parameter or gradient."""
    return p.to_local() if hasattr(p, "to_local") else p


class ShardSpace:
    """This rank's shard of every parameter as one flat local vector (tensor after tensor)."""

    def __init__(self, params: Mapping[str, Tensor]):
        self.names = list(params)
        self.shapes = [tuple(params[n].shape) for n in self.names]  # global shapes
        self.local_shapes = [tuple(_local(params[n]).shape) for n in self.names]
        self.numels = [math.prod(s) for s in self.local_shapes]
        self.offsets = [0]
        for k in self.numels:
            self.offsets.append(self.offsets[-1] + k)
        self.size = self.offsets[-1]

    def slices(self) -> dict[str, slice]:
        return {n: slice(self.offsets[i], self.offsets[i + 1]) for i, n in enumerate(self.names)}

    def flatten(self, tensors: Mapping[str, Tensor]) -> Tensor:
        """Local shards (or DTensors) of every tensor, concatenated."""
        return torch.cat([_local(tensors[n]).reshape(-1) for n in self.names])

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        return {n: flat[self.offsets[i]:self.offsets[i + 1]].reshape(self.local_shapes[i])
                for i, n in enumerate(self.names)}


def _group_of(group: Any) -> Any:
    import torch.distributed as dist

    if group is not None:
        return group
    return inner._GROUP.get() or dist.group.WORLD


def shard_of(full: Tensor, rank: int, world: int) -> Tensor:
    """Rank ``rank``'s part of a whole tensor as FSDP2 holds it (:func:`.sharded_states.shard_of`: the
    ``rank``-th of ``world`` chunks of dimension 0, empty past the last chunk).  A view, no copy."""
    from .sharded_states import shard_of as chunk

    return chunk(full, world, rank)


def local_state(space: "ShardSpace", state: Mapping[str, Tensor], rank: int, world: int) -> dict[str, Tensor]:
    """``{name: this rank's shard of state[name]}`` for the parameters of ``space`` (views of ``state``'s
    tensors); the shapes are checked against the model's own shards."""
    out = {}
    for name, shape in zip(space.names, space.local_shapes):
        t = shard_of(state[name], rank, world)
        if t.numel() == math.prod(shape):
            t = t.reshape(shape)  # a 0-d tensor's one row
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{name}: shard {tuple(t.shape)} of a {tuple(state[name].shape)} tensor, but the "
                             f"model's shard is {tuple(shape)}")
        out[name] = t
    return out


def gather_flat(local: Tensor, space: Any, group: Any = None) -> Tensor | None:
    """The whole flat vector, in one process's order, from every rank's shard ``local`` (laid out as
    ``space``: a :class:`ShardSpace`, or anything with its ``size``, ``names`` and ``numels``): on rank 0
    a CPU tensor of ``P`` entries, ``None`` on the other ranks.  Collective over ``group`` (default: the
    :func:`~sam_probe.core.inner.sharded` group, else the whole default group).

    One process orders a parameter vector tensor after tensor, each tensor row-major; FSDP2 gives rank
    ``r`` the ``r``-th chunk of dimension 0 of every tensor, so tensor ``t``'s entries are rank 0's piece of
    ``t``, then rank 1's, ...  Rank 0 fills the result tensor by tensor from its own shard and from each
    other rank's shard, received one rank at a time: ``P`` entries plus one shard (``P/R``) at its peak;
    every other rank sends its shard and holds nothing more.  Bit-exact (a copy, no arithmetic); ``bool``
    shards travel as bytes."""
    import torch.distributed as dist

    group = _group_of(group)
    R, me = dist.get_world_size(group), dist.get_rank(group)
    flat = local.reshape(-1)
    if flat.numel() != space.size:
        raise ValueError(f"a shard of {flat.numel()} entries for a shard space of {space.size}")
    is_bool = flat.dtype == torch.bool
    if is_bool:
        flat = flat.view(torch.uint8)
    flat = flat.contiguous()
    counts = torch.zeros(R, len(space.names), dtype=torch.int64, device=flat.device)
    counts[me] = torch.tensor(space.numels, dtype=torch.int64, device=flat.device)
    dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)  # every rank's numel of every tensor
    counts = counts.cpu()
    root = dist.get_global_rank(group, 0)
    if me != 0:
        if flat.numel():
            dist.send(flat, dst=root, group=group)
        return None
    per_tensor = counts.sum(0).tolist()  # global numel of each tensor
    starts = [0]
    for k in per_tensor:
        starts.append(starts[-1] + int(k))
    out = torch.empty(starts[-1], dtype=flat.dtype)

    def place(r: int, shard: Tensor) -> None:
        src = 0
        for j in range(len(space.names)):
            k = int(counts[r, j])
            dst = starts[j] + int(counts[:r, j].sum())
            out[dst:dst + k].copy_(shard[src:src + k])
            src += k

    place(0, flat)
    for r in range(1, R):
        n_r = int(counts[r].sum())
        if n_r:
            buf = torch.empty(n_r, dtype=flat.dtype, device=flat.device)
            dist.recv(buf, src=dist.get_global_rank(group, r), group=group)
            place(r, buf)
            del buf
    return out.view(torch.bool) if is_bool else out


class ShardedObjective:
    """Mean loss of an FSDP2-sharded model over a data selection (module docstring).

    Must be created on every rank of ``group`` (default: the whole default process group,
    which must exist), with the same model, data and settings; every method is collective.
    ``inputs``/``targets``: the whole selection (each rank keeps its part); ``loss``: a name
    of the loss registry, a :class:`~sam_probe.core.losses.Loss` or a function.
    """

    def __init__(self, model: nn.Module, inputs: Any, targets: Tensor | None = None, loss: Any = None, *,
                 group: Any = None, chunk_size: int | None = None, bn_mode: str = "eval", copy: bool = True,
                 dtype: torch.dtype | None = None, rel_step: float | None = None, loss_name: str | None = None,
                 _saved: Tensor | None = None):
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise SpecError(f"a sharded model needs a torch.distributed process group (torchrun, or "
                            f"{opt('distributed')})", option="shard_model")
        if bn_mode not in BN_MODES:
            raise ValueError(f"bn_mode must be one of {BN_MODES}, got {bn_mode!r}")
        if bn_mode == "train" and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            raise SpecError(f"{opt('bn_mode', 'train')} is not available with a sharded model (batch statistics "
                            f"would be each rank's); use {opt('bn_mode', 'eval')}")
        self.group = group if group is not None else dist.group.WORLD
        self.shard_group = self.group  # vectors of this objective are shards (core/inner.py)
        self.world = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        from torch.distributed.fsdp import FSDPModule

        module: nn.Module
        if isinstance(model, FSDPModule):  # sharded already (core/meta_init.py: never whole on a rank)
            module = model
        else:
            module = _copy.deepcopy(model) if copy else model
            if dtype is not None:
                module = module.to(dtype)
            module = fully_shard_model(module, self.group)
        for p in module.parameters():
            p.requires_grad_(True)
        self.module = module
        self.bn_mode = bn_mode
        self.named = dict(self.module.named_parameters())
        self.space = ShardSpace(self.named)
        first = next(iter(self.named.values()))
        self.dtype = first.dtype
        self.device = _local(first).device
        if inputs is not None and isinstance(inputs, Tensor) and inputs.is_floating_point():
            inputs = inputs.to(self.dtype)
        n = batch_len(inputs)
        if targets is not None and len(targets) != n:
            raise ValueError(f"{n} inputs but {len(targets)} targets")
        if n == 0:
            raise ValueError("the data selection is empty")
        self.n_samples = n
        self.loss_obj = _losses.resolve(loss if loss is not None else (_losses.default_loss(targets) if targets
                                        is not None else "model"), loss_name)
        self.loss_name = self.loss_obj.name
        if isinstance(self.loss_obj, _losses.UserLoss):
            raise LossError(f"a loss function of your own is not yet available with a sharded model; use a "
                            f"registered loss ({opt('loss')} ce, lm, mse, bce or model)", option="loss")
        split = n >= self.world
        lo, hi = ((self.rank * n) // self.world, ((self.rank + 1) * n) // self.world) if split else (0, n)
        self.scale = float(self.world) if split else 1.0
        per_rank = n // self.world if split else n
        chunk = int(chunk_size) if chunk_size else per_rank
        n_chunks = max(1, math.ceil(per_rank / max(1, chunk)))  # the same on every rank (collectives match)
        bounds = torch.linspace(lo, hi, n_chunks + 1).round().long().tolist()
        self._chunks = []
        for a, b in zip(bounds[:-1], bounds[1:]):
            x = _take(inputs, a, b)
            y = targets[a:b] if targets is not None else self.loss_obj.targets_from_inputs(x)  # token-only data: ids
            self._chunks.append((x, y))
        self.rel_step = float(torch.finfo(self.dtype).eps) ** 0.25 if rel_step is None else float(rel_step)
        self._inputs, self._targets, self._chunk_size = inputs, targets, chunk_size  # (references: for subset)
        # the weights' shard, restored after every shifted gradient (a subset shares its parent's)
        self._w0 = _saved if _saved is not None else self.space.flatten(self.named).detach().clone()
        self.N = inner_size(self.space.size, self.group)
        self.n_grad = 0
        self.n_hvp = 0  # Hessian-vector products (each four gradients)
        self.notes: list[str] = []
        self._T = self._term_count()

    # ----------------------------------------------------------------- basics
    @property
    def n_params(self) -> int:
        """``P``: the parameters of the whole model (all ranks)."""
        return self.N

    def shard_plan(self) -> dict[str, Any]:
        """What one rank holds (the same numbers on every rank): with ``P_r`` the largest rank's entries
        and ``b`` bytes per entry, the weights' shard, its saved copy and a gradient shard are
        ``3 · P_r · b`` (``model_bytes``); each solver vector is one more shard (``vector_bytes``); and
        while FSDP runs one unit (a transformer block, or a top-level child) it gathers that unit's whole
        parameters (``gathered_entries``, the largest unit).  Activations of one data chunk come on top."""
        with inner.sharded(self.group):
            p_r = int(inner.allmax(torch.tensor([self.space.size], dtype=torch.int64))[0])
        units = shard_units(self.module)
        inside = {id(p) for u in units for p in u.parameters()}
        sizes = [sum(int(p.numel()) for p in u.parameters()) for u in units]  # DTensor: the whole tensor's
        sizes.append(sum(int(p.numel()) for p in self.module.parameters() if id(p) not in inside))
        b = torch.finfo(self.dtype).bits // 8
        return {"world": self.world, "n_params": self.N, "entries_per_rank": p_r, "bytes_per_entry": b,
                "model_bytes": 3 * p_r * b, "vector_bytes": p_r * b, "gathered_entries": max(sizes),
                "chunks": len(self._chunks)}

    def _term_count(self) -> float:
        total = torch.zeros(1, dtype=torch.float64)
        for x, y in self._chunks:
            x, y = split_labels(x, y, isinstance(self.loss_obj, _losses.ModelOwnLoss))
            total += float(self.loss_obj.term_count(y, batch_len(x)))
        if self.scale != 1.0:
            with inner.sharded(self.group):
                total = inner.allsum(total)
        return float(total[0])

    def _chunk_sum(self, x: Any, y: Tensor | None, with_output: bool = False) -> Any:
        """``Σ ℓ`` of one chunk (``with_output``: with the model's return and the targets)."""
        own = isinstance(self.loss_obj, _losses.ModelOwnLoss)
        x, y = split_labels(x, y, own)
        if isinstance(x, Mapping):
            out = self.module(**x)
        elif own:
            out = self.module(x, labels=y)
        else:
            out = self.module(x)
        if own:
            s = unwrap_loss(out) * self.loss_obj.term_count(y, batch_len(x))
        else:
            out = unwrap_logits(out)
            s = self.loss_obj.chunk_sum(out, y, x)
        return (s, out, y) if with_output else s

    def _set(self, flat: Tensor, v: Tensor | None = None, h: float = 0.0) -> None:
        """The model's shard set to ``flat`` (+ ``h v``), tensor by tensor (no full temporary)."""
        reshard(self.module)
        with torch.no_grad():
            for name, s in self.space.slices().items():
                loc = _local(self.named[name])
                loc.copy_(flat[s].reshape(loc.shape))
                if v is not None:
                    loc.add_(v[s].reshape(loc.shape), alpha=h)

    def grad_shifted(self, v: Tensor, h: float) -> Tensor:
        """The local shard of ``∇L(w + h v)`` (weights restored after)."""
        self._set(self._w0, v, h)
        try:
            return self.grad()
        finally:
            self._set(self._w0)

    def subset(self, index: Tensor) -> "ShardedObjective":
        """The same sharded model on the samples ``index`` of the selection (m-sharpness: one per
        sub-batch), sharing the model and the saved weights' shard (no parameter-sized copy).  A subset
        with fewer samples than ranks is computed whole on every rank (each rank the same data)."""
        idx = torch.as_tensor(index).cpu()
        x = {k: v[idx] for k, v in self._inputs.items()} if isinstance(self._inputs, Mapping) else self._inputs[idx]
        y = self._targets[idx] if self._targets is not None else None
        return ShardedObjective(self.module, x, y, self.loss_obj, group=self.group, chunk_size=self._chunk_size,
                                bn_mode=self.bn_mode, copy=False, rel_step=self.rel_step, _saved=self._w0)

    @property
    def denominator(self) -> float:
        """``T``: the loss terms of the whole selection."""
        return self._T

    def loss(self, w: Tensor | None = None) -> float:
        """``L(w)`` (``w``: a local shard; default the model's weights)."""
        return self.evaluate(w)[0]

    def evaluate(self, w: Tensor | None = None) -> tuple[float, float | None]:
        """``(L(w), accuracy)`` over the whole selection (accuracy ``None`` where undefined)."""
        if w is not None:
            self._set(w)
        try:
            sums = torch.zeros(3, dtype=torch.float64)  # [Σ loss, Σ correct, Σ predictions]
            has_acc = True
            with analysis_mode(self.module, self.bn_mode), torch.no_grad():
                for x, y in self._chunks:
                    s, out, yy = self._chunk_sum(x, y, with_output=True)
                    sums[0] += float(s)
                    hit = self.loss_obj.correct(out, yy) if has_acc else None
                    if hit is None:
                        has_acc = False
                    else:
                        sums[1] += float(hit[0])
                        sums[2] += float(hit[1])
            if self.scale != 1.0:
                with inner.sharded(self.group):
                    sums = inner.allsum(sums)
            acc = float(sums[1] / sums[2]) if has_acc and float(sums[2]) > 0 else None
            return float(sums[0]) / self._T, acc
        finally:
            if w is not None:
                self._set(self._w0)

    def grad_flat(self, w: Tensor | None = None, count: bool = True) -> Tensor:
        """The local shard of ``∇L(w)`` (as :meth:`grad`; ``count`` is accepted for the Objective's signature)."""
        return self.grad(w)

    def grad(self, w: Tensor | None = None) -> Tensor:
        """The local shard of ``∇L(w)`` (``w`` default: the model's weights; restored exactly after)."""
        return self._backward(w, with_loss=False)[1]

    def value_and_grad(self, w: Tensor | None = None) -> tuple[float, Tensor]:
        """``(L(w), local shard of ∇L(w))`` from one forward and backward per chunk (as :meth:`evaluate`
        and :meth:`grad` give them; weights restored exactly after)."""
        loss, g = self._backward(w, with_loss=True)
        assert loss is not None
        return loss, g

    def _backward(self, w: Tensor | None, with_loss: bool) -> tuple[float | None, Tensor]:
        """One forward and backward per chunk at ``w``: the local gradient shard, and with ``with_loss`` the
        mean loss (its sum all-reduced when the data are split over the ranks)."""
        if w is not None:
            self._set(w)
        try:
            for p in self.named.values():
                p.grad = None
            total = torch.zeros(1, dtype=torch.float64)
            with analysis_mode(self.module, self.bn_mode):
                for x, y in self._chunks:
                    s = self._chunk_sum(x, y)
                    if with_loss:
                        total += float(s.detach())
                    (s * (self.scale / self._T)).backward()
            out = torch.cat([(_local(p.grad) if p.grad is not None else torch.zeros_like(_local(p))).reshape(-1)
                             for p in self.named.values()])
            for p in self.named.values():
                p.grad = None
            self.n_grad += 1
            if not with_loss:
                return None, out
            if self.scale != 1.0:
                with inner.sharded(self.group):
                    total = inner.allsum(total)
            return float(total[0]) / self._T, out
        finally:
            if w is not None:
                self._set(self._w0)

    def flat_params(self) -> Tensor:
        """This rank's shard of ``w`` (a copy)."""
        return self._w0.clone()

    def current_shard(self) -> Tensor:
        """The shard the model holds now (equal to :meth:`flat_params` between calls: weights are restored)."""
        reshard(self.module)
        return self.space.flatten(self.named).detach().clone()

    def evaluate_at(self, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor] | None = None
                    ) -> tuple[float, float | None]:
        """``(L, accuracy)`` with the parameters' shards set to ``params`` (``{name: this rank's shard}``,
        as :func:`local_state` gives) and the named ``buffers`` (whole: FSDP2 leaves buffers unsharded) set
        too; weights and buffers restored exactly after."""
        saved = {n: b.detach().clone() for n, b in self.module.named_buffers()} if buffers else {}
        try:
            with torch.no_grad():
                for n, t in (buffers or {}).items():
                    self.module.get_buffer(n).copy_(t)
            return self.evaluate(self.space.flatten(params).to(self.dtype))
        finally:
            with torch.no_grad():
                for n, t in saved.items():
                    self.module.get_buffer(n).copy_(t)

    def hessian(self) -> "ShardedHessian":
        """The Hessian as a curvature operator on shards (finite-difference products)."""
        return ShardedHessian(self)


class ShardedPath:
    """A :class:`ShardedObjective` as :func:`sam_probe.core.paths.interpolate` reads an objective: states
    hold every parameter as this rank's shard (:meth:`local`) and the buffers whole, and each point is one
    sharded evaluation (:meth:`ShardedObjective.evaluate_at`).  The interpolation is elementwise, so each
    shard of ``w(a)`` is bit for bit the one-process value; only the loss sums are reduced over ranks."""

    def __init__(self, obj: ShardedObjective):
        self.obj = obj
        self.space = obj.space
        self.device, self.dtype = obj.device, obj.dtype
        self.buffers = {n: b.detach() for n, b in obj.module.named_buffers()}

    def local(self, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``state`` (whole tensors) with every parameter cut to this rank's shard (buffers kept whole)."""
        out = {n: t for n, t in state.items() if n in self.buffers}
        out.update(local_state(self.space, state, self.obj.rank, self.obj.world))
        return out

    def with_params(self, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor] | None = None) -> "_At":
        return _At(self.obj, params, buffers)


class _At:
    def __init__(self, obj: ShardedObjective, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor] | None):
        self.obj, self.params, self.buffers = obj, params, buffers

    def evaluate(self) -> tuple[float, float | None]:
        return self.obj.evaluate_at(self.params, self.buffers)


def inner_size(n: int, group: Any) -> int:
    with inner.sharded(group):
        return inner.size(n)


def _take(x: Any, a: int, b: int) -> Any:
    if isinstance(x, Mapping):
        return {k: v[a:b] for k, v in x.items()}
    return x[a:b]


class ShardedHessian(CurvatureOperator):
    """``H = ∇²L(w)`` of a :class:`ShardedObjective`, applied to local shards ``[P_r, b]`` (module docstring).

    Its ``space`` is the :class:`ShardSpace`, so :meth:`restrict` gives the diagonal block of named tensors
    on shards (this rank's rows of them, possibly none; per-layer spectra, :mod:`sam_probe.core.per_layer`)."""

    exact = False

    def __init__(self, obj: ShardedObjective):
        super().__init__("hessian", obj.space.size, obj.dtype, obj.device, space=obj.space)
        self.obj = obj
        self.shard_group = obj.group  # the solvers sum inner products over it (core/inner.py)
        self._w0_norm: float | None = None

    def step(self, v: Tensor) -> float:
        """``h`` for direction ``v`` (module docstring; norms over all ranks)."""
        N = self.obj.N
        with inner.sharded(self.shard_group):
            if self._w0_norm is None:  # the saved weights never change: one reduction for the operator's life
                self._w0_norm = inner.norm(self.obj._w0)
            nv = inner.norm(v)
        rms = self._w0_norm / math.sqrt(max(N, 1))
        return self.obj.rel_step * max(rms, 0.01) * math.sqrt(N) / nv if nv > 0 else 0.0

    def _difference(self, v: Tensor, h: float) -> tuple[Tensor, float]:
        """``(D(h), ‖g₊‖ + ‖g₋‖)``: the weights set to ``w ± h v`` slice by slice (no shifted copy of ``w``),
        the difference formed in ``g₊``'s memory."""
        plus = self.obj.grad_shifted(v, h)
        minus = self.obj.grad_shifted(v, -h)
        with inner.sharded(self.shard_group):
            size = sum(inner.norms(plus, minus))
        return plus.sub_(minus).div_(2 * h), size

    def _matmat(self, V: Tensor) -> Tensor:
        out = torch.zeros_like(V)
        err = torch.zeros(V.shape[1], dtype=torch.float64)
        eps = float(torch.finfo(V.dtype).eps)
        for j in range(V.shape[1]):
            v = V[:, j]
            h = self.step(v)
            if h == 0.0:
                continue
            with inner.sharded(self.shard_group):
                out[:, j], err[j], _ = extrapolated_difference(lambda hh, v=v: self._difference(v, hh), h, eps,
                                                               inner.norms)
            self.obj.n_hvp += 1
        self.last_product_error = err
        return out
