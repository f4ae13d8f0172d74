"""Writing a state dict in the layouts real training code produces.

Used to ship one sample checkpoint per layout and by the tests; each writer
mimics what that tool saves (key names, prefixes, extra entries).
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
