"""Finishing a command: JSON or tables, failures on stderr, plots, exit code."""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from ..report import console
from .options import Common

EXIT_BAD_INPUT = 2
STATUS_FILE_ENV = "SAM_PROBE_STATUS_FILE"  # set by `sam-probe batch`: one JSON line per unit is appended there


def record_statuses(outcomes: list) -> None:
    """Append ``{path, step, status, error, stored_at}`` per unit to ``$SAM_PROBE_STATUS_FILE`` (if set)."""
    from .. import distributed

    target = os.environ.get(STATUS_FILE_ENV)
    if not target or not distributed.is_main():
        return
    with open(target, "a") as fh:
        for o in outcomes:
            fh.write(json.dumps({"path": o.path, "step": o.step, "status": o.status,
                                 "error": o.error or o.store_error, "stored_at": o.stored_at,
                                 "seconds": o.seconds}) + "\n")


def report_failures(outcomes: list, quiet: bool = False, debug: bool = False) -> int:
    """Print one line per failed unit (and one for results that could not be stored) on stderr;
    return how many problems there were."""
    failed = [o for o in outcomes if o.status == "failed"]
    for o in failed:
        if debug and o.trace:
            console.err.print(o.trace, markup=False, highlight=False)
        console.error(o.error or "failed", o.details if not quiet else None)
    store_errors = list(dict.fromkeys(o.store_error for o in outcomes if o.store_error))
    for msg in store_errors:
        console.error(msg)
    return len(failed) + len(store_errors)


def finish(common: Common, outcomes: list, payload: dict[str, Any],
           show: Callable[[], None] | None = None, plot: Callable[[Path], list[Path]] | None = None) -> None:
    """Print ``payload`` (JSON) or the tables from ``show``; write plots; exit 2 on any failure."""
    from ..results import jsonable

    out = common.output
    record_statuses(outcomes)
    if out.json:
        console.print_json(jsonable(payload))
    elif not out.quiet and show is not None:
        show()
    stored = common.settings.store and not any(o.store_error for o in outcomes)
    if plot is not None and out.plot and stored:
        try:
            written = plot(Path(common.settings.out) / "plots")
        except Exception as exc:  # noqa: BLE001 - a figure must never lose computed results
            if out.debug:
                import traceback

                console.err.print(traceback.format_exc(), markup=False, highlight=False)
            console.warn(f"plotting failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                         "results are stored, run `sam-probe report` to retry")
            written = []
        if written and not out.quiet and not out.json:
            console.err.print("plots: " + ", ".join(str(p) for p in written), highlight=False)
    from .. import distributed  # rank 0 alone prints; every rank exits alike
    failed = (report_failures(outcomes, out.quiet, out.debug) if distributed.is_main()
              else sum(o.status == "failed" or bool(o.store_error) for o in outcomes))
    if failed:
        raise typer.Exit(EXIT_BAD_INPUT)


def results_of(outcomes: list) -> list[dict[str, Any]]:
    """The result dicts of the units that ran or were read from the store, in step order."""
    return [o.result for o in outcomes if o.result is not None]
