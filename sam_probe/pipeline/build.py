"""Building what a unit computes on: the model, the data selection and the objective.

Each is built from the choices of :mod:`~sam_probe.pipeline.boundary` and, in a
process that runs many commands (``batch`` workers), kept in the
:class:`ProcessCache`, keyed by everything it depends on.
"""
from __future__ import annotations

import contextlib
import copy
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import SamProbeError, SpecError, opt
from . import blame
from .boundary import saved_factory_args

if TYPE_CHECKING:
    from ..core.objective import Objective
    from ..loading.checkpoints import Checkpoint
    from ..loading.data import DataSelection
    from .session import Session


class ProcessCache:
    """What may be reused across the commands one process runs (``batch`` workers):
    data selections, built models and objectives, keyed by everything they depend on.
    Off by default: a single command needs none of it."""

    def __init__(self, enabled: bool = False, max_objectives: int = 2):
        self.enabled = enabled
        self.data: dict[str, Any] = {}
        self.models: dict[str, Any] = {}
        self.objectives: dict[str, Any] = {}
        self.max_objectives = max_objectives

    def clear(self) -> None:
        self.data.clear()
        self.models.clear()
        self.objectives.clear()


CACHE = ProcessCache()


def file_identity(path: str | Path) -> tuple[int, int]:
    """``(size, mtime_ns)``: a cheap identity of a file for the process cache (stored keys use sha256)."""
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def build_model(session: Session, ck: Checkpoint, meta_params: bool = False) -> nn.Module:
    """The model of ``ck``: seeded init (the checkpoint's weights are matched on top later).
    ``meta_params``: its parameters on the meta device (:func:`sam_probe.core.meta_init.params_on_meta`,
    for ``--shard-model``; not cached)."""
    from ..core.meta_init import params_on_meta
    from ..loading import hf
    from ..loading.bounded_build import Budget
    from ..loading.models import build_model as build, factory_for

    from ..loading import peft

    if peft.is_adapter(ck):  # a LoRA adapter on the --base-model (loading/peft.py)
        return peft.build_model(session, ck)
    s = session.settings
    name, args = session.model_spec(ck)
    where = params_on_meta() if meta_params else contextlib.nullcontext()
    if hf.is_hf_spec(name):  # Hugging Face: the config.json beside the weights (loading/hf.py)
        torch.manual_seed(s.seed)
        with where:
            return hf.build_model(ck.path, name, args, budget=Budget.of(ck.state))
    args = saved_factory_args(factory_for(name), ck.hparams, args)
    key = repr((name, sorted(args.items(), key=lambda kv: kv[0]), s.seed))
    if CACHE.enabled and key in CACHE.models and not meta_params:
        return copy.deepcopy(CACHE.models[key])
    torch.manual_seed(s.seed)
    with where:
        model = build(name, args, strict=not s.model, budget=Budget.of(ck.state))  # strict: the checkpoint chose it
    if CACHE.enabled and not meta_params:
        CACHE.models[key] = copy.deepcopy(model)
    return model


def sharded_build(session: Session, ck: Checkpoint) -> nn.Module:
    """``--shard-model``: the model with meta-device parameters (each rank then allocates only its shards),
    or, where its constructor cannot build that way, the whole model (said in a note)."""
    from ..loading import peft

    if peft.is_adapter(ck):
        return build_model(session, ck)
    try:
        return build_model(session, ck, meta_params=True)
    except SamProbeError:
        raise
    except Exception as exc:  # a constructor that computes with its parameters: build it whole
        session.note(f"{opt('shard_model')}: the model could not be built with its parameters on the meta device "
                     f"({blame.first_line(exc, 100)}); every rank builds it whole before sharding")
        return build_model(session, ck)


def select_data(session: Session, ck: Checkpoint | None) -> DataSelection:
    """The data selection (loaded once per session, or once per process in ``batch``)."""
    from ..loading.data import load_data

    s = session.settings
    spec, args = session.data_spec(ck)
    key = repr((spec, sorted(args.items()), s.split, s.max_samples, s.seed))
    pool = CACHE.data if CACHE.enabled else session.data_pool
    if key not in pool:
        pool[key] = load_data(spec, split=s.split, max_samples=s.max_samples, seed=s.seed, options=args,
                              named_by=None if s.data or ck is None else ck.path)
    session.used_data = {"data": spec, "data_args": args, "n_samples": len(pool[key])}
    return pool[key]


