"""``sam-probe report RESULTS``: tables, JSON, CSV, figures and an HTML page from stored results only (never recomputes)."""
from __future__ import annotations

import csv
import io
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

import typer
from typer.core import TyperCommand

from ..analyses import names as analysis_names
from ..errors import SamProbeError, SpecError
from ..report import console

ORDER = analysis_names()


def view_options(name: str) -> dict[str, Any]:
    """Options a view's tables get in a report (the analysis's declared view defaults)."""
    from .. import analyses

    try:
        return dict(analyses.get(name).view_defaults)
    except SamProbeError:
        return {}


def view_of(analysis: str):
    from .. import analyses

    try:
        return analyses.get(analysis).view_impl()
    except (SamProbeError, ModuleNotFoundError):
        return None


def flatten(result: dict[str, Any], max_list: int = 20) -> dict[str, Any]:
    """Scalars, dotted keys for nested dicts, ``name[i]`` for short lists; long arrays are left out."""
    from ..results import jsonable

    row: dict[str, Any] = {}

    def walk(prefix: str, v: Any) -> None:
        v = jsonable(v)
        if isinstance(v, dict):
            for k, x in v.items():
                walk(f"{prefix}.{k}" if prefix else str(k), x)
        elif isinstance(v, list):
            if len(v) <= max_list and all(not isinstance(x, (list, dict)) for x in v):
                for i, x in enumerate(v):
                    row[f"{prefix}[{i}]"] = x
        else:
            row[prefix] = v

    walk("", result)
    return row


def settings_columns(result: dict[str, Any]) -> dict[str, Any]:
    """``settings.*`` CSV columns: the config, data spec, dtype, BN mode and version a row was computed with."""
    from ..report import unit_settings

    m = unit_settings.meta(result)
    cols = {f"settings.{k}": v for k, v in flatten(unit_settings.config(result)).items()}
    cols |= {f"settings.data.{k}": v for k, v in flatten(m.get("data_spec") or {}).items()}
    cols |= {f"settings.{k}": m.get(k) for k in ("dtype", "bn_mode", "analysis_version") if m.get(k) is not None}
    return cols


def write_csv(rows: list[dict[str, Any]], fh) -> None:
    cols: list[str] = []
    for r in rows:
        cols += [c for c in r if c not in cols]
    w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)


def sources_table(coll) -> Any:
    """One row per run: where its checkpoints' weights and steps were found (when the results store it)."""
    from ..report import figures, unit_settings
    from ..report.tables import Table

    runs: dict[tuple, set[str]] = {}
    for rs in coll.analyses.values():
        for r in rs:
            paths = [r.get("path")] if r.get("source") else list(r.get("paths") or [])
            for i, s in enumerate(unit_settings.sources(r)):
                key = (figures.run_key(r), s.get("format"), s.get("layout"), s.get("prefix"), s.get("step_source"))
                runs.setdefault(key, set()).add(str(paths[i]) if i < len(paths) else f"{figures.run_key(r)}#{i}")
    if not runs:
        return None
    rows = [[figures.label(k[0]), k[1], k[2], k[3] or "-", k[4], len(v)] for k, v in sorted(runs.items(), key=str)]
    return Table("checkpoint sources (as inferred when the results were computed)",
                 ["run", "format", "layout", "prefix stripped", "step from", "checkpoints"], rows)


def name_runs(coll) -> dict[str, str]:
    """Give every result its run: ``run`` (the label it was stored under — its ``--run-name`` or
    default —, lengthened where two runs of the report would share one) and ``run_dir``; returns
    ``{run directory: label}``."""
    from .. import run_names
    from ..report import unit_settings

    stored: dict[str, str] = {}
    keys: list[str] = []
    for rs in coll.analyses.values():
        for r in rs:
            key = run_names.run_of(r)
            keys.append(key)
            lab = run_names.stored_label(str(unit_settings.meta(r).get("unit") or ""))
            if lab and not (lab == Path(key).name and run_names.default_label(key) != lab):  # not an old generic leaf
                stored.setdefault(key, lab)
    labels = run_names.labels(keys, stored)
    for name, rs in coll.analyses.items():
        named = []
        for r in rs:
            key = run_names.run_of(r)
            named.append({"run": labels[key], "run_dir": key, **{k: v for k, v in r.items() if k not in ("run", "run_dir")}})
        coll.analyses[name] = named
    return labels


