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
    from ..pipeline.session import Session

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
    """A Session whose units drive one progress bar over the whole command (ETA from the units
    computed so far) on a terminal and, when stderr is not a terminal (logs, CI, batch jobs),
    print one ``[done/total]`` line per finished unit with its time.  The session's
    ``tracker`` takes the command's unit count (:func:`count_units`)."""
    shown = shows_progress(common)
    lines = shown and not console.err.is_terminal

    with console.progress(shown) as tracker:
        def on_unit(outcome: Any) -> None:
            if outcome.stored_at and outcome.status == "ok":
                KEPT.append(outcome.stored_at)
            tracker.finished(outcome)
            if lines:
                console.unit_line(outcome, tracker.counter())

        session = open_session(common, lambda msg, done, total: tracker.describe(msg), on_unit)
        session.tracker = tracker
        yield session


def count_units(analysis: Analysis, targets: list[Path], glob: str | None = None) -> int:
    """Every unit the command will read back or compute: one per checkpoint, one per run, or one
    per pair — and what an analysis built on other units declares (``units(n_checkpoints)``)."""
    from ..loading.runs import discover

    if analysis.target == PAIR:
        return 1
    per_run = getattr(analysis.impl, "units", None)
    total = 0
    for t in targets:
        try:
            n = len(discover(t, glob))
        except Exception:  # noqa: BLE001 - an unreadable target is one failed unit
            n = 1
        total += per_run(n) if per_run is not None else (n if analysis.target == CHECKPOINTS else 1)
    return total


def execute(analysis: Analysis, common: Common, targets: list[Path], cfg: dict[str, Any]) -> tuple[list[Any], Any]:
    """Every unit of ``analysis`` over ``targets`` (read back from the store or computed), and the
    progress tracker that counted them all (units built on the way included)."""
    with session_with_progress(common) as session:
        from ..pipeline.units import run_analysis

        session.tracker.set_total(count_units(analysis, targets, common.settings.glob))
        outcomes = run_analysis(session, analysis, targets, cfg)
        for o in outcomes:  # files that failed to load never reach on_unit: they are units too
            if id(o) not in session.tracker.seen:
                session.tracker.finished(o)
        return outcomes, session.tracker


def check_targets(targets: list[Path]) -> None:
    """Every CHECKPOINT/RUN argument exists: checked before anything heavy is imported, so a typo
    costs no start-up (one line naming every missing path)."""
    from ..errors import CheckpointError
    from ..loading.files import display

    missing = [t for t in targets if not Path(t).exists()]
    if missing:
        raise CheckpointError(", ".join(display(t) for t in missing) + ": no such file or directory")


