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
from .pipeline.session import Session
from .settings import Settings


def objective(checkpoint: str | Path, *, model: str | None = None, model_args: dict[str, Any] | None = None,
              data: str | None = None, data_args: dict[str, Any] | None = None, **settings: Any) -> Objective:
    """The loss of ``checkpoint`` over a data selection as an :class:`Objective`.

    ``settings`` are :class:`~sam_probe.settings.Settings` fields (``split``,
    ``max_samples``, ``batch_size``, ``loss``, ``device``, ``dtype``,
    ``bn_mode``, ``seed``, ``key``, ``trust_checkpoint``, ...).
    """
    s = Settings(model=model, model_args=dict(model_args or {}), data=data, data_args=dict(data_args or {}),
                 store=False, **settings)
    session = Session(s, command=["python-api"])
    return session.objective(session.load(checkpoint))


def analyze(name: str, *targets: str | Path, store: bool = False, **options: Any) -> dict[str, Any]:
    """Run the analysis ``name`` (any of :func:`sam_probe.analyses.names`) as its command would,
    and return what its ``--json`` prints.

    ``options`` are the analysis's own options by Python name (``top_k=3``, ``rho=0.1``; old names
    kept for a release, like ``alignment``'s ``eta`` for ``step_size``, still work)
    and :class:`~sam_probe.settings.Settings` fields (``data="digits"``, ``max_samples=500``,
    ``dtype="float64"``, ...); unknown names raise a :class:`~sam_probe.errors.SpecError`.
    Results are stored under ``out`` only with ``store=True``.

        >>> sp.analyze("sharpness", "sample_runs/digits-mlp-sgd", top_k=3)["results"][0]["eigenvalues"]
    """
    import dataclasses

    from . import analyses
    from .commands.runner import payload_of
    from .errors import SpecError, suggest
    from .pipeline.units import run_analysis

    analysis = analyses.get(name)
    own = {o.name: o.default for o in analysis.compute_options()}
    old = {f.lstrip("-").replace("-", "_"): o.name for o in analysis.compute_options() for f in o.hidden_flags}
    options = {(old[k] if k in old and k not in own and old[k] not in options else k): v for k, v in options.items()}
    fields = {f.name for f in dataclasses.fields(Settings)}
    unknown = [k for k in options if k not in own and k not in fields]
    if unknown:
        raise SpecError(f"{name}: unknown option {unknown[0]!r}{suggest(unknown[0], [*own, *fields])}")
    settings = Settings(store=store, **{k: v for k, v in options.items() if k in fields})
    cfg = analysis.impl.configure({**own, **{k: v for k, v in options.items() if k in own}}, settings)
    session = Session(settings, command=["python-api", "analyze", name])
    paths = [Path(t) for t in targets]
    outcomes = run_analysis(session, analysis, paths, cfg)
    errors = [o.error or "failed" for o in outcomes if o.status == "failed"]
    if errors and not any(o.result for o in outcomes):
        raise SpecError(errors[0])
    payload, _ = payload_of(analysis, outcomes, len(paths))
    if errors:
        payload = {**payload, "errors": errors}
    return payload
