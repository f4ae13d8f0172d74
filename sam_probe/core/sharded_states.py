"""Whole tensors to shards and back, for analyses under ``--shard-model`` (:mod:`.sharded`).

FSDP2 gives rank ``r`` of ``R`` the chunk ``torch.chunk(t, R, 0)[r]`` of every parameter
``t`` (dimension 0, chunks of ``⌈n/R⌉`` rows, the last ones shorter or empty), and a
parameter-sized vector is held as the concatenation of those chunks, tensor after tensor
(:class:`~.sharded.ShardSpace`).  Here:

- :func:`shard_of` / :func:`shard_vector`: a checkpoint's whole tensors reduced to this
  rank's shard (what ``distance`` and ``alignment``'s ``update`` vector need: the weights of
  another checkpoint, laid out as the model's shards);
- :func:`gather_full`: shards of every rank put together on rank 0 in the one-process
  layout (each tensor's chunks concatenated along dimension 0, tensors in order), for
  results that are stored whole (``subspace``'s eigenvectors);
- :func:`fits_on_main`: whether such a gathered array fits rank 0 (decided there, agreed by all).

Every function that communicates is collective over the shard group of :mod:`.inner`.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from . import inner


def chunk_rows(n: int, world: int, rank: int) -> int:
    """Rows of dimension ``n`` that ``torch.chunk(t, world, 0)[rank]`` holds (0 past the last chunk)."""
    size = math.ceil(n / world) if n else 0
    return max(0, min(size, n - rank * size)) if size else 0


def local_shape(shape: Sequence[int], world: int, rank: int) -> tuple[int, ...]:
    """The shape of rank ``rank``'s shard of a tensor of global ``shape``."""
    shape = tuple(int(s) for s in shape)
    if not shape:
        return (1,) if rank == 0 else (0,)
    return (chunk_rows(shape[0], world, rank), *shape[1:])


def shard_of(t: Tensor, world: int, rank: int) -> Tensor:
    """Rank ``rank``'s chunk of ``t`` along dimension 0 (a view; empty past the last chunk)."""
    if t.dim() == 0:
        t = t.reshape(1)
    rows = chunk_rows(t.shape[0], world, rank)
    size = math.ceil(t.shape[0] / world) if t.shape[0] else 0
    return t[rank * size:rank * size + rows]


def world_rank() -> tuple[int, int]:
    """``(R, r)`` of the shard group (``(1, 0)`` outside :func:`~.inner.sharded`)."""
    if not inner.active():
        return 1, 0
    import torch.distributed as dist

    from .inner import _GROUP

    group = _GROUP.get()
    return dist.get_world_size(group), dist.get_rank(group)


def shard_vector(state: Mapping[str, Tensor], names: Sequence[str], *, dtype: torch.dtype = torch.float64,
                 device: Any = None, world: int | None = None, rank: int | None = None) -> Tensor:
    """This rank's shard of the flat vector of ``state``'s tensors ``names`` (in that order), one tensor's
    chunk at a time (no whole-model temporary)."""
    if world is None or rank is None:
        world, rank = world_rank()
    parts = [shard_of(state[n].detach(), world, rank).reshape(-1).to(device=device, dtype=dtype) for n in names]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=dtype, device=device)


def gather_full(local: Tensor, shapes: Sequence[Sequence[int]]) -> Tensor | None:
    """Rank 0: the whole ``[P]`` (or ``[P, k]``) array in the one-process layout from every rank's shard
    ``local [P_r(, k)]`` of tensors of global ``shapes``; other ranks: ``None``.  Outside a shard group,
    ``local`` itself.  Column by column through :func:`~.sharded.gather_flat` (rank 0 holds the result
    and one shard's column at a time)."""
    if not inner.active():
        return local
    import torch.distributed as dist
    from types import SimpleNamespace

    from .inner import _GROUP
    from .sharded import gather_flat

    group = _GROUP.get()
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    numels = [math.prod(local_shape(s, world, rank)) for s in shapes]
    if sum(numels) != local.shape[0]:
        raise ValueError(f"a shard of {local.shape[0]} rows for tensors whose rank-{rank} chunks hold {sum(numels)}")
    space = SimpleNamespace(size=sum(numels), names=[str(i) for i in range(len(shapes))], numels=numels)
    cols = local.reshape(local.shape[0], -1)
    got = [gather_flat(cols[:, j], space, group) for j in range(cols.shape[1])]
    if got[0] is None:
        return None
    return torch.stack([g for g in got if g is not None], 1).reshape(-1, *local.shape[1:])


def available_bytes() -> int:
    """Memory this machine can still give (``MemAvailable``; physical pages where that is unknown)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 0


GATHER_SHARE = 0.25  # a gathered result may take this share of rank 0's available memory


def fits_on_main(nbytes: int, limit: int | None = None) -> bool:
    """Whether an array of ``nbytes`` may be gathered on rank 0: at most ``limit`` bytes (default a quarter of
    the memory rank 0 has available), decided by rank 0 and agreed by every rank."""
    ok = nbytes <= (limit if limit is not None else GATHER_SHARE * available_bytes())
    if not inner.active():
        return bool(ok)
    flag = torch.tensor([1.0 if ok and inner.rank() == 0 else 0.0], dtype=torch.float64)
    return bool(float(inner.allsum(flag)[0]) > 0)
