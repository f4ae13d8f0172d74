"""Source ``hf-trainer-run``: a Hugging Face Trainer output directory of ``checkpoint-N/`` folders.

Each ``checkpoint-N/`` that is a ``save_pretrained`` folder (:mod:`.hf_folder`) is one
checkpoint of the run, in the order of ``N`` (``checkpoint-500`` before
``checkpoint-1000``); each one's step is its ``trainer_state.json`` ``global_step``.
"""
from __future__ import annotations

from pathlib import Path

from . import hf_folder
from .base import RUN, Source


def members(target: Path) -> list[Path] | None:
    """The run's checkpoint folders by the step in their names, or ``None``."""
    runs = [(int(m.group(1)), d) for d in target.iterdir()
            if (m := hf_folder.RUN_DIR_RE.match(d.name)) and d.is_dir() and hf_folder.claims(d)]
    return [d for _, d in sorted(runs)] or None


SOURCE = Source(
    name="hf-trainer-run", kind=RUN, order=10,
    summary="Hugging Face Trainer output directory: its checkpoint-N/ save_pretrained folders, by N",
    members=members, step="each folder's trainer_state.json global_step",
)
