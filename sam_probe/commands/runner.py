"""Driving an analysis over one or more checkpoints/run directories with progress."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ..errors import SamProbeError
from ..pipeline import Session, UnitOutcome
from ..report import console
from .options import Common


def open_session(common: Common, progress=None) -> Session:
    from .. import distributed

    session = Session(common.settings, progress=progress)  # joins the process group under torchrun
    if common.settings.trust_checkpoint and distributed.is_main():
        console.warn("--trust-checkpoint: fully unpickling; a malicious file can run code on this machine")
    return session


def shows_progress(common: Common) -> bool:
    return not (common.output.quiet or common.output.json)


def per_checkpoint(common: Common, targets: list[Path], analysis: str, config: dict[str, Any],
                   compute: Callable[..., dict[str, Any]]) -> list[UnitOutcome]:
    """``Session.per_checkpoint`` over every target; a target that cannot be read is one failed outcome."""
    outcomes: list[UnitOutcome] = []
    with console.progress(shows_progress(common)) as prog:
        session = open_session(common, prog)
        for target in targets:
            try:
                outcomes += session.per_checkpoint(analysis, target, config, compute)
            except SamProbeError as exc:
                outcomes.append(UnitOutcome(str(target), None, "failed", error=str(exc),
                                            details=getattr(exc, "rows", None)))
    return outcomes


def whole_runs(common: Common, targets: list[Path], analysis: str, config: dict[str, Any],
               compute: Callable[..., dict[str, Any]], name: str = "run") -> list[UnitOutcome]:
    """``Session.whole_run`` once per target (load failures of single files are reported too)."""
    outcomes: list[UnitOutcome] = []
    with console.progress(shows_progress(common)) as prog:
        session = open_session(common, prog)
        for target in targets:
            try:
                unit, failed = session.whole_run(analysis, target, config, compute, name=name)
                outcomes += failed + [unit]
            except SamProbeError as exc:
                outcomes.append(UnitOutcome(str(target), None, "failed", error=str(exc),
                                            details=getattr(exc, "rows", None)))
    return outcomes


def warn_results(common: Common, outcomes: list[UnitOutcome]) -> None:
    """Show every result's ``warnings`` on stderr (never silently unconverged)."""
    if common.output.quiet:
        return
    for o in outcomes:
        for w in (o.result or {}).get("warnings", []) or []:
            console.warn(f"{Path(o.path).name}: {w}")
