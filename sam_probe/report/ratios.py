"""Tables and figures of stored ``ratios`` results."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..core.categories import CATEGORIES
from . import console, figures



def _bin_label(b: dict[str, Any]) -> str:
    hi = b.get("hi")
    return f"[{b['lo']:g},{'inf' if hi is None else format(hi, 'g')})"


def show(results: list[dict[str, Any]], bucket: bool = False, per_layer: bool = False) -> None:
    if not results:
        return
    r0 = results[0]
    title = f"ratio categories (% of P; rho={r0.get('rho')}, {r0.get('variant')}" + \
        (f", m={r0['m']}" if r0.get("m") else "") + (", faithful" if r0.get("faithful") else "") + ")"
    cols = ["run", "step", "P", "|g|", "|g~|"] + list(CATEGORIES) + ["C1 top-|g| share", "lift"]
    rows = []
    for label, r in zip(figures.row_labels(results), results):
        fr = r.get("fractions") or {}
        ms = r.get("magnitude_split") or {}
        rows.append([label, r.get("step"), r.get("n_params"), r.get("grad_norm"),
                     r.get("perturbed_grad_norm")] + [100 * fr.get(c, 0.0) for c in CATEGORIES]
                    + [ms.get("share"), ms.get("lift")])
    console.out.print(console.table(title, cols, rows))
    if bucket:
        labels = [_bin_label(b) for b in r0.get("buckets") or []]
        brows = [[figures.run_name(r), r.get("step"), r["counts"]["C1"]] + [b["count"] for b in r.get("buckets") or []]
                 for r in results]
        console.out.print(console.table("C1 ratio bins (counts)", ["run", "step", "C1"] + labels, brows))
    if per_layer:
        for r in results:
            lrows = [[e["name"], e["n"]] + [100 * e["counts"].get(c, 0) / max(e["n"], 1) for c in CATEGORIES]
                     for e in r.get("per_layer") or []]
            console.out.print(console.table(f"{figures.run_name(r)} step {r.get('step')}: per tensor (% of tensor)",
                                            ["layer", "n"] + list(CATEGORIES), lrows))


def plot(results: list[dict[str, Any]], outdir: Path, bucket: bool = True) -> list[Path]:
    """Stacked category fractions over steps (one panel per run); C1 bin histogram."""
    if not results:
        return []
    runs = list(dict.fromkeys(figures.run_name(r) for r in results))
    written = []
    fig, axes = figures.new_figure(ncols=len(runs))
    axes = [axes] if len(runs) == 1 else list(axes.flat)
    for ax, run in zip(axes, runs):
        rs = sorted((r for r in results if figures.run_name(r) == run), key=lambda r: r.get("step") or 0)
        steps = [r.get("step") for r in rs]
        ys = [[100 * (r.get("fractions") or {}).get(c, 0.0) for r in rs] for c in CATEGORIES]
        if len(rs) > 1:
            ax.stackplot(steps, ys, labels=CATEGORIES, alpha=0.85)
        else:
            bottom = 0.0
            for c, y in zip(CATEGORIES, ys):
                ax.bar([str(steps[0])], y, bottom=bottom, label=c)
                bottom += y[0]
        ax.set_title(run)
        ax.set_xlabel("step")
        ax.set_ylabel("% of parameters")
        ax.set_ylim(0, 100)
    axes[-1].legend(fontsize="x-small", loc="center left", bbox_to_anchor=(1.0, 0.5))
    written.append(figures.save(fig, outdir / "ratios_categories"))
    if bucket and any(r.get("buckets") for r in results):
        import pandas as pd
        import seaborn as sns

        recs = []
        for run in runs:  # last checkpoint of each run
            r = max((r for r in results if figures.run_name(r) == run), key=lambda r: r.get("step") or 0)
            c1 = max(r["counts"]["C1"], 1)
            recs += [{"run": run, "bin": _bin_label(b), "share of C1 (%)": 100 * b["count"] / c1}
                     for b in r.get("buckets") or []]
        fig, ax = figures.new_figure(width=6)
        sns.barplot(data=pd.DataFrame(recs), x="bin", y="share of C1 (%)", hue="run", ax=ax)
        ax.set_xlabel("C1 ratio r = g~/g bin (last checkpoint)")
        ax.tick_params(axis="x", rotation=30)
        written.append(figures.save(fig, outdir / "ratios_buckets"))
    return written