def settings_line(name: str, group: list[dict[str, Any]], index: int, n_groups: int, diff: str) -> str:
    from ..report import unit_settings

    head = f"{name}: " + (f"settings group {index + 1} of {n_groups} ({diff}) · " if n_groups > 1 else "")
    m = unit_settings.meta(group[0])
    tail = [unit_settings.data_text(group), unit_settings.numerics_text(group)]
    if m.get("analysis_version") is not None:
        tail.append(f"analysis version {m['analysis_version']}")
    return head + f"settings: {unit_settings.describe(unit_settings.config(group[0])) or '-'}" + \
        "".join(f" · {t}" for t in tail if t) + f" · {len(group)} result{'s' if len(group) != 1 else ''}"


def _render(groups: dict[str, list[list[dict[str, Any]]]], outdir: Path, debug: bool) -> dict[tuple[str, int], list[Path]]:
    """Every group's figures into ``outdir`` (in the active formats); a failing figure warns and is skipped."""
    from ..report import figures

    written: dict[tuple[str, int], list[Path]] = {}
    for name, gs in groups.items():
        view = view_of(name)
        if view is None:
            continue
        for i, g in enumerate(gs):
            try:
                with figures.named_for(g):
                    written[(name, i)] = view.plot(g, outdir)
            except Exception as exc:  # noqa: BLE001 - one broken figure must not hide the others
                if debug:
                    raise
                console.warn(f"{name}: plotting failed ({exc})")
                written[(name, i)] = []
    return written


class _ReportCommand(TyperCommand):
    """``--html`` takes an optional FILE: ``--html`` alone, before an option or RESULTS, means the default."""

    def parse_args(self, ctx, args):  # type: ignore[override]
        args = list(args)
        i = 0
        while i < len(args):
            if args[i] == "--":
                break
            if args[i] == "--html":
                nxt = args[i + 1] if i + 1 < len(args) else None
                if nxt is None or nxt.startswith("-") or _looks_like_results(nxt, args[:i] + args[i + 2:]):
                    args.insert(i + 1, "")
                i += 1
            i += 1
        return super().parse_args(ctx, args)


def _looks_like_results(token: str, others: list[str]) -> bool:
    """Whether ``token`` after ``--html`` is RESULTS rather than FILE (no other positional, or it is a store)."""
    p = Path(token)
    positional = [a for a in others if not a.startswith("-")]
    return p.is_dir() or (p.suffix == ".h5" and p.is_file()) or not positional


