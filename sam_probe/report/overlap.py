"""Tables and figures of stored ``overlap`` results (persistence of a ratio category across steps)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from . import figures, unit_settings
from .tables import Table, step_value
from .unit_settings import config, sam_text
from .views import Panel, Series, plot_over_steps, style_handle


def caption(results: list[dict[str, Any]]) -> str:
    """The overlap settings in words."""
    if not results:
        return ""
    r = results[0]
    cfg = config(r)
    anchor = (r.get("anchor") or {}).get("step")
    return ", ".join(b for b in (f"category {r.get('category', cfg.get('category'))}",
                                 f"anchor step {anchor}" if anchor is not None else "",
                                 f"IRE rank {cfg['ire_rank']:g}" if cfg.get("ire_rank") else "",
                                 sam_text(cfg, r)) if b)


def _num(v: Any) -> float:
    return float("nan") if v is None else float(v)


NULL_LABELS = {"independence": "independent sets", "shuffled": "time-shuffled steps",
               "markov": "first-order Markov chain", "control": "the control run's retention"}


def null_of(r: dict[str, Any]) -> str:
    """The null whose expectation a result's ``anchor``/``persistent`` hold (results before nulls: independence)."""
    return str(r.get("null") or "independence")


def expected_label(results: list[dict[str, Any]]) -> str:
    """The legend entry of the dashed lines: the nulls the results were computed against."""
    nulls = sorted({null_of(r) for r in results})
    has_ire = any((r.get("ire") or {}).get("overlap") for r in results)
    return "expected: " + ", ".join(NULL_LABELS.get(n, n) for n in nulls) + ("; IRE: independent sets" if has_ire else "")


def tables_of(results: list[dict[str, Any]]) -> list[Table]:
    out = []
    for r in results:
        a, k = r["anchor"], r["persistent"]
        ire = r.get("ire") or {}
        cols = [unit_settings.step_kind([r]), f"|{r['category']}|", "% of P", "anchor overlap", "expected", "lift",
                "persistent", "expected", "lift"] + (["IRE flat overlap", "expected", "lift"] if ire else [])
        rows = []
        for i, step in enumerate(r["steps"]):
            row = [step_value(step), r["sizes"][i], 100 * r["fractions"][i], a["overlap"][i], a["expected"][i],
                   a["lift"][i], k["size"][i], k["expected"][i], (k.get("lift") or [None] * len(r["steps"]))[i]]
            if ire:
                row += [ire["overlap"][i], ire["expected"][i], ire["lift"][i]]
            rows.append(row)
        title = (f"{figures.run_name(r)}: overlap of {r['category']} with {unit_settings.step_kind([r])} "
                 f"{step_value(a['step'])} (expected: {NULL_LABELS.get(null_of(r), null_of(r))}"
                 + ("; IRE: independence" if ire else "") + ")")
        notes = []
        if r.get("nulls"):
            last = {n: (v["persistent"]["lift"] or [None])[-1] for n, v in r["nulls"].items()}
            notes.append("core lift at the last step under each null: " + ", ".join(
                f"{n} {v:.3g}" if isinstance(v, (int, float)) else f"{n} -" for n, v in last.items()))
        out.append(Table(title, cols, rows, notes))
    return out


def _share(values: list[Any], of: list[float]) -> list[float]:
    return [100 * _num(v) / d for v, d in zip(values, of)]


def plot(results: list[dict[str, Any]], outdir: Path) -> list[Path]:
    """Anchor overlap, persistent core and IRE overlap vs step (normalised, with chance); Jaccard heat-maps."""
    import numpy as np

    if not results:
        return []
    cat = results[0]["category"]
    chance = {"ls": "--", "lw": 1.0, "marker": None}

    def anchor(rs: list[dict[str, Any]]) -> list[Series]:
        out = []
        for r in rs:
            a = r["anchor"]
            i0 = next((i for i, s in enumerate(r["steps"]) if s == a["step"]), 0)
            size0 = [max(_num(r["sizes"][i0]), 1.0)] * len(r["steps"])
            steps = [step_value(s) for s in r["steps"]]
            out += [Series(steps, _share(a["overlap"], size0)),
                    Series(steps, _share(a["expected"], size0), label="_chance", style=chance)]
        return out

    def core(rs: list[dict[str, Any]]) -> list[Series]:
        out = []
        for r in rs:
            P = [max(_num(r.get("n_params") or 1), 1.0)] * len(r["steps"])
            steps = [step_value(s) for s in r["steps"]]
            out += [Series(steps, _share(r["persistent"]["size"], P)),
                    Series(steps, _share(r["persistent"]["expected"], P), label="_chance", style=chance)]
        return out

    def ire(rs: list[dict[str, Any]]) -> list[Series]:
        out = []
        for r in rs:
            if not (r.get("ire") or {}).get("overlap"):
                continue
            sizes = [max(_num(s), 1.0) for s in r["sizes"]]
            steps = [step_value(s) for s in r["steps"]]
            out += [Series(steps, _share(r["ire"]["overlap"], sizes)),
                    Series(steps, _share(r["ire"]["expected"], sizes), label="_chance", style=chance)]
        return out

    def anchors(rs: list[dict[str, Any]]) -> list[tuple[float, str, Any]]:
        return [(r["anchor"]["step"], f"anchor {step_value(r['anchor']['step'])}", "0.35") for r in rs]

    panels = [Panel(f"{cat} kept from the anchor step", "|S_anchor ∩ S_t| / |S_anchor| (%)", anchor,
                    ylim=(0, 105), marks=anchors),
              Panel(f"persistent core: {cat} at every checkpoint so far", "|∩ S_s, s ≤ t| (% of P)", core,
                    log=True, marks=anchors)]
    if any((r.get("ire") or {}).get("overlap") for r in results):
        panels.append(Panel(f"{cat} inside the IRE flat mask", "|S_t ∩ IRE flat mask| / |S_t| (%)", ire,
                            marks=anchors))
    written = plot_over_steps(results, panels, outdir, f"overlap_{cat}",
                              f"persistence of {cat} (normalised: % of the anchor set / of P / of S_t)",
                              unit_settings.caption(caption(results), results), rows=None,
                              legend_extra=[style_handle(expected_label(results), ls="--")], width=4.3,
                              height=3.4)
    with_j = [r for r in results if r.get("jaccard") is not None and len(r["jaccard"]) > 1]
    if with_j:
        mats = [[[np.nan if v is None else v for v in row] for row in r["jaccard"]] for r in with_j]
        fig = figures.step_heatmaps(with_j, mats, "Jaccard |A∩B| / |A∪B| (0–1)")
        figures.title(fig, f"pairwise Jaccard index of {cat} between checkpoints",
                      unit_settings.caption(caption(with_j), with_j))
        written += figures.write(fig, outdir / f"overlap_{cat}_jaccard")
    return written
