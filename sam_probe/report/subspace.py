"""Tables and figures of stored ``subspace`` results: how the top-k eigenspace turns during training.

A result is one run: ``steps``, ``k``, ``overlap`` (``[i][j]`` = ‖P_i P_j‖_F² / k
of the top-k eigenspaces of checkpoints i and j, 1 = same subspace), ``chance``
(the overlap of two random k-dimensional subspaces, k/P; one number or one per
step) and ``eigenvalues`` (the k eigenvalues of every checkpoint).  An
``overlap`` given as a flat list is read as each checkpoint's overlap with the
previous one.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from . import events, figures, settings, tables
from .tables import Table, step_value


def _matrix(r: dict[str, Any]) -> list[list[float]] | None:
    ov = r.get("overlap")
    if isinstance(ov, list) and ov and isinstance(ov[0], list):
        return [[float("nan") if v is None else float(v) for v in row] for row in ov]
    return None


def with_previous(r: dict[str, Any]) -> list[float | None]:
    """Overlap of each checkpoint's subspace with the previous checkpoint's (None for the first)."""
    m = _matrix(r)
    if m is not None:
        return [None] + [m[i][i - 1] for i in range(1, len(m))]
    ov = list(r.get("overlap") or [])
    n = len(r.get("steps") or [])
    return ([None] + ov) if len(ov) == n - 1 else ov


def with_first(r: dict[str, Any]) -> list[float | None]:
    m = _matrix(r)
    return [row[0] for row in m] if m is not None else []


def chance_at(r: dict[str, Any], i: int) -> float | None:
    c = r.get("chance")
    if isinstance(c, list):
        return c[i] if i < len(c) else None
    return c


def tables_of(results: list[dict[str, Any]]) -> list[Table]:
    out = []
    for r in results:
        prev, first = with_previous(r), with_first(r)
        ev = r.get("eigenvalues") or []
        kind = settings.step_kind([r])
        rows = []
        for i, s in enumerate(r.get("steps") or []):
            e = [x for x in (ev[i] if i < len(ev) and ev[i] is not None else []) if x is not None]
            rows.append([step_value(s), max(e) if e else None, min(e) if e else None,
                         prev[i] if i < len(prev) else None, first[i] if i < len(first) else None, chance_at(r, i)])
        out.append(Table(f"{figures.run_name(r)}: top-{r.get('k')} eigenspace overlap ‖P_i P_j‖_F²/k",
                         [kind, "λ1", f"λ{r.get('k')}", "with previous", "with first", "chance k/P"], rows))
    return out


def show(results: list[dict[str, Any]]) -> None:
    tables.show(tables_of(results))


def plot(results: list[dict[str, Any]], outdir: Path) -> list[Path]:
    """Overlap heat-map per run, and overlap with the previous / first checkpoint over steps (with chance)."""
    from matplotlib.lines import Line2D

    if not results:
        return []
    figures.runs_of(results)
    written: list[Path] = []
    fig, axes = figures.new_figure(ncols=2, width=4.6, height=3.4)
    axes = list(axes.flat)
    for r in results:
        steps = [step_value(s) for s in r.get("steps") or []]
        col = figures.color(r)
        for ax, ys in zip(axes, (with_previous(r), with_first(r))):
            pts = [(s, y) for s, y in zip(steps, ys) if y is not None and y == y]
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3.5, color=col, label=figures.label(r))
            ch = [(s, chance_at(r, i)) for i, s in enumerate(steps) if chance_at(r, i) is not None]
            if ch:
                ax.plot(*zip(*ch), ls="--", lw=1.0, color=col)
    for ax, what in zip(axes, ("previous checkpoint", "first checkpoint")):
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel(settings.step_axis(results))
        ax.set_ylabel(f"overlap with the {what}\n‖P_t P_s‖_F² / k (fraction, 0–1)")
        figures.mark_steps(ax, events.switch_marks(results), ls="--")
    h, lab = axes[0].get_legend_handles_labels()
    figures.legend_beside(axes[1], h + [Line2D([], [], ls="--", color="0.3")], lab + ["chance k/P"], title="run")
    figures.title(fig, "rotation of the top eigenspace", settings.caption("subspace", results))
    written += figures.write(fig, outdir / "subspace")
    mats = [r for r in results if _matrix(r) is not None]
    if mats:
        fig = figures.step_heatmaps(mats, [_matrix(r) for r in mats], "overlap ‖P_i P_j‖_F² / k (0–1)")
        figures.title(fig, f"top-{mats[0].get('k')} eigenspace overlap between checkpoints",
                      settings.caption("subspace", mats))
        written += figures.write(fig, outdir / "subspace_overlap")
    return written
