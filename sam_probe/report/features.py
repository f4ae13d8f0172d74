"""Tables and figures of stored ``features`` results (which input features a model amplifies, and when)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from . import console, events, figures, unit_settings
from .tables import Table, step_value
from .unit_settings import config, fmt_value


def caption(results: list[dict[str, Any]]) -> str:
    """The features settings in words."""
    if not results:
        return ""
    r, cfg = results[0], config(results[0])
    return ", ".join(b for b in (f"{r.get('method', cfg.get('importance'))} importance",
                                 f"{r.get('strength_method', cfg.get('strength'))} strength",
                                 f"minor = weakest {fmt_value(r.get('minor_fraction', cfg.get('minor_fraction')))}")
                     if b)


def tables_of(results: list[dict[str, Any]]) -> list[Table]:
    out = []
    for r in results:
        rows = r.get("results") or []
        has_bg = any("background_mass" in x for x in rows)
        has_dead = any(x.get("collapsed") for x in rows)
        cols = [unit_settings.step_kind([r]), "minor mass", "dominant feature", "its strength rank",
                "Spearman(growth, strength)"] + (["background mass"] if has_bg else []) + (["collapsed"] if has_dead else [])
        body = [[step_value(x.get("step")), x.get("minor_mass"), x.get("dominant_index"),
                 x.get("dominant_strength_rank"), x.get("spearman_growth_strength")]
                + ([x.get("background_mass")] if has_bg else [])
                + (["collapsed: no dominant feature" if x.get("collapsed") else ""] if has_dead else []) for x in rows]
        title = (f"{figures.run_name(r)}: features ({r.get('method')} importance, {r.get('strength_method')} strength; "
                 f"rank 0 = strongest; negative Spearman = minor first)")
        out.append(Table(title, cols, body))
    return out


COLLAPSE = 1e-3  # as sam_probe.core.features.COLLAPSE (not imported: no torch in report views)


def collapsed(importance, rows=None) -> Any:
    """Per checkpoint, whether the model collapsed: the stored flag when there is one, else its total
    importance fell below :data:`COLLAPSE` of its largest value so far (docs/metrics.md, "Features")."""
    if rows and all("collapsed" in x for x in rows):
        return np.array([bool(x["collapsed"]) for x in rows])
    tot = np.nansum(np.abs(np.asarray(importance, dtype=float)), axis=1)
    return (tot <= 0) | (tot < COLLAPSE * np.maximum.accumulate(tot)) if tot.size else np.zeros(0, dtype=bool)


def plot(results: list[dict[str, Any]], outdir: Path) -> list[Path]:
    """Minor mass over steps (all runs); importance share per feature at the last checkpoint; image heat-maps."""
    if not results:
        return []
    figures.runs_of(results)
    written = []
    fig, axes = figures.new_figure(ncols=2, width=4.8, height=3.5)
    axes = list(axes.flat)
    n_feat = 0
    any_collapsed = False
    for r in results:
        rows = r.get("results") or []
        col = figures.color(r)
        imp = np.asarray(r["importance"], dtype=float)
        dead = collapsed(imp, rows)
        any_collapsed |= bool(dead[-1])
        style = {"ls": "--", "alpha": 0.6} if dead[-1] else {}
        label = figures.label(r) + (" (collapsed)" if dead[-1] else "")
        axes[0].plot([step_value(x["step"]) for x in rows], [np.nan if x.get("minor_mass") is None else x["minor_mass"] for x in rows], marker="o", ms=3.5,
                     color=col, label=label, **style)
        order = np.argsort(-np.asarray(r["strength"], dtype=float), kind="stable")  # strongest first
        last = imp[-1][order]
        n_feat = max(n_feat, len(last))
        axes[1].plot(range(len(last)), last / max(np.nansum(last), 1e-300), marker=".", color=col,
                     label=label, **style)
    figures.mark_steps(axes[0], events.switch_marks(results), ls="--")
    axes[0].set_xlabel(unit_settings.step_axis(results))
    frac = results[0].get("minor_fraction")
    axes[0].set_ylabel("minor mass: importance share of the\n" +
                       (f"weakest {frac:g} of features (fraction)" if isinstance(frac, (int, float))
                        else "minor features (fraction)"))
    axes[0].set_ylim(-0.02, 1.02)
    axes[1].set_xlabel("feature rank by input strength (0 = strongest)")
    axes[1].set_ylabel("share of total importance,\nlast checkpoint (fraction)")
    if n_feat <= 20:
        axes[1].set_xticks(range(n_feat))
    figures.legend_beside(axes[1], title="run")
    if any_collapsed:
        axes[1].text(0.98, 0.98, f"dashed: total importance below {COLLAPSE:g} of its peak so far\n(shares of a vanished "
                     "model are noise)", transform=axes[1].transAxes, ha="right", va="top", fontsize="x-small")
    figures.title(fig, "feature amplification (normalised: shares of each model's total importance)",
                  unit_settings.caption(caption(results), results))
    written += figures.write(fig, outdir / "features")
    images = [r for r in results if r.get("image_shape")]
    if images:
        fig, axes = figures.new_figure(ncols=2, nrows=len(images), width=3.4, height=3.0)
        axes = np.asarray(axes).reshape(len(images), 2)
        for row, r in zip(axes, images):
            shape = tuple(r["image_shape"])
            imp = np.asarray(r["importance"], dtype=float)
            steps = [step_value(x["step"]) for x in r.get("results") or []]
            for ax, t in zip(row, (1 if len(imp) > 1 else 0, len(imp) - 1)):
                share = imp[t] / max(np.nansum(imp[t]), 1e-300)
                im = ax.imshow(share.reshape(shape[-2:]) if len(shape) >= 2 else share.reshape(1, -1), cmap="magma")
                bg = (r.get("results") or [{}])[t].get("background_mass")
                ax.set_title(f"{figures.label(r)}, {unit_settings.step_kind([r])} {console.fmt(steps[t])}"
                             + (f"\nbackground mass {bg:.2f}" if bg is not None else ""), fontsize="small")
                ax.set_xticks([])
                ax.set_yticks([])
                ax.grid(False)
                ax.set_xlabel("pixel column")
                ax.set_ylabel("pixel row")
                fig.colorbar(im, ax=ax, label="importance share", shrink=0.85)
        figures.title(fig, "input importance per pixel", unit_settings.caption(caption(images), images))
        written += figures.write(fig, outdir / "features_heatmaps")
    return written
