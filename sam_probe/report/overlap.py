"""Tables and figures of stored ``overlap`` results."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from . import console, figures


def _name(r: dict[str, Any]) -> str:
    return Path(str(r.get("run", "run"))).name


def show(results: list[dict[str, Any]]) -> None:
    for r in results:
        a, k = r["anchor"], r["persistent"]
        ire = r.get("ire") or {}
        cols = ["step", f"|{r['category']}|", "% of P", "anchor overlap", "expected", "lift", "persistent",
                "expected"] + (["IRE flat overlap", "expected", "lift"] if ire else [])
        rows = []
        for i, step in enumerate(r["steps"]):
            row = [step, r["sizes"][i], 100 * r["fractions"][i], a["overlap"][i], a["expected"][i], a["lift"][i],
                   k["size"][i], k["expected"][i]]
            if ire:
                row += [ire["overlap"][i], ire["expected"][i], ire["lift"][i]]
            rows.append(row)
        title = f"{_name(r)}: overlap of {r['category']} with step {a['step']} (independence baseline)"
        console.out.print(console.table(title, cols, rows))


def plot(results: list[dict[str, Any]], outdir: Path) -> list[Path]:
    """Anchor overlap and persistent core vs step with baselines; Jaccard heat-maps."""
    import numpy as np
    import seaborn as sns

    written = []
    if not results:
        return written
    fig, axes = figures.new_figure(ncols=2)
    axes = list(axes.flat)
    for r in results:
        steps = r["steps"]
        line = axes[0].plot(steps, r["anchor"]["overlap"], marker="o", label=f"{_name(r)}")[0]
        axes[0].plot(steps, r["anchor"]["expected"], ls="--", color=line.get_color(), label=f"{_name(r)} chance")
        axes[1].plot(steps, r["persistent"]["size"], marker="o", color=line.get_color(), label=_name(r))
        axes[1].plot(steps, r["persistent"]["expected"], ls="--", color=line.get_color())
    cat = results[0]["category"]
    axes[0].set_title(f"|S_anchor ∩ S_t| ({cat})")
    axes[1].set_title(f"persistent core ({cat}); dashed: chance")
    for ax in axes:
        ax.set_xlabel("step")
    axes[1].set_yscale("log")
    axes[0].legend(fontsize="x-small")
    written.append(figures.save(fig, outdir / f"overlap_{cat}"))
    with_j = [r for r in results if r.get("jaccard") is not None]
    if with_j:
        fig, axes = figures.new_figure(ncols=len(with_j), width=4.6, height=4.0)
        axes = [axes] if len(with_j) == 1 else list(axes.flat)
        for ax, r in zip(axes, with_j):
            J = np.array([[np.nan if v is None else v for v in row] for row in r["jaccard"]], dtype=float)
            sns.heatmap(J, ax=ax, vmin=0, vmax=1, cmap="viridis", square=True,
                        xticklabels=r["steps"], yticklabels=r["steps"], cbar_kws={"label": "Jaccard"})
            ax.set_title(f"{_name(r)}: Jaccard of {r['category']}")
            ax.set_xlabel("step")
            ax.set_ylabel("step")
        written.append(figures.save(fig, outdir / f"overlap_{cat}_jaccard"))
    return written
