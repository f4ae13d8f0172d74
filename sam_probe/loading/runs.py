"""A CHECKPOINT argument: one file, or a run directory of checkpoint files sorted by step."""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError
from .checkpoints import step_from_name
from .files import display

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors", ".pkl", ".tar")


def discover(target: str | Path, glob: str | None = None) -> list[Path]:
    """Checkpoint files named by ``target`` (a file or a directory), in name order.

    In a directory every file with a checkpoint suffix is taken (not recursing),
    or those matching ``glob``; the caller orders them by step once loaded.
    Entries that are not regular files (a FIFO named ``x.pt``) are kept, so that
    loading reports them instead of skipping them silently; nothing is opened here.
    """
    p = Path(target)
    if not p.exists():
        raise CheckpointError(f"{display(p)}: no such file or directory")
    if not p.is_dir():  # a file, or a FIFO/device/socket that loading refuses with its own message
        return [p]
    if (folders := _hf_run(p)) is not None:  # Hugging Face folder checkpoint or Trainer run
        return folders
    files = [f for f in sorted(p.iterdir()) if not f.is_dir()]
    if glob:
        files = [f for f in files if fnmatch.fnmatch(f.name, glob)]
    else:
        files = [f for f in files if f.suffix.lower() in CHECKPOINT_SUFFIXES]
    if not files:
        what = f"matching {glob!r} " if glob else ""
        raise CheckpointError(f"{display(p)}: no checkpoint files {what}in this directory (use --glob PATTERN to "
                              "choose them)")
    named = [(step_from_name(f), f.name, f) for f in files]
    named.sort(key=lambda t: (t[0] is None, t[0] if t[0] is not None else 0, t[1]))
    return [f for _, _, f in named]


def _hf_run(p: Path) -> list[Path] | None:
    """``save_pretrained`` folder -> [it]; Trainer run -> its ``checkpoint-N/`` folders by N; else None."""
    from .hf import discover_run
    return discover_run(p)


@dataclass
class RunInfo:
    """Where a set of checkpoints came from: the label results are stored under."""

    target: Path
    label: str


def run_label(target: str | Path) -> str:
    """The run's label (``--run-name``, else its shortest informative path suffix; see run_names.py)."""
    from ..run_names import label_for

    return label_for(target)
