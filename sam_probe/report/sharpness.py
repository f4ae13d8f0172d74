"""Tables and figures of stored ``sharpness`` results (top-k eigenvalues, trace, density, SAM sharpness, per layer)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from . import events, figures, settings, tables
from .tables import Table, step_value

DENSITY_FLOOR = 1e-5  # the SLQ density is drawn down to this fraction of its peak (Gaussian tails below are noise)
CURV_UNIT = "loss/param²"
CURVATURE_NAMES = {"hessian": "Hessian", "ggn": "GGN", "fisher": "Fisher", "ef": "empirical Fisher"}


def curvature_label(r: dict[str, Any]) -> str:
    """How a result's curvature operator is named on an axis (``Hessian`` when not recorded)."""
    return CURVATURE_NAMES.get(str(r.get("curvature") or "hessian"), str(r.get("curvature")))


def rows(results: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    k = max((len(r.get("eigenvalues") or []) for r in results), default=0)
    cols = ["run", settings.step_kind(results), "loss", "accuracy"] + [f"λ{i + 1}" for i in range(k)] + \
        ["max resid", "HVPs"]
    has_trace = any(r.get("trace") is not None for r in results)
    has_sam = any(r.get("sam_sharpness") is not None for r in results)
    cols += (["trace", "± SE"] if has_trace else []) + (["SAM sharpness"] if has_sam else []) + ["seconds"]
    out = []
    for label, r in zip(figures.row_labels(results), results):
        ev = list(r.get("eigenvalues") or [])
        res = [x for x in (r.get("residuals") or []) if x is not None]
        row = [label, step_value(r.get("step")), r.get("loss"), r.get("accuracy")]
        row += ev + [None] * (k - len(ev))
        row += [max(res) if res else None, r.get("n_hvp")]
        row += [r.get("trace"), r.get("trace_se")] if has_trace else []
        row += [r.get("sam_sharpness")] if has_sam else []
        out.append(row + [r.get("seconds")])
    return cols, out


def layer_rows(results: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    cols = ["run", settings.step_kind(results), "layer", "params", "λ_max", "resid", "trace", "± SE"]
    body = [[figures.run_name(r), step_value(r.get("step")), e.get("name"), e.get("n_params"), e.get("top_eigenvalue"),
             e.get("residual"), e.get("trace"), e.get("trace_se")]
            for r in results for e in r.get("per_layer") or []]
    return cols, body


def tables_of(results: list[dict[str, Any]]) -> list[Table]:
    if not results:
        return []
    cols, body = rows(results)
    backend = settings.config(results[0]).get("backend") or results[0].get("backend", "lanczos")
    notes = []
    lim = results[0].get("limitations")
    if lim:
        notes.append("PyHessian limitations: " + "; ".join(lim))
    out = [Table(f"sharpness ({backend})", cols, body, notes)]
    if any(r.get("per_layer") for r in results):
        lc, lb = layer_rows(results)
        out.append(Table("sharpness per layer (each layer's own Hessian block)", lc, lb))
    return out


def show(results: list[dict[str, Any]]) -> None:
    tables.show(tables_of(results))


# ----------------------------------------------------------------- figures
METRICS = (("eigenvalues", "λ1, top Hessian eigenvalue", f"λ1 ({CURV_UNIT})"),
           ("trace", "Hessian trace (band: ± SE)", f"tr(H) ({CURV_UNIT})"),
           ("sam_sharpness", "SAM sharpness", "L(w+ε) − L(w) (loss)"))


def _value(r: dict[str, Any], key: str) -> float | None:
    if key == "eigenvalues":
        ev = r.get("eigenvalues") or []
        return max(ev) if ev and ev[0] is not None else None
    v = r.get(key)
    return float(v) if isinstance(v, (int, float)) else None


def plot(results: list[dict[str, Any]], outdir: Path) -> list[Path]:
    """λ1 / trace / SAM sharpness over steps (rows: one per model; colours: runs), density, per-layer bars."""
    written: list[Path] = []
    if not results:
        return written
    written += plot_metrics(results, outdir)
    written += plot_density(results, outdir)
    written += plot_layers(results, outdir)
    return written


def plot_metrics(results: list[dict[str, Any]], outdir: Path) -> list[Path]:
    metrics = [m for m in METRICS if any(_value(r, m[0]) is not None for r in results)]
    if not metrics:
        return []
    facets = figures.facets(results)
    figures.runs_of(results)
    import numpy as np
    fig, axes = figures.facet_grid([f"model: {m}" for m, _ in facets], len(metrics), width=4.2, height=3.2)
    xlabel = settings.step_axis(results)
    for row, (model, rs) in zip(axes, facets):
        for ax, (key, short, ylabel) in zip(row, metrics):
            for run in figures.runs_of(rs):
                pts = sorted((r.get("step"), _value(r, key), r.get("trace_se")) for r in rs
                             if figures.run_key(r) == run and _value(r, key) is not None and r.get("step") is not None)
                if not pts:
                    continue
                x, y, se = zip(*pts)
                ax.plot(x, y, marker="o", ms=3.5, color=figures.color(run), label=figures.label(run))
                if key == "trace" and any(s is not None for s in se):
                    s = np.array([np.nan if v is None else v for v in se], dtype=float)
                    ax.fill_between(x, np.array(y) - s, np.array(y) + s, color=figures.color(run), alpha=0.2, lw=0)
            if key == "eigenvalues":
                draw_edges(ax, rs)
            figures.mark_steps(ax, events.switch_marks(rs))
            ax.set_title(short, fontsize="small")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
    figures.figure_legend(fig, title="run")
    note = "one row per model (runs of different models are never on one axis)" if len(facets) > 1 else \
        (facets[0][0] if facets[0][0] else "")
    figures.title(fig, "sharpness over training", settings.caption("sharpness", results, note))
    return figures.write(fig, outdir / "sharpness")


def draw_edges(ax, rs: list[dict[str, Any]]) -> None:
    """Edge of stability on the λ1 axis: 2/η per run (dashed, where η is known) and SAM's edge (dotted),
    only when the axis already reaches half-way to them (a line far above the data would flatten it)."""
    top = max((_value(r, "eigenvalues") or 0.0) for r in rs)
    above: list[str] = []
    for run in figures.runs_of(rs):
        mine = sorted((r for r in rs if figures.run_key(r) == run and r.get("step") is not None),
                      key=lambda r: r["step"])
        edges = [(r["step"], r.get("lambda_edge")) for r in mine if isinstance(r.get("lambda_edge"), (int, float))]
        if edges and min(e for _, e in edges) <= 2 * top:
            ax.plot([s for s, _ in edges], [e for _, e in edges], ls="--", lw=1, color=figures.color(run),
                    label=f"{figures.label(run)}: 2/η")
        elif edges:
            above.append(f"{figures.label(run)}: 2/η = {min(e for _, e in edges):.3g}")
        sam = [(r["step"], r["sam_edge"]["lambda_edge"]) for r in mine if isinstance(r.get("sam_edge"), dict)
               and isinstance(r["sam_edge"].get("lambda_edge"), (int, float))]
        if sam and min(e for _, e in sam) <= 2 * top:
            ax.plot([s for s, _ in sam], [e for _, e in sam], ls=":", lw=1.2, color=figures.color(run),
                    label=f"{figures.label(run)}: SAM edge")
    if above:
        ax.text(0.02, 0.98, "edge of stability above the axis:\n" + "\n".join(above[:4]), transform=ax.transAxes,
                ha="left", va="top", fontsize="x-small")


def plot_density(results: list[dict[str, Any]], outdir: Path) -> list[Path]:
    import numpy as np

    dens = [r for r in results if r.get("density")]
    if not dens:
        return []
    fig, ax = figures.new_figure(width=5.6)
    styles = ["-", "--", "-.", ":"]
    floor = np.inf
    for i, r in enumerate(sorted(dens, key=lambda r: (figures.run_key(r), r.get("step") or 0))):
        d = r["density"]
        y = np.array([np.nan if v is None else v for v in d["density"]], dtype=float)
        peak = np.nanmax(y) if np.isfinite(y).any() else 1.0
        f = peak * DENSITY_FLOOR
        floor = min(floor, f)
        run = figures.run_key(r)
        n_same = sum(figures.run_key(x) == run for x in dens[:i])
        ax.plot(d["grid"], np.maximum(y, f), ls=styles[n_same % len(styles)], color=figures.color(run),
                label=f"{figures.label(run)}, {settings.step_kind([r])} {step_value(r.get('step'))}")
    ax.set_yscale("log")
    ax.set_ylim(bottom=floor)
    ax.set_xlabel(f"Hessian eigenvalue λ ({CURV_UNIT})")
    ax.set_ylabel(f"spectral density (1/({CURV_UNIT}), log)")
    figures.legend_beside(ax, title="run, checkpoint")
    sig = dens[0]["density"].get("sigma")
    cfg = settings.config(dens[0])
    how = (f"SLQ, {cfg.get('density_steps', '?')} Lanczos steps × {cfg.get('density_probes', '?')} probes"
           + (f", Gaussian σ={sig:.3g}" if isinstance(sig, (int, float)) else "")
           + f", drawn down to {DENSITY_FLOOR:g} × peak")
    parts = [how, settings.data_text(dens), settings.numerics_text(dens)]
    figures.title(fig, "Hessian spectral density", " · ".join(p for p in parts if p))
    return figures.write(fig, outdir / "sharpness_density")


def plot_layers(results: list[dict[str, Any]], outdir: Path) -> list[Path]:
    """Per layer: λ_max and trace at the last checkpoint of each run (bars), and λ_max over steps."""
    import numpy as np

    with_layers = [r for r in results if r.get("per_layer")]
    if not with_layers:
        return []
    runs = figures.runs_of(with_layers)
    has_trace = any(e.get("trace") is not None for r in with_layers for e in r["per_layer"])
    ncols = 3 if has_trace else 2
    layer_names = list(dict.fromkeys(e["name"] for r in with_layers for e in r["per_layer"]))
    height = max(3.0, 0.28 * len(layer_names) + 1.4)
    fig, axes = figures.new_figure(ncols=ncols, nrows=len(runs), width=4.4, height=height)
    axes = np.asarray(axes).reshape(len(runs), ncols)
    step_name = settings.step_kind(with_layers)
    layer_colors = dict(zip(layer_names, figures.colors_from("viridis", len(layer_names))))  # depth order, not run colours
    for row, run in zip(axes, runs):
        rs = sorted((r for r in with_layers if figures.run_key(r) == run), key=lambda r: r.get("step") or 0)
        last = rs[-1]
        names = [e["name"] for e in last["per_layer"]]
        ypos = np.arange(len(names))
        lam = [e.get("top_eigenvalue") if e.get("top_eigenvalue") is not None else np.nan for e in last["per_layer"]]
        row[0].barh(ypos, lam, color=figures.color(run))
        row[0].set_yticks(ypos, names, fontsize="x-small")
        row[0].invert_yaxis()
        row[0].set_xlabel(f"λ_max of the layer's {curvature_label(last)} block ({CURV_UNIT})")
        row[0].set_ylabel("layer (parameter tensor)")
        row[0].set_title(f"{figures.label(run)}: {step_name} {step_value(last.get('step'))}", fontsize="small",
                         color=figures.color(run))
        if has_trace:
            tr = [e.get("trace") if e.get("trace") is not None else np.nan for e in last["per_layer"]]
            se = [e.get("trace_se") if e.get("trace_se") is not None else 0.0 for e in last["per_layer"]]
            row[1].barh(ypos, tr, xerr=se, color=figures.color(run), alpha=0.8, ecolor="black", capsize=2)
            row[1].set_yticks(ypos, names, fontsize="x-small")
            row[1].invert_yaxis()
            row[1].set_xlabel(f"trace of the layer's block ± SE ({CURV_UNIT})")
            row[1].set_ylabel("layer (parameter tensor)")
            row[1].set_title("trace per layer", fontsize="small")
        ax = row[-1]
        steps = [step_value(r.get("step")) for r in rs]
        for name in names:  # one line per layer on the step axis (numeric ticks never collide)
            vals = []
            for r in rs:
                e = next((e for e in r["per_layer"] if e["name"] == name), {})
                vals.append(e.get("top_eigenvalue") if e.get("top_eigenvalue") is not None else np.nan)
            ax.plot(steps, vals, marker="o", ms=3, lw=1.4, color=layer_colors[name], label=name)
        figures.mark_steps(ax, events.switch_marks(rs), ls="--")
        ax.set_xlabel(settings.step_axis(rs))
        ax.set_ylabel(f"λ_max per layer ({CURV_UNIT})")
        ax.set_title("per-layer λ_max over training", fontsize="small")
        figures.legend_beside(ax, title="layer")
    figures.title(fig, "sharpness per layer", settings.caption("sharpness", with_layers))
    return figures.write(fig, outdir / "sharpness_layers")
