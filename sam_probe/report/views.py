"""What every view shares: the default ``show`` and the scaffold of figures over training steps.

A view is the module of ``sam_probe/report`` an analysis declares (``Analysis.view``); it holds

* ``tables_of(results, **view_options) -> list[Table]``: its tables, as data;
* ``caption(results) -> str``: its own settings in words (the figure titles add data and numerics);
* ``plot(results, outdir) -> list[Path]``: its figures, most drawn by :func:`plot_over_steps`;
* optionally ``show(results, **view_options)``; the default prints ``tables_of`` (:func:`show`).

:func:`plot_over_steps` draws one row of panels per model (or per run), one line per run
and series, in the run's colour and label, on the step axis (``epoch`` where the
checkpoints count epochs), with the late-SAM switch marked, log axes that keep zeros,
one legend beside the panels, and the title naming every setting.  Groups where every
run has a single checkpoint get a dot per run instead of "over training" lines of one dot.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import events, figures, tables, unit_settings


def show(view: Any, results: list[dict[str, Any]], **options: Any) -> None:
    """Print a view's tables: its own ``show`` where it has one, else its ``tables_of``."""
    own = getattr(view, "show", None)
    if own is not None:
        own(results, **options)
    else:
        tables.show(view.tables_of(results, **options))


@dataclass
class Series:
    """One line of one run on one panel."""

    x: Sequence[Any]
    y: Sequence[float | None]
    label: str | None = None  # legend entry; None: the run's label
    color: Any = None  # None: the run's colour
    style: dict[str, Any] = field(default_factory=dict)  # matplotlib line keywords (ls, marker, alpha, lw)
    band: Sequence[float | None] | None = None  # ± half-width shaded around the line (e.g. a standard error)
    in_scale: bool = True  # its values count for the log axis range


@dataclass
class Panel:
    """One quantity over steps: ``series(run_results)`` gives the lines of one run (results in step order)."""

    title: str
    ylabel: str
    series: Callable[[list[dict[str, Any]]], list[Series]]
    log: bool = False  # log axis (symlog where zeros or negatives occur)
    ylim: tuple[float, float] | None = None
    marks: Callable[[list[dict[str, Any]]], list[tuple[float, str, Any]]] | None = None  # (step, label, colour)


LINE = {"marker": "o", "ms": 3.5}


def _rows(results: list[dict[str, Any]], rows: str | None) -> list[tuple[str, list[dict[str, Any]]]]:
    if rows == "model":
        facets = figures.facets(results)
        return [(f"model: {m}" if len(facets) > 1 else "", rs) for m, rs in facets]
    if rows == "run":
        return [(figures.label(k), [r for r in results if figures.run_key(r) == k]) for k in figures.runs_of(results)]
    return [("", results)]


