"""``sam-probe report RESULTS``: tables, JSON, CSV and figures from stored results only (never recomputes)."""
from __future__ import annotations

import csv
import io
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional

import typer

from ..analyses import names as analysis_names
from ..errors import SamProbeError, SpecError
from ..report import console

ORDER = analysis_names()


def collect(results_path: Path, only: list[str] | None = None) -> dict[str, list[dict[str, Any]]]:
    """Stored results grouped by analysis, in run/step order."""
    from .. import store
    from ..pipeline import jsonable, without_packed

    grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for _, result, meta in store.iter_units(results_path):
        name = meta.get("analysis")
        if not name or (only and name not in only):
            continue
        grouped[name].append(jsonable(without_packed(result)))
    for rs in grouped.values():
        rs.sort(key=lambda r: (str(r.get("run", Path(str(r.get("path", r.get("a", "")))).parent)),
                               r.get("step") if isinstance(r.get("step"), (int, float)) else -1))
    return dict(sorted(grouped.items(), key=lambda kv: ORDER.index(kv[0]) if kv[0] in ORDER else len(ORDER)))


def view_of(analysis: str):
    from .. import analyses

    try:
        return analyses.get(analysis).view_impl()
    except (SamProbeError, ModuleNotFoundError):
        return None


def flatten(result: dict[str, Any], max_list: int = 20) -> dict[str, Any]:
    """Scalars, dotted keys for nested dicts, ``name[i]`` for short lists; long arrays are left out."""
    from ..pipeline import jsonable

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


def write_csv(rows: list[dict[str, Any]], fh) -> None:
    cols: list[str] = []
    for r in rows:
        cols += [c for c in r if c not in cols]
    w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)


def report(
    results: Path = typer.Argument(..., help="A results directory or a merged .h5 file."),
    format: str = typer.Option("table", "--format", "-f", help="table, json or csv."),
    plot: bool = typer.Option(True, "--plot/--no-plot", help="Write seaborn figures."),
    plot_format: str = typer.Option("png", "--plot-format", help="png, svg or pdf."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Folder for figures and CSV files (default: RESULTS/plots, or beside a merged file)."),
    analysis: list[str] = typer.Option([], "--analysis", "-a", help="Only these analyses (repeatable)."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Render every stored analysis (rich tables, JSON or CSV, and figures comparing runs)."""
    if format not in ("table", "json", "csv"):
        raise SpecError(f"--format {format}: choose table, json or csv")
    if plot_format not in ("png", "svg", "pdf"):
        raise SpecError(f"--plot-format {plot_format}: choose png, svg or pdf")
    if not results.exists():
        raise SpecError(f"{results}: no such results directory or file")
    try:
        grouped = collect(results, analysis or None)
    except OSError as exc:
        raise SamProbeError(f"{results}: cannot be read as results ({str(exc).splitlines()[0]})") from None
    if not grouped:
        raise SamProbeError(f"{results}: no stored results" + (f" for {', '.join(analysis)}" if analysis else ""))
    outdir = output or (results / "plots" if results.is_dir() else results.with_name(results.stem + "_plots"))

    from ..pipeline import jsonable
    from ..report import figures

    if format == "json":
        console.print_json(jsonable({"analyses": grouped}))
    elif format == "csv":
        if output is not None:
            output.mkdir(parents=True, exist_ok=True)
        for name, rs in grouped.items():
            rows = [flatten(r) for r in rs]
            if output is None:
                buf = io.StringIO()
                write_csv(rows, buf)
                sys.stdout.write(f"# {name}\n{buf.getvalue()}\n")
            else:
                with open(output / f"{name}.csv", "w", newline="") as fh:
                    write_csv(rows, fh)
                console.err.print(f"wrote {output / f'{name}.csv'}", highlight=False)
    else:
        for name, rs in grouped.items():
            view = view_of(name)
            if view is None:
                console.warn(f"{name}: no table view in this version; use --format json")
                continue
            from .. import analyses

            view.show(rs, **analyses.get(name).view_defaults)

    if plot:
        written: list[Path] = []
        with figures.file_format(plot_format):
            for name, rs in grouped.items():
                view = view_of(name)
                if view is None:
                    continue
                try:
                    written += view.plot(rs, outdir)
                except Exception as exc:  # noqa: BLE001 - one broken figure must not hide the others
                    if debug:
                        raise
                    console.warn(f"{name}: plotting failed ({exc})")
        if written:
            console.err.print("plots: " + ", ".join(str(p) for p in written), highlight=False)
