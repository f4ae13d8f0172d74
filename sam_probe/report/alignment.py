"""Tables and figures of stored ``alignment`` results (χ_k in the top-k eigenspace, dominant vs bulk loss change)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from . import events, figures, settings, tables
from .tables import Table, step_value

VECTORS = ("full", "minibatch", "sam", "update")
DIRECTIONS = ("dom", "bulk", "full")


def tables_of(results: list[dict[str, Any]]) -> list[Table]:
    if not results:
        return []
    vecs = [v for v in VECTORS if any(v in (r.get("chi") or {}) for r in results)]
    cols = ["run", settings.step_kind(results), "k", "λ1"] + [f"chi {v}" for v in vecs] + \
        ["dL dom", "dL bulk", "dL full", "pred full", "eta", "eta*_emp", "eta·λmax"]
    rows = []
    for label, r in zip(figures.row_labels(results), results):
        chi, dl, pred = r.get("chi") or {}, r.get("dL") or {}, r.get("dL_pred") or {}
        ev = [e for e in (r.get("eigenvalues") or []) if e is not None]
        rows.append([label, step_value(r.get("step")), r.get("k"), max(ev) if ev else None]
                    + [chi.get(v) for v in vecs]
                    + [dl.get("dom"), dl.get("bulk"), dl.get("full"), pred.get("full"), r.get("eta"),
                       r.get("eta_star"), r.get("eta_lambda_max")])
    return [Table("alignment with the top-k Hessian eigenspace", cols, rows)]


def show(results: list[dict[str, Any]]) -> None:
    tables.show(tables_of(results))


def chance(r: dict[str, Any]) -> float | None:
    """χ_k of a random direction: sqrt(k / P) (needs the parameter count P in the result)."""
    k, n = r.get("k"), r.get("n_params")
    return math.sqrt(k / n) if isinstance(k, (int, float)) and isinstance(n, (int, float)) and n > 0 else None


def plot(results: list[dict[str, Any]], outdir: Path) -> list[Path]:
    """Per run: χ_k of each vector over steps (with chance) and the one-step loss decrease −ΔL by subspace."""
    import numpy as np
    from matplotlib.lines import Line2D

    if not results:
        return []
    runs = figures.runs_of(results)
    fig, axes = figures.new_figure(ncols=2, nrows=len(runs), width=4.8, height=3.4)
    axes = np.asarray(axes).reshape(len(runs), 2)
    vcol = dict(zip(VECTORS, figures.colors_from("colorblind", len(VECTORS))))
    dark = figures.colors_from("dark", 10)
    dcol = {"dom": dark[0], "bulk": dark[1], "full": (0.1, 0.1, 0.1)}
    for (ax_chi, ax_dl), run in zip(axes, runs):
        rs = sorted((r for r in results if figures.run_key(r) == run), key=lambda r: r.get("step") or 0)
        steps = [step_value(r.get("step")) for r in rs]
        for v in VECTORS:
            ys = [(s, (r.get("chi") or {}).get(v)) for s, r in zip(steps, rs)]
            ys = [(s, y) for s, y in ys if y is not None]
            if ys:
                ax_chi.plot(*zip(*ys), marker="o", ms=3.5, color=vcol[v], label=f"{v} gradient" if v != "update"
                            else "update (w_t+1 − w_t)")
        ch = [(s, chance(r)) for s, r in zip(steps, rs) if chance(r) is not None]
        if ch:
            ax_chi.plot(*zip(*ch), ls="--", color="0.4", lw=1.0, label="chance √(k/P)")
        ax_chi.set_ylim(0, 1.02)
        ax_chi.set_ylabel("χ_k = ‖P_k v‖ / ‖v‖ (fraction, 0–1)")
        ax_chi.set_title(f"{figures.label(run)}: χ_k of each vector", fontsize="small",
                         color=figures.color(run))
        vals = []
        for d in DIRECTIONS:
            ys = [(s, -(r.get("dL") or {}).get(d)) for s, r in zip(steps, rs) if (r.get("dL") or {}).get(d) is not None]
            ps = [(s, -(r.get("dL_pred") or {}).get(d)) for s, r in zip(steps, rs)
                  if (r.get("dL_pred") or {}).get(d) is not None]
            if ys:
                ax_dl.plot(*zip(*ys), marker="o", ms=3.5, color=dcol[d], label={"dom": "dominant (top-k)",
                                                                               "bulk": "bulk (rest)",
                                                                               "full": "full step"}[d])
                vals += [y for _, y in ys]
            if ps:
                ax_dl.plot(*zip(*ps), ls="none", marker="x", ms=5, color=dcol[d])
                vals += [y for _, y in ps]
        if vals:
            figures.log_axis(ax_dl, vals)
        ax_dl.axhline(0, color="grey", lw=0.6)
        ax_dl.set_ylabel("loss decrease −ΔL (loss)" + figures.scale_note(ax_dl))
        ax_dl.set_title("one step along each subspace (× 2nd-order prediction)", fontsize="small")
        for ax in (ax_chi, ax_dl):
            ax.set_xlabel(settings.step_axis(rs))
            figures.mark_steps(ax, events.switch_marks(rs), ls="--")
        figures.legend_beside(ax_chi, title="vector v")
        h, lab = ax_dl.get_legend_handles_labels()
        figures.legend_beside(ax_dl, h + [Line2D([], [], ls="none", marker="x", color="0.3")],
                              lab + ["prediction"], title="direction")
    figures.title(fig, "gradient alignment with the dominant eigenspace", settings.caption("alignment", results))
    return figures.write(fig, outdir / "alignment")
