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

from . import figures, unit_settings
from .tables import Table, step_value
from .unit_settings import config, curvature_name, setting
from .views import Panel, Series, plot_over_steps, style_handle


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


def caption(results: list[dict[str, Any]]) -> str:
    """The subspace settings in words."""
    if not results:
        return ""
    r = results[0]
    cfg = config(r)
    k, curv = setting(cfg, r, "k"), curvature_name(cfg, r)
    return f"top-{k} {curv} eigenspace" if k else f"{curv} eigenspace"


def tables_of(results: list[dict[str, Any]]) -> list[Table]:
    out = []
    for r in results:
        prev, first = with_previous(r), with_first(r)
        ev = r.get("eigenvalues") or []
        kind = unit_settings.step_kind([r])
        rows = []
        for i, s in enumerate(r.get("steps") or []):
            e = [x for x in (ev[i] if i < len(ev) and ev[i] is not None else []) if x is not None]
            rows.append([step_value(s), max(e) if e else None, min(e) if e else None,
                         prev[i] if i < len(prev) else None, first[i] if i < len(first) else None, chance_at(r, i)])
        out.append(Table(f"{figures.run_name(r)}: top-{r.get('k')} eigenspace overlap ‖P_i P_j‖_F²/k",
                         [kind, "λ1", f"λ{r.get('k')}", "with previous", "with first", "chance k/P"], rows))
    return out


CHANCE = {"ls": "--", "lw": 1.4, "marker": None}
CHANCE_COLOR = "0.25"


def chance_text(results: list[dict[str, Any]]) -> str:
    """``chance k/P = 0.00056`` (its range where runs differ): on a 0–1 axis the line sits on the
    floor, so the legend gives its value."""
    levels = sorted({c for r in results for i in range(len(r.get("steps") or [])) if (c := chance_at(r, i)) is not None})
    if not levels:
        return "chance k/P"
    return f"chance k/P = {levels[0]:.2g}" + (f" … {levels[-1]:.2g}" if levels[-1] != levels[0] else "")


def plot(results: list[dict[str, Any]], outdir: Path) -> list[Path]:
    """Overlap with the previous / first checkpoint over steps (with chance), and a heat-map per run."""
    if not results:
        return []

    def overlap(get):
        def series(rs: list[dict[str, Any]]) -> list[Series]:
            out = []
            for r in rs:
                steps = [step_value(s) for s in r.get("steps") or []]
                out.append(Series(steps, get(r)))
                out.append(Series(steps, [chance_at(r, i) for i in range(len(steps))], color=CHANCE_COLOR,
                                  label="_chance", style=CHANCE))
            return out
        return series

    panels = [Panel(f"with the {what} checkpoint", f"overlap with the {what} checkpoint\n‖P_t P_s‖_F² / k "
                    "(fraction, 0–1)", overlap(get), ylim=(-0.02, 1.02))
              for what, get in (("previous", with_previous), ("first", with_first))]
    written = plot_over_steps(results, panels, outdir, "subspace", "rotation of the top eigenspace",
                              unit_settings.caption(caption(results), results), rows=None, width=4.6, height=3.4,
                              legend_extra=[style_handle(chance_text(results), color=CHANCE_COLOR, ls="--", lw=1.4)])
    mats = [r for r in results if _matrix(r) is not None and len(_matrix(r) or []) > 1]
    if mats:
        fig = figures.step_heatmaps(mats, [_matrix(r) for r in mats], "overlap ‖P_i P_j‖_F² / k (0–1)")
        figures.title(fig, f"top-{mats[0].get('k')} eigenspace overlap between checkpoints",
                      unit_settings.caption(caption(mats), mats))
        written += figures.write(fig, outdir / "subspace_overlap")
    return written