def report(
    results: Path = typer.Argument(..., help="A results directory or a merged .h5 file."),
    format: str = typer.Option("table", "--format", "-f", help="table, json or csv."),
    plot: bool = typer.Option(True, "--plot/--no-plot", help="Write seaborn figures."),
    plot_format: str = typer.Option("png", "--plot-format", help="png, svg or pdf; several comma-separated (png,pdf)."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Folder for figures and CSV files (default: RESULTS/plots, or beside a merged file)."),
    analysis: list[str] = typer.Option([], "--analysis", "-a", help="Only these analyses (repeatable)."),
    html: Optional[str] = typer.Option(None, "--html", metavar="[FILE]", show_default=False,
                                       help="Also write one self-contained HTML page (tables, embedded figures, "
                                            "settings, provenance); FILE defaults to OUTPUT/report.html."),
    compare: bool = typer.Option(False, "--compare", help="Compare the runs' sharpness results at matched training "
                                 "loss and over the last checkpoints, seeds grouped (runs named NAME-s0, NAME-s1, ...)."),
    compare_last: int = typer.Option(3, "--compare-last", help="--compare: checkpoints averaged at the end of each run."),
    match_loss: Optional[float] = typer.Option(None, "--match-loss", help="--compare: the training loss to match "
                                               "(default: the largest of the runs' lowest losses)."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Render every stored analysis: rich tables (one per settings group), JSON or CSV, figures, HTML."""
    from ..results import jsonable
    from ..report import collect, figures, unit_settings, views

    if format not in ("table", "json", "csv"):
        raise SpecError(f"--format {format}: choose table, json or csv")
    try:
        formats = figures.parse_formats(plot_format)
    except ValueError as exc:
        raise SpecError(f"--plot-format {exc}") from None
    if not results.exists():
        raise SpecError(f"{results}: no such results directory or file")

    def skipped(name: str, why: str) -> None:
        console.warn(f"skipped {name}: {why}")

    try:
        coll = collect.collect(results, analysis or None, ORDER, on_skip=skipped)
    except OSError as exc:
        raise SamProbeError(f"{results}: cannot be read as results ({str(exc).splitlines()[0]})") from None
    if not coll.analyses:
        raise SamProbeError(f"{results}: no stored results" + (f" for {', '.join(analysis)}" if analysis else "")
                            + (f" ({len(coll.skipped)} unreadable files skipped)" if coll.skipped else ""))
    outdir = output or (results / "plots" if results.is_dir() else results.with_name(results.stem + "_plots"))
    labels = name_runs(coll)
    groups = {name: unit_settings.group(rs) for name, rs in coll.analyses.items()}
    warnings: dict[str, list[str]] = {}
    for name in coll.analyses:
        vs = coll.versions(name)
        if len(vs) > 1:
            warnings.setdefault(name, []).append(
                f"{name}: results of different analysis versions ({', '.join(vs)}) are shown in separate tables; "
                "numbers of different versions may not be comparable")
    for ws in warnings.values():
        for w in ws:
            console.warn(w)

    cmp = None
    if compare:
        from ..report import compare as compare_view

        if "sharpness" not in coll.analyses:
            raise SpecError("--compare needs stored sharpness results (run `sam-probe sharpness RUN...` first)")
        if compare_last < 1:
            raise SpecError("--compare-last must be >= 1")
        cmp = compare_view.comparison(coll.analyses["sharpness"], compare_last, match_loss)
    if format == "json":
        console.print_json(jsonable({
            **({"compare": cmp} if cmp is not None else {}),
            "analyses": {n: [collect.public(r) for r in rs] for n, rs in coll.analyses.items()},
            "groups": {n: [{"settings": {"config": unit_settings.config(g[0]),
                                         **{k: unit_settings.meta(g[0]).get(k) for k in unit_settings.GROUPING_META[1:]}},
                            "count": len(g)} for g in gs] for n, gs in groups.items()},
            "skipped": [{"file": f, "reason": why} for f, why in coll.skipped],
            "warnings": [w for ws in warnings.values() for w in ws],
        }))
    elif format == "csv":
        if output is not None:
            output.mkdir(parents=True, exist_ok=True)
        for name, rs in coll.analyses.items():
            rows = [{**flatten(collect.public(r)), **settings_columns(r)} for r in rs]
            if output is None:
                buf = io.StringIO()
                write_csv(rows, buf)
                sys.stdout.write(f"# {name}\n{buf.getvalue()}\n")
            else:
                with open(output / f"{name}.csv", "w", newline="") as fh:
                    write_csv(rows, fh)
                console.err.print(f"wrote {output / f'{name}.csv'}", highlight=False)

    diffs = {name: unit_settings.differences(gs) for name, gs in groups.items()}
    with figures.palette_session(coll.run_keys(), labels):
        if format == "table":
            for name, gs in groups.items():
                view = view_of(name)
                if view is None:
                    console.warn(f"{name}: no table view in this version; use --format json")
                    continue
                for i, g in enumerate(gs):
                    console.out.print(settings_line(name, g, i, len(gs), diffs[name][i]), style="bold",
                                      highlight=False, markup=False)
                    try:
                        views.show(view, g, **view_options(name))
                    except Exception as exc:  # noqa: BLE001 - a malformed unit must not hide the other tables
                        if debug:
                            raise
                        units = ", ".join(str(unit_settings.meta(r).get("unit")) for r in g[:3])
                        console.warn(f"{name}: table failed ({type(exc).__name__}: {exc}); units {units}"
                                     + (f" and {len(g) - 3} more" if len(g) > 3 else ""))
            src = sources_table(coll)
            if src is not None:
                from ..report import tables
                tables.show([src])
            if cmp is not None:
                from ..report import compare as compare_view
                from ..report import tables
                tables.show(compare_view.tables_of(cmp))
        written: dict[tuple[str, int], list[Path]] = {}
        if plot:
            with figures.file_format(formats):
                written = _render(groups, outdir, debug)
            files = [p for ps in written.values() for p in ps]
            if files:
                console.err.print("plots: " + ", ".join(str(p) for p in files), highlight=False)
        if html is not None:
            target = Path(html) if html else outdir / "report.html"
            write_html(results, coll, groups, diffs, warnings, written, target, debug)
            console.err.print(f"html: {target}", highlight=False)
    console.err.print(summary(coll), highlight=False)


def summary(coll) -> str:
    n_an = len(coll.analyses)
    text = f"report: {coll.units} units read ({n_an} analys{'es' if n_an != 1 else 'is'})"
    text += f", {len(coll.skipped)} file{'s' if len(coll.skipped) != 1 else ''} skipped"
    if coll.duplicates:
        text += f", {len(coll.duplicates)} duplicate unit{'s' if len(coll.duplicates) != 1 else ''} shown once"
    return text


def write_html(results: Path, coll, groups, diffs, warnings, written, target: Path, debug: bool) -> None:
    """The HTML page; figures are embedded as PNG (rendered into a temporary folder when none were written)."""
    from ..report import figures
    from ..report import html as html_page

    pngs = {k: [p for p in ps if p.suffix == ".png"] for k, ps in written.items()}
    with tempfile.TemporaryDirectory(prefix="sam-probe-html-") as tmp:
        if not any(pngs.values()):
            with figures.file_format("png"):
                pngs = _render(groups, Path(tmp), debug)
        sections = []
        for name, gs in groups.items():
            view = view_of(name)
            sec = html_page.Section(name, warnings=warnings.get(name, []))
            for i, g in enumerate(gs):
                make = getattr(view, "tables_of", None)
                try:
                    tabs = make(g, **view_options(name)) if make is not None else []
                except Exception as exc:  # noqa: BLE001 - as for the terminal tables
                    if debug:
                        raise
                    tabs = []
                    sec.warnings.append(f"tables of settings group {i + 1} failed ({type(exc).__name__}: {exc})")
                sec.groups.append(html_page.Group(settings_line(name, g, i, len(gs), diffs[name][i]), tabs,
                                                  pngs.get((name, i), [])))
            sections.append(sec)
        src = sources_table(coll)
        everything = [r for rs in coll.analyses.values() for r in rs]
        text = html_page.page(str(results), sections, everything, [src] if src is not None else [], coll.skipped,
                              summary(coll))
    from ..atomic import atomic_write

    with atomic_write(target, fsync=False) as tmp_path:  # same permissions as the figures
        Path(tmp_path).write_text(text, encoding="utf-8")


def register(app: typer.Typer) -> None:
    app.command("report", cls=_ReportCommand)(report)
