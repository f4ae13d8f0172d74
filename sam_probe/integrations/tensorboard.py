"""A command's results to TensorBoard: ``sam-probe ANALYSIS ... --tensorboard DIR``.

One event file per command in ``DIR`` (``tensorboard --logdir DIR``), one scalar per
:func:`~sam_probe.integrations.scalars.points` entry: tag ``RUN/ANALYSIS/NAME``, ``global_step`` the
checkpoint's step.  Written with ``torch.utils.tensorboard`` (needs the ``tensorboard`` package).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from . import require


def check() -> None:
    """The ``tensorboard`` package is importable (a one-line error naming the install if not)."""
    require("tensorboard", "tensorboard", "--tensorboard")


def log_results(logdir: str | Path, analysis: Any, results: list[dict[str, Any]]) -> Path:
    """Write every scalar of ``results`` (of ``analysis``) to a new event file in ``logdir``; return ``logdir``."""
    from .scalars import all_points

    check()
    from torch.utils.tensorboard import SummaryWriter

    logdir = Path(logdir)
    logdir.mkdir(parents=True, exist_ok=True)
    writer = SummaryWriter(log_dir=str(logdir))
    try:
        for step, tag, value in all_points(analysis, results):
            writer.add_scalar(tag, value, global_step=step)
    finally:
        writer.close()
    return logdir
