"""Tables and figures of stored ``sharpness`` results: eigenvalues with their residuals, trace, density,
sharpness in the ρ-ball (one-step SAM, worst case, average case) and per-layer spectra."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from . import events, figures, unit_settings
from .tables import Table, step_value
from .unit_settings import config, curvature_name, sam_text, setting
from .views import Panel, Series, plot_over_steps, style_handle

DENSITY_FLOOR = 1e-5  # the SLQ density is drawn down to this fraction of its peak (Gaussian tails below are noise)
CURV_UNIT = "loss/param²"


def curvature_label(r: dict[str, Any]) -> str:
    """How a result's curvature operator is named on an axis (``Hessian`` when not recorded)."""
    return curvature_name(config(r), r)


def which(results: list[dict[str, Any]]) -> str:
    """``LA``, ``SA`` or ``LM``: which end of the spectrum the eigenvalues are."""
    r = results[0]
    return str(setting(config(r), r, "which", "LA")).upper()


def eigen_names(which_end: str, k: int) -> list[str]:
    """Column names of ``k`` eigenvalues in stored (descending) order: λ1..λk for the largest,
    λ(P−k+1)..λ(P) for the smallest (P parameters), λ(LM i) for the largest magnitudes."""
    if which_end == "SA":
        return [f"λ(P−{k - 1 - i})" if i < k - 1 else "λ(P)" for i in range(k)]
    if which_end == "LM":
        return [f"λ(LM{i + 1})" for i in range(k)]
    return [f"λ{i + 1}" for i in range(k)]


WHICH_NOTE = {"SA": "λ(P) is the smallest eigenvalue, λ(P−1) the next (P parameters)",
              "LM": "λ(LM i): the eigenvalues of largest magnitude, in descending order of value"}


def caption(results: list[dict[str, Any]]) -> str:
    """The sharpness settings in words."""
    if not results:
        return ""
    r = results[0]
    cfg = config(r)
    k = cfg.get("top_k") or max((len(x.get("eigenvalues") or []) for x in results), default=0)
    backend = setting(cfg, r, "backend", "lanczos")
    tol = cfg.get("tol")
    bits = [f"top-{k} {which(results)} {curvature_label(r)} eigenvalues ({backend}"
            + (f", tol {tol:g})" if tol else ")")] if k else []
    if cfg.get("trace") or any(x.get("trace") is not None for x in results):
        tt = cfg.get("trace_tol")
        bits.append(f"trace {setting(cfg, r, 'trace_method', 'hutch++')}" + (f" (rel. SE tol {tt:g})" if tt else ""))
    if cfg.get("density") or any(x.get("density") for x in results):
        bits.append(f"SLQ density ({cfg.get('density_steps', '?')} steps, {cfg.get('density_probes', '?')} probes)")
    bits.append(sam_text(cfg, r))
    if cfg.get("worst_case") or any(x.get("worst_case_sharpness") is not None for x in results):
        bits.append(f"worst case: Auto-PGD, {cfg.get('ascent_steps', '?')} steps" + (", adaptive" if cfg.get("adaptive") else ""))
    if cfg.get("average_case") or any(x.get("average_case_sharpness") is not None for x in results):
        bits.append(f"average case: {cfg.get('samples', '?')} Gaussian draws")
    return ", ".join(b for b in bits if b)


def _residual(v: Any) -> str | None:
    """A residual with one significant digit (its order of magnitude is what it certifies)."""
    return f"{v:.0e}" if isinstance(v, (int, float)) else None