def bn_batch_note(bn_mode: str, has_bn: bool, n: int, batch_size: int | None, world: int) -> str | None:
    """What the BatchNorm batch is under ``--bn-mode train`` when it is not the whole selection of ``n``
    samples: the ``--batch-size`` chunks, or each rank's shard when ``world`` ranks split it (with no
    ``--batch-size``, or fewer chunks than ranks); ``None`` when it is the whole selection."""
    if bn_mode != "train" or not has_bn:
        return None
    if batch_size and batch_size < n:
        note = (f"{opt('bn_mode', 'train')} with {opt('batch_size', batch_size)}: each chunk of {batch_size} samples "
                f"is a BatchNorm batch, so results depend on {opt('batch_size')} (drop it for one batch of all "
                f"{n} samples)")
        if world > 1 and -(-n // batch_size) < world:
            note += f"; with {world} ranks and fewer chunks than ranks, each rank's shard is one"
        return note
    if world > 1 and n > 1:
        return (f"{opt('bn_mode', 'train')} over {world} ranks: each rank's shard (about {n // world} of the {n} "
                "samples) is a BatchNorm batch, so results depend on the number of ranks (run one process for one "
                "batch of all samples, or pass a batch size that gives every rank whole chunks)")
    return None


def build_objective(session: Session, ck: Checkpoint, model: nn.Module | None = None,
                    data: DataSelection | None = None) -> Objective:
    """The loss of checkpoint ``ck`` over the session's data as an :class:`Objective` (cached per process)."""
    from .. import distributed
    from ..core.objective import Objective
    from ..loading.data import STREAM_CHUNK
    from ..loading.losses import resolve_loss as import_loss

    s = session.settings
    key = None
    if CACHE.enabled and model is None and data is None:
        key = repr((ck.path, file_identity(ck.path), s.key, s.model, sorted(s.model_args.items()),
                    session.data_spec(ck), s.split, s.max_samples, s.seed, s.loss, s.dtype, s.bn_mode,
                    s.batch_size, s.max_memory, s.hvp, str(session.device), s.base_model, s.merge_adapter,
                    s.shard_model))
        if key in CACHE.objectives:
            obj, session.used_data = CACHE.objectives[key]
            obj.n_grad = obj.n_hvp = 0
            return obj
    model = model or (sharded_build(session, ck) if s.shard_model else session.build_model(ck))
    data = data or session.data(ck)
    has_bn = any(isinstance(mod, nn.modules.batchnorm._BatchNorm) for mod in model.modules())
    world = distributed.world_size() if distributed.active() else 1
    note = bn_batch_note(s.bn_mode, has_bn, len(data), s.batch_size, world)
    if note:
        session.note(note)
    m = session.matched(ck, model)
    from ..core.meta_init import has_meta_params

    if has_meta_params(model):  # --shard-model: only the buffers are real until the shards are allocated
        for mod in model.modules():
            for bn, b in list(mod._buffers.items()):
                if b is not None:
                    mod._buffers[bn] = b.to(session.device)
    else:
        model.to(session.device)
    from ..core.precision import is_half

    if is_half(session.dtype):  # the module's own (unused) tensors need not stay float32 beside the half copy
        model.to(dtype=session.dtype)
    from ..loading.data import check_token_ids, unused_fields

    check_token_ids(data, model)
    if unused := unused_fields(data, model):
        session.note(f"data fields {', '.join(unused[:8])} are not arguments of {type(model).__name__}.forward, "
                     "which takes **kwargs and may ignore them")
    try:
        name, fn = import_loss(session.loss_name(ck, data, model))
    except SpecError as exc:
        if s.loss or not ck.hparams.get("loss"):
            raise
        raise SpecError(f"{ck.path}: the loss the checkpoint names cannot be used ({exc}); pass {opt('loss')} "
                        "yourself") from None
    if s.shard_model:
        obj = sharded_objective(session, ck, model, data, m, fn or name, name if fn else None)
        if key is not None:
            CACHE.objectives[key] = (obj, session.used_data)
        return obj
    chunk = s.batch_size or (data.chunk_hint or STREAM_CHUNK if data.streamed else None)
    from ..core.precision import upcast_note

    if note := upcast_note(list(m.params.values()) + list(m.buffers.values()), session.dtype):
        session.note(note)  # before the copy is made
    try:
        obj = Objective(model, data.batches(), None, fn or name, loss_name=name if fn else None,
                        params=m.params, buffers=m.buffers, bn_mode=s.bn_mode, chunk_size=chunk,
                        dtype=session.dtype, device=session.device, hvp_method=s.hvp)
        obj.check_inputs()
        if s.max_memory:
            from ..core.memory import fit_memory
            obj = fit_memory(obj, s.max_memory, s.batch_size, session.memory_plans)
    except SamProbeError:
        raise
    except Exception as exc:
        # the probe runs the model and the loss on two samples: a failure inside the model or the data, or
        # of a torch operation on their tensors, is a mismatch of the inputs; a Python error in sam-probe's
        # own code is its bug (the unit runner says so, never "check --model")
        if blame.blame(exc).who not in ("model", "data", "code", "library"):
            raise
        raise SpecError(f"{ck.path}: the model does not accept the data ({blame.first_line(exc, 160)})"
                        f"{_integer_hint(exc, data)}; check {opt('model')}/{opt('model_args')} against "
                        f"{opt('data')}") from None
    for n in obj.notes:
        session.note(n)
    if key is not None:
        while len(CACHE.objectives) >= CACHE.max_objectives:
            CACHE.objectives.pop(next(iter(CACHE.objectives)))
        CACHE.objectives[key] = (obj, session.used_data)
    return obj


def sharded_objective(session: Session, ck: Checkpoint, model: nn.Module, data: DataSelection, m: Any,
                      loss: Any, loss_name: str | None) -> Any:
    """``--shard-model``: the checkpoint's weights put into ``model`` (built for this unit, so it is
    ours to change), which FSDP2 then shards over the ranks (:mod:`sam_probe.core.sharded`)."""
    from ..core.precision import is_half
    from ..core.sharded import ShardedObjective

    s = session.settings
    if data.streamed:
        raise SpecError(f"{opt('shard_model')} needs the data selection in memory (a .pt/.npz file, digits, or a "
                        f"factory returning tensors); pass {opt('max_samples')} for a selection of a streamed set")
    if s.hvp == "fwd-rev":
        raise SpecError(f"{opt('hvp')} {s.hvp}: a sharded model has no double backward; its Hessian products are "
                        f"finite differences ({opt('hvp')} fd)")
    if is_half(session.dtype):
        raise SpecError(f"{opt('shard_model')} with {opt('dtype')} {s.dtype}: finite-difference products need "
                        "float32 or float64 here")
    from ..core.meta_init import has_meta_params, materialise_shards
    from ..core.sharded import fully_shard_model

    built = "every rank built the whole model, then sharded it"
    if ck.lazy is not None and not has_meta_params(model):  # built whole: every rank reads the whole tensors
        m.params, m.buffers = _read_whole(session, ck, m.params), _read_whole(session, ck, m.buffers)
    if has_meta_params(model):  # each rank allocates and reads only its shards (core/meta_init.py)
        import torch.distributed as dist

        model.to(dtype=session.dtype)  # meta parameters and the real buffers
        fully_shard_model(model, device=session.device)
        if ck.lazy is not None:
            built = _materialise_lazy(session, ck, model, m)
        else:
            materialise_shards(model, m.params, m.buffers, session.device, dist.get_world_size(), dist.get_rank())
            built = "built on the meta device, each rank allocated and read only its shard of the weights"
    else:
        with torch.no_grad():
            for n, t in m.params.items():
                model.get_parameter(n).copy_(t)
            for n, t in m.buffers.items():
                try:
                    model.get_buffer(n).copy_(t)
                except AttributeError:  # a buffer the model does not register
                    continue
        model.to(device=session.device, dtype=session.dtype)
    obj = ShardedObjective(model, data.inputs, data.targets, loss, loss_name=loss_name, chunk_size=s.batch_size,
                           bn_mode=s.bn_mode, copy=False, dtype=session.dtype)
    session.note(f"{opt('shard_model')}: {built} (rank 0 holds {obj.space.size:,} of the {obj.N:,} parameter "
                 "entries); gradients through FSDP's backward; Hessian products, where the analysis takes them, "
                 "are their finite differences (Richardson-extrapolated; their error is part of every residual)")
    plan = obj.shard_plan()  # (collective: every rank)
    session.shard_plan = plan
    session.note(f"memory per rank (of {plan['world']}): weights, their saved copy and a gradient "
                 f"{_mib(plan['model_bytes'])}, {_mib(plan['vector_bytes'])} per solver vector (k + c of them; "
                 f"the unit's solver plan), one FSDP unit of {plan['gathered_entries']:,} parameters gathered at a "
                 f"time, and the activations of one of {plan['chunks']} data chunks")
    return obj


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _read_whole(session: Session, ck: Checkpoint, tensors: dict[str, Any]) -> dict[str, Any]:
    """The whole tensors behind a lazy checkpoint's meta tensors (every rank reads the same, so the non-finite
    refusal is the same on every rank); tensors not from the checkpoint are kept."""
    from ..loading.state import count_nonfinite

    lazy = ck.lazy
    assert lazy is not None
    out = {n: lazy.rows(t) if lazy.owns(t) else t for n, t in tensors.items()}
    session.refuse_nonfinite(ck.path, {n: c for n, t in out.items() if lazy.owns(tensors[n])
                                       and (t.is_floating_point() or t.is_complex()) and (c := count_nonfinite(t))})
    return out


def _materialise_lazy(session: Session, ck: Checkpoint, model: nn.Module, m: Any) -> str:
    """Fill a sharded meta model from a lazy checkpoint (a DCP folder): each rank reads only the items holding its
    rows of each parameter (and the buffers whole), scanning the rows it reads.  Ranks then agree: a read error
    or non-finite entries on any rank are the same one-line error on every rank (the lowest failing rank's
    error; the counts summed over ranks); returns what the note says."""
    import torch.distributed as dist

    from ..core.meta_init import materialise_shards
    from ..errors import CheckpointError
    from ..loading.state import count_nonfinite

    lazy = ck.lazy
    assert lazy is not None
    world, rank = dist.get_world_size(), dist.get_rank()
    bad: dict[str, int] = {}
    error: str | None = None
    read0, kept0 = lazy.bytes_read, lazy.bytes_kept  # the counts of this materialisation

    def rows(name: str, t: Any, r0: int, r1: int) -> Any:
        x = lazy.rows(t, r0, r1) if lazy.owns(t) else t.reshape(-1, *t.shape[1:])[r0:r1]
        if lazy.owns(t) and (x.is_floating_point() or x.is_complex()) and (c := count_nonfinite(x)):
            bad[name] = c
        return x

    try:
        buffers = {n: lazy.rows(b) if lazy.owns(b) else b for n, b in m.buffers.items()}
        if rank == 0:  # every rank reads the buffers whole: counted once
            bad.update({n: c for n, b in buffers.items() if lazy.owns(m.buffers[n])
                        and (b.is_floating_point() or b.is_complex()) and (c := count_nonfinite(b))})
        materialise_shards(model, m.params, buffers, session.device, world, rank, rows=rows)
    except SamProbeError as exc:
        error = str(exc)
    except Exception as exc:  # noqa: BLE001 - every rank must reach the gather below, or the others wait forever
        error = f"{ck.path}: reading this rank's rows failed ({blame.first_line(exc, 160)})"
    seen: list[Any] = [None] * world
    dist.all_gather_object(seen, (error, bad, lazy.bytes_read - read0, lazy.bytes_kept - kept0))
    errors = [e for e, _, _, _ in seen if e]
    if errors:
        raise CheckpointError(errors[0])
    total: dict[str, int] = {}
    for _, counts, _, _ in seen:
        for n, c in counts.items():
            total[n] = total.get(n, 0) + c
    session.refuse_nonfinite(ck.path, {n: total[n] for n in m.params if n in total} |
                             {n: c for n, c in total.items() if n not in m.params})
    stored = sum(t.numel() * t.element_size() for t in ck.state.values())
    kept = ", ".join(f"{k:,}" for _, _, _, k in seen)
    read = ", ".join(f"{r:,}" for _, _, r, _ in seen)
    return (f"built on the meta device, and each rank kept only its rows of the DCP checkpoint's parameters "
            f"(buffers whole), reading only the stored items that hold them (bytes of weights kept per rank: {kept} "
            f"of {stored:,}; bytes of stored items read per rank: {read})")


def _integer_hint(exc: BaseException, data: DataSelection) -> str:
    """Why integer inputs may not fit: they are passed as they are (token ids), not cast to floats."""
    x, msg = (data.inputs if not data.streamed else None), str(exc)
    if isinstance(x, torch.Tensor) and not x.is_floating_point() and ("dtype" in msg.lower() or "Long" in msg):
        return "; integer inputs are passed as they are (token ids): store float inputs for other models"
    return ""
