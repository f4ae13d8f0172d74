"""What happened to one unit, and turning an exception into that record (the error boundary's output)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import Interrupted, SamProbeError, interrupt_seen
from . import blame


@dataclass
class UnitOutcome:
    """What happened to one unit: ``ok`` (computed), ``reused`` (already stored under the same key:
    read back, not computed) or ``failed``.

    ``store_error`` is set when the unit was computed but could not be written
    (its result is still shown); ``trace`` holds the traceback of an unexpected
    failure (shown with ``--debug``).
    """

    path: str
    step: int | None
    status: str
    result: dict[str, Any] | None = None
    error: str | None = None
    details: list[tuple[str, str, str]] | None = None
    stored_at: str | None = None
    store_error: str | None = None
    seconds: float | None = None
    trace: str | None = None


OK, REUSED, FAILED = "ok", "reused", "failed"
LEGACY_REUSED = "skipped"  # how batch's JSON has always spelled REUSED (a contract: kept beside ``reused``)

Progress = Callable[[str, int, int], None]


def no_progress(msg: str, done: int, total: int) -> None:
    return None


def failure(path: Any, step: int | None, exc: BaseException) -> UnitOutcome:
    """A failed outcome for ``exc``: user errors as they are; an exception from the user's model, data
    or code as one line that says where to look; a sam-probe bug as one line that says so (the
    traceback kept for ``--debug``); see :mod:`sam_probe.pipeline.blame`.  After Ctrl-C, whatever
    ``exc`` is (a library may have swallowed the interrupt and failed later), the run ends as interrupted."""
    if interrupt_seen():
        raise Interrupted() from exc
    if isinstance(exc, SamProbeError):
        return UnitOutcome(str(path), step, FAILED, error=str(exc), details=getattr(exc, "rows", None))
    from .. import distributed

    if distributed.lost_peer(exc):  # the ranks no longer meet in the same collectives: end the run
        raise distributed.rank_lost(exc) from exc
    return UnitOutcome(str(path), step, FAILED, error=blame.explain(exc, str(path)), trace=blame.trace_of(exc))


def failed(target: Any, error: str | SamProbeError, step: int | None = None) -> UnitOutcome:
    """One failed outcome for ``target`` (a run, a pair, a checkpoint) with a one-line ``error``."""
    return UnitOutcome(str(target), step, FAILED, error=str(error), details=getattr(error, "rows", None))


def guarded(target: Any, fn: Callable[[], list[UnitOutcome]]) -> list[UnitOutcome]:
    """``fn()``, or one failed outcome for ``target`` when it raises a user error."""
    try:
        return fn()
    except SamProbeError as exc:
        return [failed(target, exc)]