def rows(results: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    k = max((len(r.get("eigenvalues") or []) for r in results), default=0)
    names = eigen_names(which(results), k)
    present = {key: any(r.get(key) is not None for r in results)
               for key in ("trace", "sam_sharpness", "worst_case_sharpness", "average_case_sharpness")}
    cols = ["run", unit_settings.step_kind(results), "loss", "accuracy"] + names + [f"resid {n}" for n in names]
    cols += ["HVPs"] + (["trace", "± SE"] if present["trace"] else [])
    cols += (["SAM sharpness"] if present["sam_sharpness"] else [])
    cols += (["worst case"] if present["worst_case_sharpness"] else [])
    cols += (["average case", "± SE"] if present["average_case_sharpness"] else []) + ["seconds"]
    out = []
    for label, r in zip(figures.row_labels(results), results):
        ev = list(r.get("eigenvalues") or [])
        res = list(r.get("residuals") or [])
        row = [label, step_value(r.get("step")), r.get("loss"), r.get("accuracy")]
        row += ev + [None] * (k - len(ev))
        row += [_residual(x) for x in res] + [None] * (k - len(res))
        row += [r.get("n_hvp")]
        row += [r.get("trace"), r.get("trace_se")] if present["trace"] else []
        row += [r.get("sam_sharpness")] if present["sam_sharpness"] else []
        row += [r.get("worst_case_sharpness")] if present["worst_case_sharpness"] else []
        row += [r.get("average_case_sharpness"), r.get("average_case_se")] if present["average_case_sharpness"] else []
        out.append(row + [r.get("seconds")])
    return cols, out


def layer_rows(results: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    cols = ["run", unit_settings.step_kind(results), grouping(results), "params", "λ_max", "resid", "trace", "± SE"]
    body = [[figures.run_name(r), step_value(r.get("step")), e.get("name"), e.get("n_params"), e.get("top_eigenvalue"),
             _residual(e.get("residual")), e.get("trace"), e.get("trace_se")]
            for r in results for e in r.get("per_layer") or []]
    return cols, body


def grouping(results: list[dict[str, Any]]) -> str:
    """``module`` or ``tensor``: what one per-layer block is (``--per-layer``)."""
    r = next((r for r in results if r.get("per_layer")), results[0])
    by = r.get("per_layer_by") or config(r).get("per_layer") or "tensor"
    return "module" if by == "module" else "tensor"


def tables_of(results: list[dict[str, Any]]) -> list[Table]:
    if not results:
        return []
    cols, body = rows(results)
    backend = setting(config(results[0]), results[0], "backend", "lanczos")
    notes = []
    if which(results) in WHICH_NOTE:
        notes.append(f"--which {which(results)}: {WHICH_NOTE[which(results)]}")
    if any(r.get("worst_case_sharpness") is not None for r in results):
        notes.append("worst case: the largest L(w+e) − L(w) the ascent reached in the ρ-ball (a lower bound); "
                     "average case: mean over Gaussian perturbations of the same radius, ± its SE")
    lim = results[0].get("limitations")
    if lim:
        notes.append("PyHessian limitations: " + "; ".join(lim))
    out = [Table(f"sharpness ({backend}, {curvature_label(results[0])})", cols, body, notes)]
    if any(r.get("per_layer") for r in results):
        lc, lb = layer_rows(results)
        out.append(Table(f"sharpness per {grouping(results)} (each block of the {curvature_label(results[0])} "
                         "on its own)", lc, lb))
    return out


# ----------------------------------------------------------------- figures
def _lead(r: dict[str, Any], which_end: str) -> float | None:
    """The eigenvalue a panel follows: the largest (LA), the smallest (SA) or the largest |λ| (LM)."""
    ev = [e for e in r.get("eigenvalues") or [] if e is not None]
    if not ev:
        return None
    return {"SA": min(ev), "LM": max(ev, key=abs)}.get(which_end, max(ev))


def _num(r: dict[str, Any], key: str) -> float | None:
    v = r.get(key)
    return float(v) if isinstance(v, (int, float)) else None


BALL = (("sam_sharpness", "one-step SAM", {"ls": "-", "marker": "o"}, None),
        ("worst_case_sharpness", "worst case (ascent, a lower bound)", {"ls": "--", "marker": "^"}, None),
        ("average_case_sharpness", "average case (band: ± SE)", {"ls": ":", "marker": "s"}, "average_case_se"))


def panels(results: list[dict[str, Any]]) -> tuple[list[Panel], list[tuple[Any, str]]]:
    """The panels over steps present in ``results`` and the legend entries of their line styles."""
    end = which(results)
    curv = curvature_label(results[0])
    out: list[Panel] = []
    extra: list[tuple[Any, str]] = []
    if any(_lead(r, end) is not None for r in results):
        name = {"SA": ("smallest", "λ(P)"), "LM": ("largest-magnitude", "λ(LM1)")}.get(end, ("top", "λ1"))
        top = max((abs(_lead(r, end) or 0.0) for r in results), default=0.0)
        drawn = [x.label for k in figures.runs_of(results)
                 for x in edge_series([r for r in results if figures.run_key(r) == k], top)] if end == "LA" else []
        edged = bool(drawn)

        def lead(rs: list[dict[str, Any]]) -> list[Series]:
            line = [Series([step_value(r.get("step")) for r in rs], [_lead(r, end) for r in rs])]
            return line + (edge_series(rs, top) if edged else [])

        out.append(Panel(f"{name[1]}, {name[0]} {curv} eigenvalue", f"{name[1]} ({CURV_UNIT})", lead))
        if "_2/eta" in drawn:
            extra.append(style_handle("2/η: edge of stability", ls="--"))
        if "_sam_edge" in drawn:
            extra.append(style_handle("SAM edge", ls=":"))
        above = edges_above(results, top) if end == "LA" else []
        if above:  # named in the legend, not drawn: a line far above the data would flatten it
            extra.append(style_handle("2/η above the axis: " + ", ".join(above[:3]), ls="none"))
    if any(r.get("trace") is not None for r in results):
        out.append(Panel(f"{curv} trace (band: ± SE)", f"tr ({CURV_UNIT})",
                         lambda rs: [Series([step_value(r.get("step")) for r in rs], [_num(r, "trace") for r in rs],
                                            band=[_num(r, "trace_se") for r in rs])]))
    ball = [b for b in BALL if any(r.get(b[0]) is not None for r in results)]
    if ball:
        def series(rs: list[dict[str, Any]]) -> list[Series]:
            x = [step_value(r.get("step")) for r in rs]
            lines, labelled = [], False
            for key, _, style, se in ball:
                y = [_num(r, key) for r in rs]
                if not any(v is not None for v in y):
                    continue
                lines.append(Series(x, y, style=style, band=[_num(r, se) for r in rs] if se else None,
                                    label=None if not labelled else "_" + key))
                labelled = True
            return lines

        title = "SAM sharpness" if len(ball) == 1 else "sharpness in the ρ-ball"
        out.append(Panel(title, "L(w+e) − L(w) (loss)", series))
        if len(ball) > 1:
            extra += [style_handle(text, **style) for _, text, style, _ in ball]
    return out, extra


def plot(results: list[dict[str, Any]], outdir: Path) -> list[Path]:
    """Eigenvalue / trace / sharpness over steps (rows: one per model; colours: runs), density, per-layer bars."""
    written: list[Path] = []
    if not results:
        return written
    written += plot_metrics(results, outdir)
    written += plot_density(results, outdir)
    written += plot_layers(results, outdir)
    return written


def plot_metrics(results: list[dict[str, Any]], outdir: Path) -> list[Path]:
    ps, extra = panels(results)
    facets = figures.facets(results)
    note = "one row per model (runs of different models are never on one axis)" if len(facets) > 1 else \
        (facets[0][0] if facets and facets[0][0] else "")
    return plot_over_steps(results, ps, outdir, "sharpness", "sharpness over training",
                           unit_settings.caption(caption(results), results, note), rows="model",
                           legend_extra=extra, width=4.2, height=3.2)


def edges_above(results: list[dict[str, Any]], top: float) -> list[str]:
    """``2/η = 20`` for every η known whose edge lies beyond twice the largest λ1 (so not drawn)."""
    out = []
    for k in figures.runs_of(results):
        e = [float(r["lambda_edge"]) for r in results if figures.run_key(r) == k and r.get("step") is not None
             and isinstance(r.get("lambda_edge"), (int, float))]
        if e and min(e) > 2 * top:
            out.append(f"{min(e):.3g}")
    return list(dict.fromkeys(out))


def edge_series(rs: list[dict[str, Any]], top: float) -> list[Series]:
    """Edge of stability on the λ1 panel of one run: 2/η (dashed, where η is known) and SAM's edge
    (dotted), drawn only when the axis already reaches half-way to them (``top``: the largest λ1 of
    the figure), so a line far above the data never flattens it."""
    mine = [r for r in rs if r.get("step") is not None]
    out: list[Series] = []
    edges = [(step_value(r["step"]), float(r["lambda_edge"])) for r in mine
             if isinstance(r.get("lambda_edge"), (int, float))]
    if edges and min(e for _, e in edges) <= 2 * top:
        out.append(Series([x for x, _ in edges], [e for _, e in edges], label="_2/eta",
                          style={"ls": "--", "lw": 1.0, "marker": None}))
    sam = [(step_value(r["step"]), float(r["sam_edge"]["lambda_edge"])) for r in mine if isinstance(r.get("sam_edge"), dict)
           and isinstance(r["sam_edge"].get("lambda_edge"), (int, float))]
    if sam and min(e for _, e in sam) <= 2 * top:
        out.append(Series([x for x, _ in sam], [e for _, e in sam], label="_sam_edge",
                          style={"ls": ":", "lw": 1.2, "marker": None}))
    return out


def plot_density(results: list[dict[str, Any]], outdir: Path) -> list[Path]:
    import numpy as np

    dens = [r for r in results if r.get("density")]
    if not dens:
        return []
    curv = curvature_label(dens[0])
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
                label=f"{figures.label(run)}, {unit_settings.step_kind([r])} {step_value(r.get('step'))}")
    ax.set_yscale("log")
    ax.set_ylim(bottom=floor)
    ax.set_xlabel(f"{curv} eigenvalue λ ({CURV_UNIT})")
    ax.set_ylabel(f"spectral density (1/({CURV_UNIT}), log)")
    figures.legend_beside(ax, title="run, checkpoint")
    sig = dens[0]["density"].get("sigma")
    cfg = config(dens[0])
    how = (f"SLQ, {cfg.get('density_steps', '?')} Lanczos steps × {cfg.get('density_probes', '?')} probes"
           + (f", Gaussian σ={sig:.3g}" if isinstance(sig, (int, float)) else "")
           + f", drawn down to {DENSITY_FLOOR:g} × peak")
    figures.title(fig, f"{curv} spectral density", unit_settings.caption(how, dens))
    return figures.write(fig, outdir / "sharpness_density")


def plot_layers(results: list[dict[str, Any]], outdir: Path) -> list[Path]:
    """Per layer: λ_max and trace at the last checkpoint of each run (bars), and λ_max over steps
    (only for runs with more than one checkpoint)."""
    import numpy as np

    with_layers = [r for r in results if r.get("per_layer")]
    if not with_layers:
        return []
    runs = figures.runs_of(with_layers)
    curv = curvature_label(with_layers[0])
    block = {"module": "module", "tensor": "parameter tensor"}[grouping(with_layers)]
    has_trace = any(e.get("trace") is not None for r in with_layers for e in r["per_layer"])
    over_steps = not all(len({r.get("step") for r in with_layers if figures.run_key(r) == k}) <= 1 for k in runs)
    ncols = 1 + has_trace + over_steps
    layer_names = list(dict.fromkeys(e["name"] for r in with_layers for e in r["per_layer"]))
    height = max(3.0, 0.28 * len(layer_names) + 1.4)
    fig, axes = figures.new_figure(ncols=ncols, nrows=len(runs), width=4.4, height=height)
    axes = np.asarray(axes).reshape(len(runs), ncols)
    step_name = unit_settings.step_kind(with_layers)
    layer_colors = dict(zip(layer_names, figures.colors_from("viridis", len(layer_names))))  # depth order, not runs
    for row, run in zip(axes, runs):
        rs = sorted((r for r in with_layers if figures.run_key(r) == run), key=lambda r: r.get("step") or 0)
        last = rs[-1]
        names = [e["name"] for e in last["per_layer"]]
        ypos = np.arange(len(names))
        lam = [e.get("top_eigenvalue") if e.get("top_eigenvalue") is not None else np.nan for e in last["per_layer"]]
        row[0].barh(ypos, lam, color=figures.color(run))
        row[0].set_yticks(ypos, names, fontsize="x-small")
        row[0].invert_yaxis()
        row[0].set_xlabel(f"λ_max of the {block}'s {curv} block ({CURV_UNIT})")
        row[0].set_ylabel(block)
        row[0].set_title(f"{figures.label(run)}: {step_name} {step_value(last.get('step'))}", fontsize="small",
                         color=figures.color(run))
        if has_trace:
            tr = [e.get("trace") if e.get("trace") is not None else np.nan for e in last["per_layer"]]
            se = [e.get("trace_se") if e.get("trace_se") is not None else 0.0 for e in last["per_layer"]]
            row[1].barh(ypos, tr, xerr=se, color=figures.color(run), alpha=0.8, ecolor="black", capsize=2)
            row[1].set_yticks(ypos, names, fontsize="x-small")
            row[1].invert_yaxis()
            row[1].set_xlabel(f"trace of the {block}'s block ± SE ({CURV_UNIT})")
            row[1].set_ylabel(block)
            row[1].set_title(f"trace per {block}", fontsize="small")
        if not over_steps:
            continue
        ax = row[-1]
        steps = [step_value(r.get("step")) for r in rs]
        for name in names:  # one line per layer on the step axis (numeric ticks never collide)
            vals = []
            for r in rs:
                e = next((e for e in r["per_layer"] if e["name"] == name), {})
                vals.append(e.get("top_eigenvalue") if e.get("top_eigenvalue") is not None else np.nan)
            ax.plot(steps, vals, marker="o", ms=3, lw=1.4, color=layer_colors[name], label=name)
        figures.mark_steps(ax, events.switch_marks(rs), ls="--")
        ax.set_xlabel(unit_settings.step_axis(rs))
        ax.set_ylabel(f"λ_max per {block} ({CURV_UNIT})")
        ax.set_title(f"per-{block} λ_max over training" + ("" if len(rs) > 1 else " (one checkpoint)"),
                     fontsize="small")
        figures.legend_beside(ax, title=block)
    figures.title(fig, f"sharpness per {block}", unit_settings.caption(caption(with_layers), with_layers))
    return figures.write(fig, outdir / "sharpness_layers")
