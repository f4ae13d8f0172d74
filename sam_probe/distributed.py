"""Data-parallel analyses with :mod:`torch.distributed` (gloo on CPU, nccl on CUDA).

Every rank loads the same (seeded) data selection and runs the same analysis
code; each :class:`~sam_probe.core.objective.Objective` sums its per-sample
losses, gradients and Hessian-vector products over its rank's contiguous shard
only, and the sums are all-reduced before the division by the global sample
count ``N``:

    L(w) = (1/N) Σ_r Σ_{i ∈ shard_r} ℓ_i(w),    H v = (1/N) Σ_r Σ_{i ∈ shard_r} ∇²ℓ_i(w) v

so every rank holds bit-identical results of every reduction, and the
eigensolvers, trace estimators and ratio code above (seeded CPU generators,
deterministic on identical inputs) take identical steps on every rank.  Rank 0
alone writes results and prints.

Launch with ``torchrun --nproc_per_node N -m sam_probe ...`` (``WORLD_SIZE`` in
the environment starts the group) or pass ``--distributed``.
"""
from __future__ import annotations

import atexit
import datetime
import os
import socket
import sys
from typing import Any

_STATE: dict[str, Any] = {"active": False, "backend": None}


def launched() -> bool:
    """True when a launcher (torchrun, ...) set ``WORLD_SIZE`` > 1 in the environment."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def free_port() -> int:
    """A TCP port free on this host right now (for single-host rendezvous in tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _dist():
    """``torch.distributed`` (imported on first use: the CLI starts without torch)."""
    import torch.distributed as dist

    return dist


def _group_up() -> bool:
    """Whether a process group exists (never imports torch: without torch loaded there is none)."""
    if "torch.distributed" not in sys.modules:
        return False
    dist = sys.modules["torch.distributed"]
    return dist.is_available() and dist.is_initialized()


def init(device: Any = None, backend: str | None = None, timeout_s: float = 1800) -> bool:
    """Join (or start) the process group once; returns whether it is active.

    Rendezvous is ``env://`` (``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``,
    ``WORLD_SIZE``, as torchrun sets them); without them a group of one process is
    made on a free local port.  Backend: ``nccl`` for CUDA devices, ``gloo`` otherwise.
    """
    import torch

    dist = _dist()
    if _STATE["active"]:
        return True
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this torch build")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_port())
    dev = torch.device(device) if device is not None and str(device) != "auto" else None
    if backend is None:
        backend = "nccl" if dev is not None and dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        kw: dict[str, Any] = {}
        if backend == "nccl" and dev is not None:
            torch.cuda.set_device(dev)
            kw["device_id"] = dev
        dist.init_process_group(backend=backend, init_method="env://",
                                timeout=datetime.timedelta(seconds=timeout_s), **kw)
    _STATE.update(active=True, backend=dist.get_backend())
    atexit.register(shutdown)
    return True


_LOST_WORDS = ("closed by peer", "connection reset by peer", "remote worker", "broken pipe",
               "failed to pass monitoredbarrier", "nccl communicator was aborted", "watchdog caught collective")


def lost_peer(exc: BaseException) -> bool:
    """Whether ``exc`` says a peer rank is gone (or this rank cannot go on with its peers: out of memory),
    in a multi-process group: the run must end, since the ranks no longer meet in the same collectives."""
    if not (active() and world_size() > 1):
        return False
    if isinstance(exc, MemoryError) or type(exc).__name__ in ("OutOfMemoryError", "DistNetworkError"):
        return True
    text = str(exc).lower()
    return any(w in text for w in _LOST_WORDS)


def rank_lost(exc: BaseException) -> BaseException:
    """The one-line :class:`~sam_probe.errors.RankLost` for ``exc`` (:func:`lost_peer`); the group is then
    left without the final barrier (a lost rank would never reach it)."""
    from .errors import RankLost

    _STATE["lost"] = True
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        why, own = f"rank {rank()} of {world_size()} ran out of memory ({first})", True
    else:
        why, own = f"one of the {world_size()} ranks died or left ({first})", False
    out = RankLost(f"{why}: the run stops here; every stored unit is whole, re-run the same command to resume")
    out.own = own  # type: ignore[attr-defined]
    return out


def shutdown() -> None:
    """Leave the process group (if this module started using one), after every rank got here:
    rank 0 hosts the rendezvous store, and a rank leaving early aborts the others."""
    if _STATE["active"] and _group_up():
        dist = _dist()
        try:
            if _STATE.get("lost"):
                pass  # a rank is gone: no barrier would complete
            elif dist.get_world_size() > 1 and dist.get_backend() == "gloo":
                dist.monitored_barrier(timeout=datetime.timedelta(seconds=60))  # names a rank that died
            elif dist.get_world_size() > 1:
                dist.barrier()
        finally:
            dist.destroy_process_group()
    _STATE.update(active=False, backend=None)


def active() -> bool:
    """True when analyses run data-parallel (after :func:`init`)."""
    return bool(_STATE["active"]) and _group_up()


def rank() -> int:
    """This process's rank (from the group, else ``RANK`` in the environment, else 0)."""
    if _group_up():
        return _dist().get_rank()
    return int(os.environ.get("RANK", "0") or 0)


def world_size() -> int:
    if _group_up():
        return _dist().get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")) or 0)


def is_main() -> bool:
    """True on rank 0 (and in every single-process run): the rank that writes and prints."""
    return rank() == 0


def rank_device(device: Any) -> Any:
    """``cuda`` without an index becomes ``cuda:LOCAL_RANK`` when launched with several processes."""
    import torch

    if device.type == "cuda" and device.index is None and (launched() or active()):
        return torch.device("cuda", local_rank() % max(1, torch.cuda.device_count()))
    return device


def shard_range(n: int, world: int, r: int, chunk: int | None = None) -> tuple[int, int]:
    """``[lo, hi)`` of rank ``r``'s contiguous shard of ``n`` samples.

    When ``chunk`` cuts the selection into at least ``world`` chunks, whole chunks
    are dealt out (``⌈n/chunk⌉`` chunks split as evenly as possible), so every chunk
    is the same as in one process (this matters for BatchNorm in ``train`` mode);
    otherwise the samples themselves are split as evenly as possible.
    """
    if world <= 1:
        return 0, n
    if chunk and 0 < chunk < n and -(-n // chunk) >= world:
        n_chunks = -(-n // chunk)
        lo_c, hi_c = (r * n_chunks) // world, ((r + 1) * n_chunks) // world
        return min(n, lo_c * chunk), min(n, hi_c * chunk)
    return (r * n) // world, ((r + 1) * n) // world


def all_reduce_sum(t: Any) -> Any:
    """In-place sum over ranks (a no-op without an active group); returns ``t``."""
    if active() and world_size() > 1:
        dist = _dist()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` as rank ``src`` has it, on every rank (unchanged without a group)."""
    if not (active() and world_size() > 1):
        return obj
    box = [obj]
    _dist().broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if active() and world_size() > 1:
        _dist().barrier()
