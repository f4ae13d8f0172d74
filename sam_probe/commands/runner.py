"""Driving an analysis over one or more checkpoints/run directories with progress."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

from ..errors import SamProbeError
from ..pipeline import Session, UnitOutcome
from ..report import console
from .options import Common
from .output import finish, results_of


def open_session(common: Common, progress=None) -> Session:
    from .. import distributed

    session = Session(common.settings, progress=progress, quiet=common.output.quiet)  # joins the process group under torchrun
    if common.settings.trust_checkpoint and distributed.is_main():
        console.warn("--trust-checkpoint: fully unpickling; a malicious file can run code on this machine")
    return session


def shows_progress(common: Common) -> bool:
    return not (common.output.quiet or common.output.json)


@contextlib.contextmanager
def session_with_progress(common: Common) -> Iterator[Session]:
    """A :class:`Session` whose progress drives a rich bar on stderr (when shown)."""
    with console.progress(shows_progress(common)) as prog:
        yield open_session(common, prog)


def guarded(target: Any, fn: Callable[[], list[UnitOutcome]]) -> list[UnitOutcome]:
    """``fn()``, or one failed outcome for ``target`` when it raises a user error."""
    try:
        return fn()
    except SamProbeError as exc:
        return [UnitOutcome(str(target), None, "failed", error=str(exc), details=getattr(exc, "rows", None))]


def per_checkpoint(common: Common, targets: list[Path], analysis: str, config: dict[str, Any],
                   compute: Callable[..., dict[str, Any]]) -> list[UnitOutcome]:
    """``Session.per_checkpoint`` over every target; a target that cannot be read is one failed outcome."""
    outcomes: list[UnitOutcome] = []
    with session_with_progress(common) as session:
        for target in targets:
            outcomes += guarded(target, lambda t=target: session.per_checkpoint(analysis, t, config, compute))
    return outcomes


def whole_runs(common: Common, targets: list[Path], analysis: str, config: dict[str, Any],
               compute: Callable[..., dict[str, Any]], name: str = "run") -> list[UnitOutcome]:
    """``Session.whole_run`` once per target (load failures of single files are reported too)."""
    outcomes: list[UnitOutcome] = []

    def one(session: Session, target: Path) -> list[UnitOutcome]:
        unit, failed = session.whole_run(analysis, target, config, compute, name=name)
        return failed + [unit]

    with session_with_progress(common) as session:
        for target in targets:
            outcomes += guarded(target, lambda t=target: one(session, t))
    return outcomes


def warn_results(common: Common, outcomes: list[UnitOutcome]) -> None:
    """Show every result's ``warnings`` on stderr (never silently unconverged)."""
    if common.output.quiet:
        return
    for o in outcomes:
        for w in (o.result or {}).get("warnings", []) or []:
            console.warn(f"{Path(o.path).name}: {w}")


def finish_per_checkpoint(common: Common, outcomes: list[UnitOutcome], view: Any, **view_options: Any) -> None:
    """Warnings, then ``{"results": [...]}`` or ``view.show``'s tables, and ``view.plot``'s figures."""
    warn_results(common, outcomes)
    results = results_of(outcomes)
    finish(common, outcomes, {"results": results}, show=lambda: view.show(results, **view_options),
           plot=lambda d: view.plot(results, d))


def finish_whole_runs(common: Common, targets: list[Path], outcomes: list[UnitOutcome], view: Any,
                      is_result: Callable[[dict[str, Any]], bool] = lambda r: True) -> None:
    """One run: its result object as JSON; several: ``{"runs": [...]}``."""
    results = [o.result for o in outcomes if o.result is not None and is_result(o.result)]
    payload: dict[str, Any] = results[0] if len(targets) == 1 and results else {"runs": results}
    finish(common, outcomes, payload, show=lambda: view.show(results), plot=lambda d: view.plot(results, d))
