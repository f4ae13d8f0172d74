"""Tables and figures of stored ``features`` results."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from . import console, figures


def _name(r: dict[str, Any]) -> str:
    return Path(str(r.get("run", "run"))).name


def show(results: list[dict[str, Any]]) -> None:
    for r in results:
        rows = r.get("results") or []
        has_bg = any("background_mass" in x for x in rows)
        cols = ["step", "minor mass", "dominant feature", "its strength rank", "Spearman(growth, strength)"] + \
            (["background mass"] if has_bg else [])
        body = [[x.get("step"), x.get("minor_mass"), x.get("dominant_index"), x.get("dominant_strength_rank"),
                 x.get("spearman_growth_strength")] + ([x.get("background_mass")] if has_bg else []) for x in rows]
        title = (f"{_name(r)}: features ({r.get('method')} importance, {r.get('strength_method')} strength; "
                 f"rank 0 = strongest; negative Spearman = minor first)")
        console.out.print(console.table(title, cols, body))


def plot(results: list[dict[str, Any]], outdir: Path) -> list[Path]:
    """Minor mass over steps (all runs); importance per feature over steps; image heat-maps."""
    if not results:
        return []
    written = []
    fig, axes = figures.new_figure(ncols=2)
    axes = list(axes.flat)
    for r in results:
        rows = r.get("results") or []
        axes[0].plot([x["step"] for x in rows], [x["minor_mass"] for x in rows], marker="o", label=_name(r))
        imp = np.asarray(r["importance"], dtype=float)
        order = np.argsort(-np.asarray(r["strength"], dtype=float))  # strongest first
        last = imp[-1][order]
        axes[1].plot(range(len(last)), last / max(last.sum(), 1e-300), marker=".", label=_name(r))
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("minor mass")
    axes[0].set_ylim(0, 1)
    axes[0].legend(fontsize="x-small")
    axes[1].set_xlabel("feature, strongest → weakest")
    axes[1].set_ylabel("share of importance (last checkpoint)")
    written.append(figures.save(fig, outdir / "features"))
    images = [r for r in results if r.get("image_shape")]
    if images:
        fig, axes = figures.new_figure(ncols=2, nrows=len(images), width=3.2, height=3.0)
        axes = np.asarray(axes).reshape(len(images), 2)
        for row, r in zip(axes, images):
            shape = tuple(r["image_shape"])
            imp = np.asarray(r["importance"], dtype=float)
            steps = [x["step"] for x in r.get("results") or []]
            for ax, t in zip(row, (1 if len(imp) > 1 else 0, len(imp) - 1)):
                ax.imshow(imp[t].reshape(shape[-2:]) if len(shape) >= 2 else imp[t].reshape(1, -1), cmap="magma")
                bg = (r.get("results") or [{}])[t].get("background_mass")
                ax.set_title(f"{_name(r)} step {console.fmt(steps[t])}" + (f"\nbackground mass {bg:.2f}" if bg is not None else ""),
                             fontsize="small")
                ax.set_xticks([])
                ax.set_yticks([])
        written.append(figures.save(fig, outdir / "features_heatmaps"))
    return written
