"""Source ``deepspeed``: one DeepSpeed checkpoint folder (``global_stepN/``), ZeRO stage 0-3, read in one process.

DeepSpeed's ``engine.save_checkpoint(save_dir)`` writes ``save_dir/latest`` (the tag)
and ``save_dir/global_stepN/`` holding

- ``mp_rank_00_model_states.pt`` (stages 0-2) or ``zero_pp_rank_R_mp_rank_00_model_states.pt``
  (stage 3, one per rank): ``module`` (the model's state dict; under ZeRO-3 its
  parameters are empty placeholders), ``buffer_names``, ``param_shapes`` (one ordered
  ``name -> shape`` map per optimizer group), ``frozen_param_shapes`` /
  ``frozen_param_fragments``, ``shared_params`` (tied alias -> name), ``global_steps``;
- ``[bf16_]zero_pp_rank_R_mp_rank_00_optim_states.pt``, one per data-parallel rank R:
  ``optimizer_state_dict`` with ``zero_stage``, ``partition_count`` and the rank's fp32
  master weights, flat: ``single_partition_of_fp32_groups`` (stages 1-2, one flat tensor
  per group) or ``fp32_flat_groups`` (stage 3).

Every file is read by the restricted loader of :mod:`...formats` (DeepSpeed's own
objects, e.g. its loss scaler, stay inert placeholders; nothing of DeepSpeed is
imported, and it need not be installed), verified and hashed in one pass.  The fp32
master weights are rebuilt as DeepSpeed's ``zero_to_fp32`` documents them: stages 1-2
concatenate the ranks' partitions of each group and cut it into the group's parameters
in order (the group's end padded to a multiple of 2 x ranks); stage 3 gives each
parameter ``ceil(numel / ranks)`` entries on every rank, concatenated over ranks and cut
to its size.  Every count is checked against the shapes before anything is cut (an
inconsistent folder is one error, never a misread).  Buffers come from ``module``; tied
aliases from ``shared_params``.  Without optimizer files (stage 0, or weights-only
saves) ``module`` itself is the state dict.  The step is ``global_steps`` of the model
states, else the ``global_stepN`` name.
"""
from __future__ import annotations

import hashlib
import math
import os
import re
from pathlib import Path
from typing import Any

from ...errors import CheckpointError
from ..files import display
from .base import FOLDER, Source

MODEL_STATES = re.compile(r"^(?:zero_pp_rank_(\d+)_)?mp_rank_(\d+)_model_states\.pt$")
OPTIM_STATES = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
TAG_RE = re.compile(r"^global_step(\d+)$")
MAX_RANKS = 4096
MAX_PARAMS = 1_000_000


def _listing(folder: Path) -> tuple[list[tuple[int, Path]], list[tuple[int, Path]]]:
    """``(model state files, optimizer state files)`` of model-parallel rank 0, each as (dp rank, path)."""
    models, optims = [], []
    for f in folder.iterdir():
        m = MODEL_STATES.match(f.name)
        if m and int(m.group(2)) == 0:
            models.append((int(m.group(1) or 0), f))
        o = OPTIM_STATES.match(f.name)
        if o and int(o.group(2)) == 0:
            optims.append((int(o.group(1)), f))
    return sorted(models), sorted(optims)


def claims(path: Path) -> bool:
    """A folder holding DeepSpeed's model states of model-parallel rank 0."""
    return path.is_dir() and (os.path.lexists(path / "mp_rank_00_model_states.pt")
                              or os.path.lexists(path / "zero_pp_rank_0_mp_rank_00_model_states.pt"))


def files(folder: Path) -> list[Path]:
    models, optims = _listing(folder)
    out = [f for _, f in models + optims]
    outside = [f.name for f in out if not (f.is_file() and f.resolve().parent == folder.resolve())]
    if outside:
        raise CheckpointError(f"{display(folder)}: {outside[0]!r} is not a regular file inside the folder (a link "
                              "leading out of it, or not a file); refused")
    return out


def digest(folder: Path) -> str:
    """sha256 over the names and sha256s of the files read (remembered per unchanged file)."""
    from .torch_file import file_digest

    h = hashlib.sha256()
    for f in files(folder):
        h.update(f.name.encode("utf-8", "surrogateescape") + b"\0" + file_digest(f).encode() + b"\n")
    return h.hexdigest()


class _Bad(Exception):
    pass