def _by_run(results: list[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    out = []
    for k in figures.runs_of(results):
        rs = sorted((r for r in results if figures.run_key(r) == k),
                    key=lambda r: (r.get("step") is None, r.get("step") or 0))
        out.append((k, rs))
    return out


def _points(s: Series) -> tuple[list[Any], list[float], list[float] | None]:
    keep = [i for i, y in enumerate(s.y) if y is not None and y == y and i < len(s.x) and s.x[i] is not None]
    bands = s.band
    band = [float("nan") if bands is None or bands[i] is None else float(bands[i]) for i in keep]  # type: ignore[arg-type]
    return [s.x[i] for i in keep], [float(s.y[i]) for i in keep], band if bands is not None else None  # type: ignore[arg-type]


def single_checkpoint(results: list[dict[str, Any]]) -> bool:
    """Whether no run of ``results`` has more than one checkpoint (nothing to draw "over training")."""
    counts: dict[str, set] = {}
    for r in results:
        steps = r.get("steps")
        counts.setdefault(figures.run_key(r), set()).update(steps if isinstance(steps, list) else [r.get("step")])
    return all(len(v) <= 1 for v in counts.values())


def plot_over_steps(results: list[dict[str, Any]], panels: list[Panel], outdir: Path, name: str, title: str,
                    caption: str, *, rows: str | None = "model", legend_title: str = "run",
                    legend_extra: Sequence[tuple[Any, str]] = (), width: float = 4.4,
                    height: float = 3.3) -> list[Path]:
    """Panels of quantities over training steps (see the module docstring); writes ``outdir/name``.

    ``rows``: ``"model"`` (one row per model: runs of different models never share an axis),
    ``"run"`` (one row per run; series carry their own colours) or None (one row).
    ``legend_extra``: ``(handle, label)`` entries after the lines' own (chance levels, line styles).
    """
    if not results or not panels:
        return []
    figures.runs_of(results)
    row_groups = _rows(results, rows)
    lines = [[[[_points(s) + (s,) for s in panel.series(rs)] for _, rs in _by_run(row_results)] for panel in panels]
             for _, row_results in row_groups]  # every series first: a malformed result fails here, loudly
    xs = {x for row in lines for panel in row for run in panel for x_, _, _, _ in run for x in x_}
    one = len(xs) <= 1 or single_checkpoint(results)
    if one and (rows == "run" or len(figures.runs_of(results)) < 2):
        return []  # one checkpoint of one run: the table says it all
    fig, axes = figures.facet_grid([lab for lab, _ in row_groups] if len(row_groups) > 1 else [""], len(panels),
                                   width=width, height=height)
    for ax_row, (row_label, row_results), row_lines in zip(axes, row_groups, lines):
        runs = _by_run(row_results)
        for ax, panel, panel_lines in zip(ax_row, panels, row_lines):
            values: list[float] = []
            for i, ((key, rs), run_lines) in enumerate(zip(runs, panel_lines)):
                for x, y, band, s in run_lines:
                    if not y:
                        continue
                    if one:
                        x = [i] * len(y)
                    col = s.color if s.color is not None else figures.color(key)
                    lab = s.label if s.label is not None else figures.label(key)
                    style = {**LINE, **s.style} if not one else {**LINE, **s.style, "ls": "none"}
                    ax.plot(x, y, color=col, label=lab, **style)
                    if band is not None and one and any(b == b for b in band):
                        ax.errorbar(x, y, yerr=[0 if b != b else b for b in band], color=col, ls="none", capsize=3)
                    elif band is not None and any(b == b for b in band):
                        import numpy as np

                        lo, hi = np.array(y) - np.array(band), np.array(y) + np.array(band)
                        ax.fill_between(x, lo, hi, color=col, alpha=0.2, lw=0)
                        if s.in_scale:
                            values += [float(v) for v in np.concatenate([lo, hi]) if v == v]
                    if s.in_scale:
                        values += y
            if panel.log and values:
                figures.log_axis(ax, values)
            if panel.ylim is not None:
                ax.set_ylim(*panel.ylim)
            ax.set_title((f"{row_label}: " if rows == "run" and len(row_groups) == 1 else "") + panel.title,
                         fontsize="small")
            ax.set_ylabel(panel.ylabel + (figures.scale_note(ax) if panel.log and values else ""))
            if one:
                ax.set_xticks(range(len(runs)), [figures.label(k) for k, _ in runs], rotation=30, ha="right")
                ax.set_xlabel(f"run (one checkpoint each, {unit_settings.step_kind(row_results)} "
                              f"{_steps_text(row_results)})")
                ax.set_xlim(-0.5, len(runs) - 0.5)
            else:
                ax.set_xlabel(unit_settings.step_axis(row_results))
                figures.mark_steps(ax, events.switch_marks(row_results), ls="--")
                if panel.marks is not None:
                    figures.mark_steps(ax, panel.marks(row_results), ls="-.")
    handles, labels = _legend_entries(fig)
    for h, lab in legend_extra:
        if lab not in labels:
            handles.append(h)
            labels.append(lab)
    figures.figure_legend(fig, title=legend_title, handles=handles, labels=labels)
    figures.title(fig, title if not one else title.replace(" over training", "") + " at one checkpoint per run",
                  caption)
    return figures.write(fig, outdir / name)


def _steps_text(results: list[dict[str, Any]]) -> str:
    steps = sorted({tables.step_value(r.get("step")) for r in results if r.get("step") is not None}, key=str)
    return ", ".join(str(s) for s in steps[:4]) + (" ..." if len(steps) > 4 else "") if steps else "?"


def _legend_entries(fig: Any) -> tuple[list[Any], list[str]]:
    seen: dict[str, Any] = {}
    for a in fig.axes:
        for h, lab in zip(*a.get_legend_handles_labels()):
            if not lab.startswith("_"):
                seen.setdefault(lab, h)
    return list(seen.values()), list(seen)


def style_handle(label: str, **style: Any) -> tuple[Any, str]:
    """A grey legend entry for a line style (``ls="--"``: "chance", ``marker="x"``: "prediction")."""
    from matplotlib.lines import Line2D

    return Line2D([], [], color=style.pop("color", "0.3"), **style), label
