"""Tables and figures of stored ``distance`` results (distance to a reference checkpoint, escape rate)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from . import console, figures, unit_settings
from .tables import Table, step_value
from .unit_settings import config, fmt_value
from .views import Panel, Series, plot_over_steps


def caption(results: list[dict[str, Any]]) -> str:
    """The distance settings in words (distance uses no data)."""
    if not results:
        return ""
    r = results[0]
    ref = r.get("ref_step", config(r).get("ref"))
    return f"reference: {unit_settings.step_kind([r])} {fmt_value(step_value(ref))}" if ref is not None else ""


def rate_text(v: Any) -> str:
    """An escape rate with two significant digits (a slope fitted to a few points)."""
    return f"{v:.2g}" if isinstance(v, (int, float)) else "-"


def tables_of(results: list[dict[str, Any]]) -> list[Table]:
    out = []
    for r in results:
        kind = unit_settings.step_kind([r])
        rows = [[step_value(s), d, rel] for s, d, rel in zip(r["steps"], r["distance"], r["relative"])]
        rate = r.get("escape_rate")
        note = (f"escape rate {rate_text(rate)} per {r.get('escape_by', kind)} (slope of log distance over "
                f"{kind}s {', '.join(console.fmt(step_value(x)) for x in r.get('escape_steps') or [])})")
        notes = [note]
        fit = r.get("escape_fit") or {}
        if fit.get("better"):
            e, pw = fit["exponential"], fit["power"]
            notes.append(f"escape fits over {fit['n']} points: exponential rate {console.fmt(e['rate'])} (R² "
                         f"{e['r2']:.3f}), power law exponent {console.fmt(pw['exponent'])} (R² {pw['r2']:.3f}): "
                         f"{fit['better']} fits better")
        cols = [kind, "||w - w_ref||", "relative"]
        same = r.get("same_step") or {}
        share = r.get("top_k_share") or {}
        if same.get("steps"):
            at = dict(zip(same["steps"], same["distance"]))
            cols.append(f"distance to {Path(str(same.get('run'))).name}")
            rows = [row + [at.get(row[0])] for row in rows]
        if share.get("share"):
            cols.append(f"share in top-{share['k']} (chance {share['chance']:.2g})")
            rows = [row + [v] for row, v in zip(rows, share["share"])]
        out.append(Table(f"{figures.run_name(r)}: distance to {kind} {console.fmt(step_value(r.get('ref_step')))}",
                         cols, rows, notes))
    return out


def _refs(rs: list[dict[str, Any]]) -> list[tuple[float, str, Any]]:
    """One mark per reference step (runs sharing a reference share its mark)."""
    steps = dict.fromkeys(r["ref_step"] for r in rs if r.get("ref_step") is not None)
    return [(s, f"reference {step_value(s)}", "0.3") for s in steps]


def plot(results: list[dict[str, Any]], outdir: Path) -> list[Path]:
    """Distance to the reference over steps (rows: one per model), absolute and relative, log with zero kept."""
    if not results:
        return []

    def series(key: str):
        def lines(rs: list[dict[str, Any]]) -> list[Series]:
            return [Series([step_value(s) for s in r["steps"]], r[key],
                           label=f"{figures.label(r)} (escape {rate_text(r.get('escape_rate'))}/"
                                 f"{unit_settings.step_kind([r])})") for r in rs]
        return lines

    panels = [Panel("distance", "‖w_t − w_ref‖₂ (parameter units)", series("distance"), log=True, marks=_refs),
              Panel("relative distance (comparable across models)", "‖w_t − w_ref‖ / ‖w_ref‖ (fraction)",
                    series("relative"), log=True, marks=_refs)]
    facets = figures.facets(results)
    note = "one row per model" if len(facets) > 1 else ""
    return plot_over_steps(results, panels, outdir, "distance", "distance to the reference checkpoint",
                           unit_settings.caption(caption(results), results, note, data=False), rows="model",
                           width=4.6, height=3.4)
