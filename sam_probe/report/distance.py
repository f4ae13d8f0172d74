"""Tables and figures of stored ``distance`` results (distance to a reference checkpoint, escape rate)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from . import console, events, figures, settings, tables
from .tables import Table, step_value


def tables_of(results: list[dict[str, Any]]) -> list[Table]:
    out = []
    for r in results:
        kind = settings.step_kind([r])
        rows = [[step_value(s), d, rel] for s, d, rel in zip(r["steps"], r["distance"], r["relative"])]
        rate = r.get("escape_rate")
        note = (f"escape rate {console.fmt(rate)} per {r.get('escape_by', kind)} (slope of log distance over "
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


def show(results: list[dict[str, Any]]) -> None:
    tables.show(tables_of(results))


def plot(results: list[dict[str, Any]], outdir: Path) -> list[Path]:
    """Distance to the reference over steps (rows: one per model), absolute and relative, log with zero kept."""
    if not results:
        return []
    figures.runs_of(results)
    facets = figures.facets(results)
    fig, axes = figures.facet_grid([f"model: {m}" for m, _ in facets], 2, width=4.6, height=3.4)
    for row, (model, rs) in zip(axes, facets):
        vals: dict[int, list[float]] = {0: [], 1: []}
        refs = []
        for r in rs:
            steps = [step_value(s) for s in r["steps"]]
            lab = f"{figures.label(r)} (escape {console.fmt(r.get('escape_rate'))}/{settings.step_kind([r])})"
            for j, key in enumerate(("distance", "relative")):
                pts = [(s, d) for s, d in zip(steps, r[key]) if d is not None]
                if pts:
                    row[j].plot(*zip(*pts), marker="o", ms=3.5, color=figures.color(r), label=lab)
                    vals[j] += [d for _, d in pts]
            if r.get("ref_step") is not None:
                refs.append((r["ref_step"], f"reference {step_value(r['ref_step'])}", "0.3"))
        for j, ax in enumerate(row):
            figures.log_axis(ax, vals[j])
            figures.mark_steps(ax, refs, ls="-.")
            figures.mark_steps(ax, events.switch_marks(rs), ls="--")
            ax.set_xlabel(settings.step_axis(rs))
        row[0].set_ylabel("‖w_t − w_ref‖₂ (parameter units)" + figures.scale_note(row[0]))
        row[1].set_ylabel("‖w_t − w_ref‖ / ‖w_ref‖ (fraction)" + figures.scale_note(row[1]))
        row[0].set_title("distance", fontsize="small")
        row[1].set_title("relative distance (comparable across models)", fontsize="small")
    figures.figure_legend(fig, title="run")
    note = "one row per model" if len(facets) > 1 else ""
    figures.title(fig, "distance to the reference checkpoint", settings.caption("distance", results, note))
    return figures.write(fig, outdir / "distance")
