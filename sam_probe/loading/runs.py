"""A CHECKPOINT argument: one checkpoint, or a run of them sorted by step (discovery: :mod:`.sources`)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import sources
from .sources import discover  # noqa: F401 - re-exported

CHECKPOINT_SUFFIXES = sources.suffixes()


@dataclass
class RunInfo:
    """Where a set of checkpoints came from: the label results are stored under."""

    target: Path
    label: str


def run_label(target: str | Path) -> str:
    """The run's label (``--run-name``, else its shortest informative path suffix; see run_names.py)."""
    from ..run_names import label_for

    return label_for(target)