def with_runs(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each result with its run: ``run`` (the label: --run-name or the shortest informative path
    suffix, told apart from the command's other runs) and ``run_dir`` (the directory)."""
    from .. import run_names

    dirs = [run_names.run_of(r) for r in results]
    labels = run_names.disambiguate({d: run_names.label_for_dir(d) for d in dict.fromkeys(dirs)})
    return [{"run": labels[d], "run_dir": d, **{k: v for k, v in r.items() if k not in ("run", "run_dir")}}
            for d, r in zip(dirs, results)]


def payload_of(analysis: Analysis, outcomes: list[Any], n_targets: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The JSON printed and the results shown: ``{"results": [...]}`` per checkpoint; a run's
    (or a pair's) result object, or ``{"runs": [...]}`` for several runs."""
    from ..results import without_packed

    impl = analysis.impl
    is_result = getattr(impl, "is_result", lambda r: True)
    results = with_runs([with_schema(analysis, without_packed(r)) for r in results_of(outcomes) if is_result(r)])
    if analysis.target == CHECKPOINTS:
        return {"results": results}, results
    if analysis.target == PAIR or (analysis.target == RUNS and n_targets == 1):
        return (results[0] if results else {}), results
    return {"runs": results}, results


def with_schema(analysis: Analysis, result: dict[str, Any]) -> dict[str, Any]:
    """Every key of the declared schema present (``null`` where not computed), so the JSON of a
    fresh run and of one read back from the store have the same keys."""
    from ..results import PACKED_KEYS

    return {**{k: None for k in analysis.schema if k not in ("warnings", *PACKED_KEYS)}, **result}


def run_command(analysis: Analysis, targets: list[Path], opts: dict[str, Any], common: Common) -> None:
    """What ``sam-probe NAME TARGETS ...`` does: check the paths, configure, execute, then print,
    plot and exit.  With ``--json`` a failure still prints JSON: ``{"error": ..., ...}``."""
    from ..errors import SamProbeError

    try:
        _run(analysis, targets, opts, common)
    except SamProbeError as exc:
        if common.output.json:
            console.print_json({"error": " ".join(str(exc).split("\n"))})
        raise


def _run(analysis: Analysis, targets: list[Path], opts: dict[str, Any], common: Common) -> None:
    from .. import run_names
    from ..errors import SpecError

    check_targets(targets)
    check_trackers(common)
    try:
        names = run_names.parse_names(common.settings.run_names, targets)
    except ValueError as exc:
        raise SpecError(str(exc)) from None
    compute_opts = {o.name: opts[o.name] for o in analysis.compute_options()}
    view_opts = {o.name: opts[o.name] for o in analysis.options if o.view}
    from ..analyses.base import check_sharding

    check_sharding(analysis, common.settings)
    cfg = analysis.impl.configure(compute_opts, common.settings)
    t0 = time.perf_counter()
    KEPT.clear()
    with run_names.given(names):
        outcomes, tracker = execute(analysis, common, targets, cfg)
        warn_results(common, outcomes)
        if common.output.verbose and not common.output.quiet:
            show_plans(outcomes)
        if shows_progress(common):
            console.summary_line(analysis.name, outcomes, time.perf_counter() - t0, tracker.counts)
        payload, results = payload_of(analysis, outcomes, len(targets))
    view = analysis.view_impl()
    plot_opts = {k: v for k, v in view_opts.items() if k in _params(view.plot)}
    meta = figure_meta(analysis, cfg, common)
    from ..report import views

    def plot(outdir: Path) -> list[Path]:
        from ..report import figures

        drawn = [{**r, META: meta} for r in results]
        with figures.named_for(drawn):
            return view.plot(drawn, outdir, **plot_opts)

    log_to_trackers(analysis, results, cfg, common)
    from ..report import figures

    with figures.palette_session():  # this command's runs, colours and labels only (not an earlier call's)
        finish(common, outcomes, with_errors(payload, outcomes), show=lambda: views.show(view, results, **view_opts),
               plot=plot)


def check_trackers(common: Common) -> None:
    """The packages of ``--tensorboard`` / ``--wandb`` import, checked before anything is computed."""
    if common.output.tensorboard is not None:
        from ..integrations import tensorboard

        tensorboard.check()
    if common.output.wandb:
        from ..integrations import wandb

        wandb.check()


def log_to_trackers(analysis: Analysis, results: list[dict[str, Any]], cfg: dict[str, Any], common: Common) -> None:
    """Every result's scalars to TensorBoard / W&B (:mod:`sam_probe.integrations.scalars`); a tracker
    that fails is one warning (the results are stored)."""
    out = common.output
    trackers = []
    logdir, project = out.tensorboard, out.wandb
    if logdir is not None:
        from ..integrations import tensorboard

        trackers.append(("tensorboard", lambda: f"tensorboard: {tensorboard.log_results(logdir, analysis, results)}"))
    if project:
        from ..integrations import wandb

        def to_wandb() -> str:
            s = common.settings
            runs = list(dict.fromkeys(str(r.get("run")) for r in results))
            name = f"{analysis.name} {', '.join(runs[:3])}{' +' + str(len(runs) - 3) if len(runs) > 3 else ''}"
            run = wandb.log_results(project, analysis, results, offline=out.wandb_offline, directory=s.out, name=name,
                                    config={"config": cfg, "data": s.data_identity(), "dtype": s.dtype,
                                            "bn_mode": s.bn_mode})
            if run["mode"] == "offline":
                return f"wandb: offline run {run['dir']} (upload: wandb sync {run['dir']})"
            return f"wandb: run {run['id']} of project {project}"

        trackers.append(("wandb", to_wandb))
    for name, log in trackers:
        try:
            line = log()
        except Exception as exc:  # noqa: BLE001 - a tracker must never lose computed results
            console.warn(f"{name} logging failed ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}); results are stored")
            continue
        if not out.quiet and not out.json:
            console.err.print(line, highlight=False, markup=False)


def with_errors(payload: dict[str, Any], outcomes: list[Any]) -> dict[str, Any]:
    """``payload`` plus, when units failed, ``error`` (the first, one line) and ``errors``
    (``[{path, step, error}]``), so a script reading ``--json`` sees what went wrong."""
    failed = [o for o in outcomes if o.status == "failed" or o.store_error]
    if not failed:
        return payload
    errors = [{"path": o.path, "step": o.step, "error": o.error or o.store_error} for o in failed]
    return {"error": errors[0]["error"], "errors": errors, **payload}


META = "_meta"  # the unit attributes a view reads its settings caption from (sam_probe.report.unit_settings.META)


def figure_meta(analysis: Analysis, cfg: dict[str, Any], common: Common) -> dict[str, Any]:
    """What a command's own figures name in their captions: the settings of the units it made."""
    s = common.settings
    return {"analysis": analysis.name, "analysis_version": analysis.version, "config": cfg,
            "data_spec": s.data_identity(), "dtype": s.dtype, "bn_mode": s.bn_mode}


def _params(fn: Any) -> set[str]:
    import inspect

    return set(inspect.signature(fn).parameters)


def show_plans(outcomes: list[Any]) -> None:
    """``--verbose``: each unit's solver plan (basis size, vectors held, where they live), one line each."""
    for o in outcomes:
        plan = (o.result or {}).get("solver")
        if isinstance(plan, dict) and plan:
            said = ", ".join(f"{k}={plan[k]}" for k in ("basis_vectors", "peak_vectors", "vector_bytes",
                                                           "basis_device", "budget_from", "block") if k in plan)
            console.note_line(f"{Path(o.path).name}: solver plan: {said}")


def warn_results(common: Common, outcomes: list[Any]) -> None:
    """Show every result's ``warnings`` on stderr (never silently unconverged)."""
    if common.output.quiet:
        return
    names = {str(o.path): Path(o.path).name for o in outcomes}
    if len(set(names.values())) < len(names):  # files of several runs share names: say whose
        names = {p: "/".join(Path(p).parts[-2:]) for p in names}
    for o in outcomes:
        for w in (o.result or {}).get("warnings", []) or []:
            console.warn(f"{names[str(o.path)]}: {w}")