def _need(ok: bool, why: str) -> None:
    if not ok:
        raise _Bad(why)


def _shape(v: Any) -> tuple[int, ...]:
    """A saved shape (``torch.Size`` / list / tuple of non-negative ints)."""
    _need(isinstance(v, (tuple, list)) and len(v) <= 64 and all(type(d) is int and 0 <= d < 2**40 for d in v),
          "a parameter shape is not a list of sizes")
    return tuple(v)


def _shapes(groups: Any) -> list[list[tuple[str, tuple[int, ...]]]]:
    _need(isinstance(groups, (list, tuple)) and all(isinstance(g, dict) for g in groups), "param_shapes is not a "
          "list of name -> shape maps")
    out = [[(k, _shape(v)) for k, v in g.items()] for g in groups]
    _need(all(isinstance(k, str) for g in out for k, _ in g), "a parameter name is not text")
    _need(sum(len(g) for g in out) <= MAX_PARAMS, f"more than {MAX_PARAMS:,} parameters")
    return out


def _flat(v: Any, what: str) -> Any:
    import torch

    _need(isinstance(v, torch.Tensor) and v.dim() == 1 and v.is_floating_point(), f"{what} is not a flat "
          "floating-point tensor")
    return v


def _rebuild(stage: int, world: int, shapes: list[list[tuple[str, tuple[int, ...]]]], flat: list[list[Any]]) -> dict:
    """The fp32 parameters from every rank's flat groups (module docstring); counts checked before cutting."""
    import torch

    out: dict[str, Any] = {}
    if stage <= 2:
        _need(all(len(r) == len(shapes) for r in flat), "the ranks' flat groups do not match param_shapes")
        align = 2 * world
        for g, group in enumerate(shapes):
            full = torch.cat([_flat(r[g], f"group {g}") for r in flat])
            need = sum(math.prod(s) for _, s in group)
            _need(align * math.ceil(need / align) == align * math.ceil(full.numel() / align) and need <= full.numel(),
                  f"group {g} holds {full.numel():,} values for {need:,} parameters")
            at = 0
            for name, s in group:
                n = math.prod(s)
                out[name] = full[at:at + n].view(s)
                at += n
        return out
    per_rank = [torch.cat([_flat(t, "a flat group") for t in r]) if r else torch.zeros(0) for r in flat]
    _need(len({t.numel() for t in per_rank}) == 1, "the ranks hold flat groups of different sizes")
    merged = [item for group in shapes for item in group]
    need = sum(math.ceil(math.prod(s) / world) for _, s in merged)
    _need(need == per_rank[0].numel(), f"each rank holds {per_rank[0].numel():,} values, the shapes need {need:,}")
    at = 0
    for name, s in merged:
        n = math.prod(s)
        part = math.ceil(n / world)
        out[name] = torch.cat([t[at:at + part] for t in per_rank])[:n].view(s)
        at += part
    return out


