"""Tables and figures of stored ``overlap`` results (persistence of a ratio category across steps)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from . import events, figures, settings, tables
from .tables import Table, step_value


def _num(v: Any) -> float:
    return float("nan") if v is None else float(v)


NULL_LABELS = {"independence": "independent sets", "shuffled": "time-shuffled steps",
               "markov": "first-order Markov chain", "control": "the control run's retention"}


def null_of(r: dict[str, Any]) -> str:
    """The null whose expectation a result's ``anchor``/``persistent`` hold (results before nulls: independence)."""
    return str(r.get("null") or "independence")


def tables_of(results: list[dict[str, Any]]) -> list[Table]:
    out = []
    for r in results:
        a, k = r["anchor"], r["persistent"]
        ire = r.get("ire") or {}
        cols = [settings.step_kind([r]), f"|{r['category']}|", "% of P", "anchor overlap", "expected", "lift",
                "persistent", "expected", "lift"] + (["IRE flat overlap", "expected", "lift"] if ire else [])
        rows = []
        for i, step in enumerate(r["steps"]):
            row = [step_value(step), r["sizes"][i], 100 * r["fractions"][i], a["overlap"][i], a["expected"][i],
                   a["lift"][i], k["size"][i], k["expected"][i], (k.get("lift") or [None] * len(r["steps"]))[i]]
            if ire:
                row += [ire["overlap"][i], ire["expected"][i], ire["lift"][i]]
            rows.append(row)
        title = (f"{figures.run_name(r)}: overlap of {r['category']} with {settings.step_kind([r])} "
                 f"{step_value(a['step'])} (expected: {NULL_LABELS.get(null_of(r), null_of(r))}"
                 + ("; IRE: independence" if ire else "") + ")")
        notes = []
        if r.get("nulls"):
            last = {n: (v["persistent"]["lift"] or [None])[-1] for n, v in r["nulls"].items()}
            notes.append("core lift at the last step under each null: " + ", ".join(
                f"{n} {v:.3g}" if isinstance(v, (int, float)) else f"{n} -" for n, v in last.items()))
        out.append(Table(title, cols, rows, notes))
    return out


def show(results: list[dict[str, Any]]) -> None:
    tables.show(tables_of(results))


def plot(results: list[dict[str, Any]], outdir: Path) -> list[Path]:
    """Anchor overlap, persistent core and IRE overlap vs step (normalised, with chance); Jaccard heat-maps."""
    import numpy as np

    written: list[Path] = []
    if not results:
        return written
    figures.runs_of(results)
    has_ire = any((r.get("ire") or {}).get("overlap") for r in results)
    fig, axes = figures.new_figure(ncols=3 if has_ire else 2, width=4.3, height=3.4)
    axes = list(axes.flat)
    cat = results[0]["category"]
    core_vals: list[float] = []
    anchors = []
    for r in results:
        run, col = figures.run_key(r), figures.color(r)
        steps = [step_value(s) for s in r["steps"]]
        a = r["anchor"]
        i0 = next((i for i, s in enumerate(r["steps"]) if s == a["step"]), 0)
        size0 = max(_num(r["sizes"][i0]), 1.0)
        axes[0].plot(steps, [100 * _num(v) / size0 for v in a["overlap"]], marker="o", ms=3.5, color=col,
                     label=figures.label(run))
        axes[0].plot(steps, [100 * _num(v) / size0 for v in a["expected"]], ls="--", color=col, lw=1.0)
        P = max(_num(r.get("n_params") or 1), 1.0)
        core = [100 * _num(v) / P for v in r["persistent"]["size"]]
        core_vals += core
        axes[1].plot(steps, core, marker="o", ms=3.5, color=col, label=figures.label(run))
        axes[1].plot(steps, [100 * _num(v) / P for v in r["persistent"]["expected"]], ls="--", color=col, lw=1.0)
        if has_ire and (r.get("ire") or {}).get("overlap"):
            ire = r["ire"]
            sizes = [max(_num(s), 1.0) for s in r["sizes"]]
            axes[2].plot(steps, [100 * _num(v) / s for v, s in zip(ire["overlap"], sizes)], marker="o", ms=3.5,
                         color=col, label=figures.label(run))
            axes[2].plot(steps, [100 * _num(v) / s for v, s in zip(ire["expected"], sizes)], ls="--", color=col,
                         lw=1.0)
        anchors.append((a["step"], f"anchor {step_value(a['step'])}", "0.35"))
    for ax in axes:
        figures.mark_steps(ax, anchors, ls="-.")
        figures.mark_steps(ax, events.switch_marks(results), ls="--")
        ax.set_xlabel(settings.step_axis(results))
    axes[0].set_ylabel("|S_anchor ∩ S_t| / |S_anchor| (%)")
    axes[0].set_title(f"{cat} kept from the anchor step", fontsize="small")
    axes[0].set_ylim(0, 105)
    figures.log_axis(axes[1], core_vals)
    axes[1].set_ylabel("|∩ S_s, s ≤ t| (% of P)" + figures.scale_note(axes[1]))
    axes[1].set_title(f"persistent core: {cat} at every checkpoint so far", fontsize="small")
    if has_ire:
        axes[2].set_ylabel("|S_t ∩ IRE flat mask| / |S_t| (%)")
        axes[2].set_title(f"{cat} inside the IRE flat mask", fontsize="small")
    handles, labels = axes[0].get_legend_handles_labels()
    from matplotlib.lines import Line2D
    handles.append(Line2D([], [], ls="--", color="0.3"))
    nulls = sorted({null_of(r) for r in results})
    labels.append("expected: " + ", ".join(NULL_LABELS.get(n, n) for n in nulls) + (" (IRE: independent sets)"
                                                                                    if has_ire else ""))
    figures.legend_beside(axes[-1], handles, labels, title="run")
    figures.title(fig, f"persistence of {cat} (normalised: % of the anchor set / of P / of S_t)",
                  settings.caption("overlap", results))
    written += figures.write(fig, outdir / f"overlap_{cat}")
    with_j = [r for r in results if r.get("jaccard") is not None]
    if with_j:
        mats = [[[np.nan if v is None else v for v in row] for row in r["jaccard"]] for r in with_j]
        fig = figures.step_heatmaps(with_j, mats, "Jaccard |A∩B| / |A∪B| (0–1)")
        figures.title(fig, f"pairwise Jaccard index of {cat} between checkpoints",
                      settings.caption("overlap", with_j))
        written += figures.write(fig, outdir / f"overlap_{cat}_jaccard")
    return written
