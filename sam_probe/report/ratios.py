"""Tables and figures of stored ``ratios`` results (categories of r = g̃/g per parameter)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..core.categories import CATEGORIES
from . import events, figures, unit_settings
from .tables import Table, step_value
from .unit_settings import config, sam_text, setting


def _bin_label(b: dict[str, Any]) -> str:
    hi = b.get("hi")
    return f"[{b['lo']:g},{'inf' if hi is None else format(hi, 'g')})"


def caption(results: list[dict[str, Any]]) -> str:
    """The ratio settings in words."""
    if not results:
        return ""
    r, cfg = results[0], config(results[0])
    return ", ".join(b for b in (sam_text(cfg, r), "faithful" if setting(cfg, r, "faithful") else "") if b)


def tables_of(results: list[dict[str, Any]], bucket: bool = False, per_layer: bool = False) -> list[Table]:
    if not results:
        return []
    r0 = results[0]
    title = f"ratio categories (% of P; {caption(results)})"
    step = unit_settings.step_kind(results)
    cols = ["run", step, "P", "|g|", "|g~|"] + list(CATEGORIES) + ["C1 top-|g| share", "lift"]
    rows = []
    for label, r in zip(figures.row_labels(results), results):
        fr = r.get("fractions") or {}
        ms = r.get("magnitude_split") or {}
        rows.append([label, step_value(r.get("step")), r.get("n_params"), r.get("grad_norm"),
                     r.get("perturbed_grad_norm")] + [100 * (fr.get(c) or 0.0) for c in CATEGORIES]
                    + [ms.get("share"), ms.get("lift")])
    out = [Table(title, cols, rows)]
    if bucket and any(r.get("buckets") for r in results):
        labels = [_bin_label(b) for b in r0.get("buckets") or []]
        brows = [[figures.run_name(r), step_value(r.get("step")), r["counts"]["C1"]]
                 + [b["count"] for b in r.get("buckets") or []] for r in results]
        out.append(Table("C1 ratio bins (counts)", ["run", step, "C1"] + labels, brows))
    if per_layer:
        for r in results:
            lrows = [[e["name"], e["n"]] + [100 * e["counts"].get(c, 0) / max(e["n"], 1) for c in CATEGORIES]
                     for e in r.get("per_layer") or []]
            out.append(Table(f"{figures.run_name(r)} {step} {step_value(r.get('step'))}: per tensor (% of tensor)",
                             ["layer", "n"] + list(CATEGORIES), lrows))
    return out


def plot(results: list[dict[str, Any]], outdir: Path, bucket: bool = True) -> list[Path]:
    """Stacked category fractions over steps (one panel per run, % of that run's P); C1 bin shares."""
    if not results:
        return []
    runs = figures.runs_of(results)
    written = []
    ncols = min(len(runs), 3)
    nrows = -(-len(runs) // ncols)
    fig, axes = figures.new_figure(ncols=ncols, nrows=nrows, width=4.4, height=3.3)
    import numpy as np
    axes = list(np.asarray(axes).flat)
    cat_colors = figures.colors_from("colorblind", len(CATEGORIES))
    for ax, run in zip(axes, runs):
        rs = sorted((r for r in results if figures.run_key(r) == run), key=lambda r: r.get("step") or 0)
        steps = [step_value(r.get("step")) for r in rs]
        ys = [[100 * ((r.get("fractions") or {}).get(c) or 0.0) for r in rs] for c in CATEGORIES]
        if len(rs) > 1:
            ax.stackplot(steps, ys, labels=CATEGORIES, colors=cat_colors, alpha=0.9)
        else:
            bottom = 0.0
            for c, y, col in zip(CATEGORIES, ys, cat_colors):
                ax.bar([str(steps[0])], y, bottom=bottom, label=c, color=col)
                bottom += y[0]
        figures.mark_steps(ax, events.switch_marks(rs), ls="--")
        n = rs[0].get("n_params")
        ax.set_title(figures.label(run) + (f" (P = {int(n):,})" if n else ""), fontsize="small",
                     color=figures.color(run))
        ax.set_xlabel(unit_settings.step_axis(rs))
        ax.set_ylabel("% of the run's parameters")
        ax.set_ylim(0, 100)
    for ax in axes[len(runs):]:
        ax.set_visible(False)
    figures.legend_beside(axes[min(len(runs), ncols) - 1], title="category")
    figures.title(fig, "SAM ratio categories of r = g̃/g (normalised: % of each run's parameters)",
                  unit_settings.caption(caption(results), results, "C1 r>1, C2 0<r<1, C3 r<−1, C4 −1<r<0"))
    written += figures.write(fig, outdir / "ratios_categories")
    if bucket and any(r.get("buckets") for r in results):
        fig, ax = figures.new_figure(width=6.5)
        labels = None
        width = 0.8 / len(runs)
        for j, run in enumerate(runs):  # last checkpoint of each run
            r = max((r for r in results if figures.run_key(r) == run), key=lambda r: r.get("step") or 0)
            c1 = max(r["counts"]["C1"], 1)
            bs = r.get("buckets") or []
            labels = labels or [_bin_label(b) for b in bs]
            ax.bar(np.arange(len(bs)) + (j - (len(runs) - 1) / 2) * width, [100 * b["count"] / c1 for b in bs],
                   width=width, color=figures.color(run),
                   label=f"{figures.label(run)} ({unit_settings.step_kind([r])} {step_value(r.get('step'))})")
        ax.set_xticks(np.arange(len(labels or [])), labels or [], rotation=30, ha="right")
        ax.set_xlabel("C1 ratio bin of r = g̃/g (dimensionless)")
        ax.set_ylabel("share of the C1 parameters (%)")
        figures.legend_beside(ax, title="run (last checkpoint)")
        figures.title(fig, "C1 ratio bins at the last checkpoint", unit_settings.caption(caption(results), results))
        written += figures.write(fig, outdir / "ratios_buckets")
    return written
