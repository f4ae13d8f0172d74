"""A model whose parameters get memory only as shards (``--shard-model``): built on the meta device,
sharded, then filled with each rank's rows of the checkpoint.

:func:`params_on_meta`: while active, every parameter a module registers becomes a meta-device
parameter of the same shape, dtype and ``requires_grad`` (one that is already on the meta device,
a tied weight assigned a second time, is registered as it is, so ties survive).  Buffers are left
as the constructor makes them: a checkpoint need not hold the non-persistent ones (causal masks,
rotary tables), so their real values must come from the constructor.  A constructor's full-size
tensor lives only until it is registered, so the build's peak is the largest single tensor, not the
model; initialisers then run on meta tensors (no work).

:func:`materialise_shards`: after ``fully_shard`` of such a module over ``R`` ranks, allocate this
rank's shards (``to_empty``; the buffers are kept) and copy in rows ``torch.chunk(t, R, 0)[r]`` of
each checkpoint tensor ``t``.  So a rank holds ``P / R`` parameter entries and never the whole model;
from a memory-mapped file (safetensors, a Hugging Face folder) only those rows' pages are read.  A
checkpoint read lazily (a DCP folder) passes ``rows``, which reads just those rows from the files
(:class:`sam_probe.loading.state.LazyRows`), so the checkpoint is never whole in any rank's memory.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn


@contextlib.contextmanager
def params_on_meta() -> Iterator[None]:
    """Parameters registered inside the block are meta-device parameters (module docstring)."""
    original = nn.Module.register_parameter

    def register(self: nn.Module, name: str, param: Any) -> None:
        if isinstance(param, nn.Parameter) and type(param) is nn.Parameter and not param.is_meta:
            param = nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=param.requires_grad)
        original(self, name, param)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def has_meta_params(module: nn.Module) -> bool:
    return any(p.is_meta for p in module.parameters())


def rows_of(t: Tensor, world: int, rank: int) -> Tensor:
    """Rank ``rank``'s rows of ``t`` as FSDP2 shards it: ``torch.chunk(t, world, 0)[rank]`` (empty past
    the last chunk; a 0-d tensor is one row): :func:`sam_probe.core.sharded_states.shard_of`."""
    from .sharded_states import shard_of

    return shard_of(t, world, rank)


def row_range(n: int, world: int, rank: int) -> tuple[int, int]:
    """Rows ``[r0, r1)`` of a dimension of ``n`` that :func:`rows_of` gives rank ``rank``."""
    from .sharded_states import chunk_rows

    r0 = min(n, rank * (-(-n // world) if n else 0))
    return r0, r0 + chunk_rows(n, world, rank)


def materialise_shards(module: nn.Module, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor],
                       device: torch.device | str, world: int, rank: int,
                       rows: Callable[[str, Tensor, int, int], Tensor] | None = None) -> None:
    """Allocate the shards of an FSDP2-sharded meta-parameter ``module`` on ``device`` and fill them with
    this rank's rows of ``params`` (by parameter name); buffers keep their values, overwritten by
    ``buffers`` where the checkpoint has them.  Every parameter must be in ``params``.
    ``rows(name, t, r0, r1)``: rows ``[r0, r1)`` of ``params[name]`` (:func:`row_range`; for a lazy
    checkpoint whose ``params`` are meta tensors), called one parameter at a time; a 0-d tensor is
    asked for as one row."""
    missing = [n for n, _ in module.named_parameters() if n not in params]
    if missing:
        raise KeyError(f"no checkpoint tensor for parameter {missing[0]!r}")
    kept = {n: b for n, b in module.named_buffers()}
    module.to_empty(device=device)  # FSDP's own _apply points its shards at the new memory
    with torch.no_grad():
        for n, b in module.named_buffers():
            src = buffers.get(n, kept.get(n))
            if src is not None:
                b.copy_(src)
        for n, p in module.named_parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            t = params[n]
            if rows is None:
                mine = rows_of(t, world, rank)
            else:
                mine = rows(n, t, *row_range(t.shape[0] if t.dim() else 1, world, rank))
            local.copy_(mine.reshape(local.shape))
