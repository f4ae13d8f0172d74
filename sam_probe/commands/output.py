"""Finishing a command: JSON or tables, failures on stderr, plots, exit code."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from ..pipeline import UnitOutcome, jsonable
from ..report import console
from .options import Common

EXIT_BAD_INPUT = 2


def report_failures(outcomes: list[UnitOutcome], quiet: bool = False) -> int:
    """Print one line per failed unit on stderr; return how many failed."""
    failed = [o for o in outcomes if o.status == "failed"]
    for o in failed:
        console.error(o.error or "failed", o.details if not quiet else None)
    return len(failed)


def finish(common: Common, outcomes: list[UnitOutcome], payload: dict[str, Any],
           show: Callable[[], None] | None = None, plot: Callable[[Path], list[Path]] | None = None) -> None:
    """Print ``payload`` (JSON) or the tables from ``show``; write plots; exit 2 on any failure."""
    out = common.output
    if out.json:
        console.print_json(jsonable(payload))
    elif not out.quiet and show is not None:
        show()
    if plot is not None and out.plot and common.settings.store:
        try:
            written = plot(Path(common.settings.out) / "plots")
        except Exception as exc:  # noqa: BLE001 - a figure must never lose computed results
            console.warn(f"plotting failed ({exc}); results are stored, run `sam-probe report` to retry")
            written = []
        if written and not out.quiet and not out.json:
            console.err.print("plots: " + ", ".join(str(p) for p in written), highlight=False)
    from .. import distributed  # rank 0 alone prints; every rank exits alike
    failed = report_failures(outcomes, out.quiet) if distributed.is_main() else sum(o.status == "failed" for o in outcomes)
    if failed:
        raise typer.Exit(EXIT_BAD_INPUT)


def results_of(outcomes: list[UnitOutcome]) -> list[dict[str, Any]]:
    """The result dicts of the units that ran or were read from the store, in step order."""
    return [o.result for o in outcomes if o.result is not None]
