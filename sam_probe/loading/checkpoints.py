"""Reading a checkpoint of any registered source into a flat state dict: the loading layer's front door.

``load_checkpoint(path)`` asks the source registry (:mod:`.sources`) which source
reads ``path`` (a torch file, a safetensors file, a Hugging Face folder, ...) and
returns its :class:`~.state.Checkpoint`: tensors with prefix-free names, format,
layout, step and where it came from, the sha256 keying its results and the NaN/Inf
scan, all from one verified pass over its bytes (:mod:`.verify`).
``file_sha256(path)`` is the same sha256 without loading.  Layouts, prefixes
and steps are described in :mod:`.state`; file formats in :mod:`.formats`.
"""
from __future__ import annotations

from pathlib import Path

from . import sources
from .formats import detect_format, read_object  # noqa: F401 - re-exported
from .state import (  # noqa: F401 - re-exported
    HPARAM_KEYS, STATE_KEYS, STEP_KEYS, STRIP_PREFIXES, Checkpoint, check_tensors, find_hparams, find_state,
    find_step, overlap_problem, step_from_name, strip_prefixes)


def load_checkpoint(path: str | Path, *, key: str | None = None, trust: bool = False, lazy: bool = False
                    ) -> Checkpoint:
    """Read ``path`` safely through its source and return its tensors with format, layout and step.
    ``lazy``: where the source can (a DCP folder), meta tensors whose rows ``ck.lazy`` reads on demand."""
    return sources.load(path, key=key, trust=trust, lazy=lazy)


def file_sha256(path: str | Path) -> str:
    """sha256 identifying the checkpoint at ``path`` (a file's bytes, or a folder's files); FIFOs and devices
    are refused, never read; remembered per unchanged file, so loading and keying read a file once."""
    return sources.digest(path)
