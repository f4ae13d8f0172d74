"""Checkpoint writers for the tests and the sample runs (not part of the sam_probe package).

``save_in_layout`` writes a state dict in the layouts real training code produces
(each writer mimics what that tool saves: key names, prefixes, extra entries);
``save_deepspeed`` writes DeepSpeed's documented ZeRO checkpoint layout
(``sam_probe/loading/sources/deepspeed.py``) without DeepSpeed installed.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

LAYOUTS = ("plain", "model-key", "lightning", "ddp", "compiled", "ddp-compiled", "safetensors", "namespace", "legacy")


def _prefixed(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {prefix + k: v for k, v in state.items()}


def save_in_layout(state: dict[str, Tensor], path: str | Path, layout: str, *, step: int | None = None,
                   hparams: dict[str, Any] | None = None) -> Path:
    """Save ``state`` at ``path`` the way ``layout`` (see :data:`LAYOUTS`) does."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    hp = dict(hparams or {})
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    writers: dict[str, Callable[[], None]] = {
        "plain": lambda: torch.save(state, path),
        "model-key": lambda: torch.save({"model": state, "step": step, "hparams": hp}, path),
        # Lightning: 'state_dict' with the LightningModule attribute prefix, plus trainer bookkeeping.
        "lightning": lambda: torch.save({
            "epoch": 0 if step is None else step // 100, "global_step": step, "pytorch-lightning_version": "2.4.0",
            "state_dict": _prefixed(state, "model."), "optimizer_states": [], "lr_schedulers": [],
            "hyper_parameters": hp, "callbacks": {}, "loops": {}}, path),
        "ddp": lambda: torch.save({"state_dict": _prefixed(state, "module."), "iteration": step}, path),
        "compiled": lambda: torch.save({"model_state_dict": _prefixed(state, "_orig_mod."), "step": step}, path),
        "ddp-compiled": lambda: torch.save({"net": _prefixed(state, "module._orig_mod."), "step": step}, path),
        "namespace": lambda: torch.save({"model": state, "args": argparse.Namespace(**hp), "step": step}, path),
        "legacy": lambda: torch.save({"model": state, "step": step}, path, _use_new_zipfile_serialization=False),
    }
    if layout == "safetensors":
        from safetensors.torch import save_file

        meta = {"format": "pt"}
        if step is not None:
            meta["step"] = str(step)
        if hp:
            meta["hparams"] = json.dumps(hp, default=str)
        save_file(state, str(path), metadata=meta)
    elif layout in writers:
        writers[layout]()
    else:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    return path


def _zero_partitions(flat: Tensor, world: int, align: int) -> list[Tensor]:
    """``flat`` padded to a multiple of ``align`` and cut into ``world`` equal partitions."""
    padded = torch.cat([flat, torch.zeros((-flat.numel()) % align, dtype=flat.dtype)])
    return list(padded.chunk(world))


def save_deepspeed(state: dict[str, Tensor], save_dir: str | Path, *, step: int, stage: int = 2, world: int = 2,
                   buffers: tuple[str, ...] = (), groups: int = 1, shared: dict[str, str] | None = None,
                   bf16: bool = False, loss_scaler: bool = True) -> Path:
    """``save_dir/global_step{step}/`` as DeepSpeed's ``save_checkpoint`` lays it out (``latest`` beside it).

    Parameters (every tensor not in ``buffers``) are split into ``groups`` optimizer groups in order;
    stage 1-2: each group flat, padded to a multiple of 2 x world, cut into ``world`` partitions;
    stage 3: each parameter padded to a multiple of ``world`` and cut, each rank's pieces concatenated.
    ``loss_scaler`` pickles an object of a DeepSpeed class (kept inert by sam-probe)."""
    import math
    from collections import OrderedDict

    save_dir = Path(save_dir)
    tag = save_dir / f"global_step{step}"
    tag.mkdir(parents=True, exist_ok=True)
    (save_dir / "latest").write_text(f"global_step{step}")
    params = [(k, v.detach().float().contiguous()) for k, v in state.items() if k not in buffers]
    per = math.ceil(len(params) / groups)
    split = [params[i:i + per] for i in range(0, len(params), per)]
    shapes = [OrderedDict((k, torch.Size(v.shape)) for k, v in g) for g in split]
    module = {k: (v.clone() if k in buffers else (torch.empty(0) if stage == 3 else v.detach().half()))
              for k, v in state.items()}
    model_states = {"module": module, "buffer_names": list(buffers), "optimizer": None, "param_shapes": shapes,
                    "frozen_param_shapes": None, "shared_params": dict(shared or {}), "frozen_param_fragments": None,
                    "lr_scheduler": {"last_epoch": step}, "global_steps": step, "global_samples": 8 * step,
                    "skipped_steps": 0, "dp_world_size": world, "mp_world_size": 1, "ds_version": "0.19.8",
                    "ds_config": {"train_batch_size": 8, "optimizer": {"type": "Adam", "params": {"lr": 1e-3}},
                                  "zero_optimization": {"stage": stage}}}
    names = ([f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(world)] if stage == 3
             else ["mp_rank_00_model_states.pt"])
    for n in names:
        torch.save(model_states, tag / n)
    scaler = _deepspeed_object("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler",
                               cur_scale=65536.0, cur_iter=step) if loss_scaler else None
    if stage == 3:
        pieces: list[list[Tensor]] = [[] for _ in range(world)]
        for _, v in params:
            for r, part in enumerate(_zero_partitions(v.reshape(-1), world, world)):
                pieces[r].append(part)
        flat = [[torch.cat(p)] for p in pieces]
    else:
        flat = [[] for _ in range(world)]
        for g in split:
            for r, part in enumerate(_zero_partitions(torch.cat([v.reshape(-1) for _, v in g]), world, 2 * world)):
                flat[r].append(part.clone())
    key = "fp32_flat_groups" if stage == 3 else "single_partition_of_fp32_groups"
    for r in range(world):
        osd = {"zero_stage": stage, "partition_count": world if stage == 3 else [world] * len(split),
               key: flat[r], "base_optimizer_state": {"state": {}, "param_groups": [{"lr": 1e-3}]},
               "loss_scaler": scaler, "dynamic_loss_scale": True, "overflow": False}
        with _fake_modules(scaler):
            torch.save({"optimizer_state_dict": osd, "ds_config": model_states["ds_config"], "ds_version": "0.19.8"},
                       tag / f"{'bf16_' if bf16 else ''}zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
    return tag


def _deepspeed_object(module: str, name: str, **state: Any) -> Any:
    """An object whose class is named ``module.name`` (DeepSpeed's own, which need not be installed)."""
    cls = type(name, (), {"__module__": module, "__qualname__": name})
    obj = cls()
    obj.__dict__.update(state)
    return obj


class _fake_modules:
    """Makes the class of ``obj`` importable by its name while pickling it (pickle checks that it is)."""

    def __init__(self, obj: Any):
        self.cls = type(obj) if obj is not None and type(obj).__module__.startswith("deepspeed") else None
        self.added: list[str] = []

    def __enter__(self):
        import sys
        import types

        if self.cls is not None:
            parts = self.cls.__module__.split(".")
            for i in range(1, len(parts) + 1):
                name = ".".join(parts[:i])
                if name not in sys.modules:
                    sys.modules[name] = types.ModuleType(name)
                    self.added.append(name)
            setattr(sys.modules[self.cls.__module__], self.cls.__qualname__, self.cls)
        return self

    def __exit__(self, *exc):
        import sys

        for name in self.added:
            sys.modules.pop(name, None)