def load(folder: Path, *, key: str | None = None, trust: bool = False):
    """A DeepSpeed checkpoint folder as one :class:`~sam_probe.loading.state.Checkpoint` (module docstring)."""
    from ..formats import finish, read_file
    from ..plaindata import plain
    from ..state import Checkpoint, check_tensors, find_hparams, strip_prefixes
    from ..steps import as_step

    if key:
        raise CheckpointError(f"{display(folder)}: --key does not apply to a DeepSpeed folder (its weights are "
                              "rebuilt from the model and optimizer states)")
    models, optims = _listing(folder)
    files(folder)  # every file a regular one inside the folder
    ranks = [r for r, _ in models]
    if not models or ranks != list(range(len(models))):
        raise CheckpointError(f"{display(folder)}: model state files of ranks {ranks[:8]} are not 0..{len(models) - 1}; "
                              "copy the whole folder")
    if len(models) > MAX_RANKS or len(optims) > MAX_RANKS:
        raise CheckpointError(f"{display(folder)}: more than {MAX_RANKS} ranks; refused")
    placeholders: list[str] = []
    formats: set[str] = set()

    def read(f: Path) -> Any:
        r = read_file(f, trust=trust)
        finish(f, r, {})
        placeholders.extend(p for p in r.placeholders if p not in placeholders)
        formats.add(r.format)
        return r.obj

    states = [read(f) for _, f in models]
    main = states[0]
    try:
        _need(isinstance(main, dict) and isinstance(main.get("module"), dict), "the model states hold no 'module'")
        module = {k: v for k, v in main["module"].items() if hasattr(v, "dtype")}
        buffer_names = main.get("buffer_names") or []
        _need(isinstance(buffer_names, (list, tuple, set)), "buffer_names is not a list")
        if optims:
            _need([r for r, _ in optims] == list(range(len(optims))), "optimizer state files are not ranks 0..R-1")
            osds = [read(f) for _, f in optims]
            _need(all(isinstance(o, dict) and isinstance(o.get("optimizer_state_dict"), dict) for o in osds),
                  "an optimizer state file holds no optimizer_state_dict")
            inner = [o["optimizer_state_dict"] for o in osds]
            stage = inner[0].get("zero_stage")
            world = inner[0].get("partition_count")
            world = max(world) if isinstance(world, list) and world and all(type(w) is int for w in world) else world
            _need(type(stage) is int and stage in (1, 2, 3), f"unknown zero_stage {str(stage)[:20]!r}")
            _need(type(world) is int and world == len(osds), f"partition_count {str(world)[:20]} but "
                  f"{len(osds)} optimizer state files")
            groups_key = "fp32_flat_groups" if stage == 3 else "single_partition_of_fp32_groups"
            flat = [i.get(groups_key) for i in inner]
            _need(all(isinstance(g, (list, tuple)) for g in flat), f"{groups_key} is missing")
            state = _rebuild(stage, world, _shapes(main.get("param_shapes")), [list(g) for g in flat])
            layout = f"deepspeed-zero{stage}"
        else:
            state = dict(module)
            layout = "deepspeed"
        state.update({k: v for k, v in module.items() if k in buffer_names and k not in state})
        frozen = main.get("frozen_param_shapes") or {}
        if frozen and optims:
            _need(isinstance(frozen, dict), "frozen_param_shapes is not a map")
            frags = [s.get("frozen_param_fragments") or {} for s in states]
            for name, s in frozen.items():
                s = _shape(s)
                import torch

                parts = [f.get(name) for f in frags]
                tensors = [p for p in parts if isinstance(p, torch.Tensor)]
                _need(len(tensors) == len(parts), f"frozen parameter {str(name)[:80]} has no fragment")
                whole = torch.cat([p.reshape(-1) for p in tensors])
                _need(whole.numel() >= math.prod(s), f"frozen parameter {str(name)[:80]} is short")
                state[name] = whole[:math.prod(s)].view(s)
        shared = main.get("shared_params") or {}
        if isinstance(shared, dict):
            for alias, name in shared.items():
                if isinstance(alias, str) and name in state:
                    state[alias] = state[name]
    except _Bad as exc:
        raise CheckpointError(f"{display(folder)}: not a consistent DeepSpeed checkpoint ({exc}); copy the whole "
                              "folder") from None
    check_tensors(folder, state)
    state, stripped = strip_prefixes(state)
    step = as_step(main.get("global_steps"))
    source = "content:global_steps"
    if step is None:
        m = TAG_RE.match(folder.name)
        step, source = (as_step(m.group(1)), "filename") if m else (None, "position")
        if step is None:
            source = "position"
    hparams = find_hparams(main)
    ds_config = plain(main.get("ds_config")) if isinstance(main, dict) else None
    if isinstance(ds_config, dict):
        opt = ds_config.get("optimizer")
        if isinstance(opt, dict) and isinstance(opt.get("params"), dict) and "lr" in opt["params"]:
            hparams.setdefault("lr", opt["params"]["lr"])
    from ..state import count_nonfinite

    return Checkpoint(
        path=str(folder), format="+".join(sorted(formats)), layout=layout, state=state, step=step,
        step_source=source, extra_keys=[k for k in main if isinstance(k, str) and k != "module"][:100],
        hparams=hparams, model_spec=None, placeholders=placeholders, stripped_prefixes=stripped, trusted=trust,
        source=SOURCE.name, digest=digest(folder),
        scanned={n: count_nonfinite(t) for n, t in state.items() if t.is_floating_point() or t.is_complex()})


SOURCE = Source(
    name="deepspeed", kind=FOLDER, order=20,
    summary="DeepSpeed checkpoint folder global_stepN/ (ZeRO 0-3): fp32 weights rebuilt from every rank's "
            "optimizer partitions, buffers from the model states",
    load=load, digest=digest, files=files, claims=claims,
    step="model states global_steps, else the global_stepN folder name",
)
