"""Notebook entry points: an :class:`Objective` straight from a checkpoint path.

    >>> import sam_probe as sp
    >>> obj = sp.objective("sample_runs/digits-mlp-sam/step_000400.pt", data="digits", dtype="float64")
    >>> sp.top_eigen(obj, k=5, tol=1e-6).eigenvalues
    >>> sp.ratio_analysis(obj, rho=0.05).fractions

The same loading rules as the CLI apply (safe unpickling, layouts, prefixes,
model/data specs from the checkpoint when not given).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .core.objective import Objective
from .pipeline import Session, Settings


def objective(checkpoint: str | Path, *, model: str | None = None, model_args: dict[str, Any] | None = None,
              data: str | None = None, data_args: dict[str, Any] | None = None, **settings: Any) -> Objective:
    """The loss of ``checkpoint`` over a data selection as an :class:`Objective`.

    ``settings`` are :class:`~sam_probe.pipeline.Settings` fields (``split``,
    ``max_samples``, ``batch_size``, ``loss``, ``device``, ``dtype``,
    ``bn_mode``, ``seed``, ``key``, ``trust_checkpoint``, ...).
    """
    s = Settings(model=model, model_args=dict(model_args or {}), data=data, data_args=dict(data_args or {}),
                 store=False, **settings)
    session = Session(s, command=["python-api"])
    return session.objective(session.load(checkpoint))
