"""A command's results to Weights & Biases: ``sam-probe ANALYSIS ... --wandb PROJECT``.

One W&B run per command in ``PROJECT`` (job type: the analysis; config: the analysis's config and the
data settings), one ``wandb.log`` per checkpoint step with every
:func:`~sam_probe.integrations.scalars.points` entry of that step (keys ``RUN/ANALYSIS/NAME``; W&B's step
is the checkpoint's step).  Offline (files only, no network) with ``--wandb-offline``, with
``WANDB_MODE=offline``, or when no API key is set (``WANDB_API_KEY`` or ``wandb login``'s netrc entry):
the run is then written under ``WANDB_DIR`` (default: the results directory ``--out``) as
``wandb/offline-run-*`` and ``wandb sync`` uploads it later.
"""
from __future__ import annotations

import os
from itertools import groupby
from pathlib import Path
from typing import Any

from . import require

HOST = "api.wandb.ai"


def check() -> None:
    """The ``wandb`` package is importable (a one-line error naming the install if not)."""
    require("wandb", "wandb", "--wandb")


def has_api_key() -> bool:
    """Whether W&B could log in: ``WANDB_API_KEY`` set, or a netrc entry for its host (never read further)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        import netrc

        return netrc.netrc().authenticators(os.environ.get("WANDB_BASE_URL", HOST).split("//")[-1]) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def mode(offline: bool = False) -> str:
    """``offline`` when asked, when ``WANDB_MODE`` says so, or without an API key; else ``WANDB_MODE`` or online."""
    env = os.environ.get("WANDB_MODE")
    if offline:
        return "offline"
    if env:
        return env
    return "online" if has_api_key() else "offline"


def log_results(project: str, analysis: Any, results: list[dict[str, Any]], *, offline: bool = False,
                directory: str | Path | None = None, config: dict[str, Any] | None = None,
                name: str | None = None) -> dict[str, Any]:
    """Log every scalar of ``results`` (of ``analysis``) as one W&B run of ``project``; return
    ``{"mode", "dir", "id"}`` (``dir``: the run's local folder)."""
    from .scalars import all_points

    check()
    import wandb

    root = Path(os.environ.get("WANDB_DIR") or directory or ".")
    root.mkdir(parents=True, exist_ok=True)
    how: Any = mode(offline)  # wandb's Literal of modes
    run = wandb.init(project=project, dir=str(root), mode=how, job_type=analysis.name, name=name,
                     config={"analysis": analysis.name, "analysis_version": analysis.version, **(config or {})},
                     settings=wandb.Settings(silent=True, console="off", x_disable_stats=True),
                     reinit="create_new")
    try:
        for step, group in groupby(all_points(analysis, results), key=lambda p: p[0]):
            run.log({tag: value for _, tag, value in group}, step=step)
    finally:
        run.finish()
        # the run's files are written by W&B's service process: shutting it down waits until they are on disk
        # (otherwise a loaded machine may still be writing the offline run when the command returns)
        teardown = getattr(wandb, "teardown", None)
        if callable(teardown):
            teardown()
    return {"mode": how, "dir": str(Path(run.dir).parent), "id": run.id}
