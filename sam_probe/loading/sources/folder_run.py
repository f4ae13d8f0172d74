"""Source ``folder-run``: a run directory whose checkpoints are folders named by their step.

A Hugging Face Trainer output (``checkpoint-500/``, ``checkpoint-1000/``), a DeepSpeed
save directory (``global_step100/``, ``global_step200/`` beside ``latest``), a torchtitan
``checkpoint/`` folder of ``torch.distributed.checkpoint`` saves (``step-100/``), or any
directory of folder checkpoints of another registered source whose names carry a step:
every such sub-folder that a folder source claims is one checkpoint of the run, in the
order of the step in its name (``checkpoint-500`` before ``checkpoint-1000``); each one's
own source then reads its step from its content.  A folder without a step in its name
(``final_model/``) is not part of the run.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from .base import RUN, Source


def members(target: Path, is_folder_checkpoint: Callable[[Path], bool]) -> list[Path] | None:
    """The run's checkpoint folders by the step in their names, or ``None``."""
    from ..steps import step_from_name

    found = []
    for d in target.iterdir():
        if d.name.startswith(".") or not d.is_dir():
            continue
        step = step_from_name(d.name)
        if step is not None and is_folder_checkpoint(d):
            found.append((step, d.name, d))
    return [d for _, _, d in sorted(found)] or None


SOURCE = Source(
    name="folder-run", kind=RUN, order=10,
    summary="run directory of checkpoint folders named by step: Trainer checkpoint-N/, DeepSpeed global_stepN/, "
            "torchtitan / DCP step-N/",
    members=members, step="each folder's own source (trainer_state.json, DeepSpeed global_steps), by name order",
)
