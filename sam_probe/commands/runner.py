"""Running a declared analysis over the command line's targets, with progress, and finishing it."""
from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..analyses.base import CHECKPOINTS, PAIR, RUNS, Analysis
from ..report import console
from .options import Common
from .output import finish, results_of


def open_session(common: Common, progress=None, on_unit=None):
    from .. import distributed
    from ..pipeline import Session

    session = Session(common.settings, progress=progress, on_unit=on_unit,
                      warn=None if common.output.quiet else console.note_line)  # joins the process group under torchrun
    if common.settings.trust_checkpoint and distributed.is_main():
        console.warn("--trust-checkpoint: fully unpickling; a malicious file can run code on this machine")
    return session


def shows_progress(common: Common) -> bool:
    return not (common.output.quiet or common.output.json)


KEPT: list[str] = []  # units stored by the command running now (what an interrupt keeps)


@contextlib.contextmanager
def session_with_progress(common: Common) -> Iterator[Any]:
    """A Session whose progress drives a rich bar with ETA on a terminal and, when stderr is not
    a terminal (logs, CI, batch jobs), prints one line per finished unit with its time."""
    shown = shows_progress(common)
    lines = shown and not console.err.is_terminal

    def on_unit(outcome: Any) -> None:
        if outcome.stored_at and outcome.status == "ok":
            KEPT.append(outcome.stored_at)
        if lines:
            console.unit_line(outcome)

    with console.progress(shown) as prog:
        yield open_session(common, prog, on_unit)


def execute(analysis: Analysis, common: Common, targets: list[Path], cfg: dict[str, Any]) -> list[Any]:
    """Every unit of ``analysis`` over ``targets``: read back from the store or computed."""
    from ..pipeline import run_analysis

    with session_with_progress(common) as session:
        return run_analysis(session, analysis, targets, cfg)


def payload_of(analysis: Analysis, outcomes: list[Any], n_targets: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The JSON printed and the results shown: ``{"results": [...]}`` per checkpoint; a run's
    (or a pair's) result object, or ``{"runs": [...]}`` for several runs."""
    from ..pipeline import without_packed

    impl = analysis.impl
    is_result = getattr(impl, "is_result", lambda r: True)
    results = [with_schema(analysis, without_packed(r)) for r in results_of(outcomes) if is_result(r)]
    if analysis.target == CHECKPOINTS:
        return {"results": results}, results
    if analysis.target == PAIR or (analysis.target == RUNS and n_targets == 1):
        return (results[0] if results else {}), results
    return {"runs": results}, results


def with_schema(analysis: Analysis, result: dict[str, Any]) -> dict[str, Any]:
    """Every key of the declared schema present (``null`` where not computed), so the JSON of a
    fresh run and of one read back from the store have the same keys."""
    from ..pipeline import PACKED_KEYS

    return {**{k: None for k in analysis.schema if k not in ("warnings", *PACKED_KEYS)}, **result}


def run_command(analysis: Analysis, targets: list[Path], opts: dict[str, Any], common: Common) -> None:
    """What ``sam-probe NAME TARGETS ...`` does: configure, execute, then print, plot and exit."""
    compute_opts = {o.name: opts[o.name] for o in analysis.compute_options()}
    view_opts = {o.name: opts[o.name] for o in analysis.options if o.view}
    cfg = analysis.impl.configure(compute_opts, common.settings)
    t0 = time.perf_counter()
    KEPT.clear()
    outcomes = execute(analysis, common, targets, cfg)
    warn_results(common, outcomes)
    if shows_progress(common):
        console.summary_line(analysis.name, outcomes, time.perf_counter() - t0)
    payload, results = payload_of(analysis, outcomes, len(targets))
    view = analysis.view_impl()
    plot_opts = {k: v for k, v in view_opts.items() if k in _params(view.plot)}
    meta = figure_meta(analysis, cfg, common)
    from ..report import views

    finish(common, outcomes, payload, show=lambda: views.show(view, results, **view_opts),
           plot=lambda d: view.plot([{**r, META: meta} for r in results], d, **plot_opts))


META = "_meta"  # the unit attributes a view reads its settings caption from (sam_probe.report.settings.META)


def figure_meta(analysis: Analysis, cfg: dict[str, Any], common: Common) -> dict[str, Any]:
    """What a command's own figures name in their captions: the settings of the units it made."""
    s = common.settings
    return {"analysis": analysis.name, "analysis_version": analysis.version, "config": cfg,
            "data_spec": s.data_identity(), "dtype": s.dtype, "bn_mode": s.bn_mode}


def _params(fn: Any) -> set[str]:
    import inspect

    return set(inspect.signature(fn).parameters)


def warn_results(common: Common, outcomes: list[Any]) -> None:
    """Show every result's ``warnings`` on stderr (never silently unconverged)."""
    if common.output.quiet:
        return
    for o in outcomes:
        for w in (o.result or {}).get("warnings", []) or []:
            console.warn(f"{Path(o.path).name}: {w}")
