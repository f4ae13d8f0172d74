"""Tables and figures of stored ``gradnorm`` results (full-batch gradient norm, per tensor and module)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from . import figures, unit_settings
from .tables import Table, step_value
from .views import Panel, Series, plot_over_steps


def caption(results: list[dict[str, Any]]) -> str:
    """The gradient's settings in words (gradnorm has no options of its own)."""
    return "full-batch gradient" if results else ""


def tables_of(results: list[dict[str, Any]], per_layer: str | None = None) -> list[Table]:
    if not results:
        return []
    step = unit_settings.step_kind(results)
    rows = [[label, step_value(r.get("step")), r.get("n_params"), r.get("loss"), r.get("accuracy"),
             r.get("grad_norm"), r.get("relative"), r.get("grad_max_abs"), _largest(r.get("per_module"))]
            for label, r in zip(figures.row_labels(results), results)]
    out = [Table(f"gradient norm ({caption(results)})",
                 ["run", step, "P", "loss", "accuracy", "||g||", "||g||/||w||", "max |g_i|", "largest module"],
                 rows)]
    if per_layer:
        key = "per_module" if per_layer == "module" else "per_tensor"
        for r in results:
            total = r.get("grad_norm") or 0.0
            prows = [[p["name"], p["n_params"], p["norm"], 100 * p["norm"] ** 2 / total ** 2 if total else None]
                     for p in r.get(key) or []]
            out.append(Table(f"{figures.run_name(r)} {step} {step_value(r.get('step'))}: ||g|| per {per_layer}",
                             [per_layer, "n", "||g_m||" if per_layer == "module" else "||g_t||", "% of ||g||²"], prows))
    return out


def _largest(parts: Any) -> str | None:
    """The module holding the largest share of ||g||²."""
    if not parts:
        return None
    return max(parts, key=lambda p: p["norm"])["name"]


def _modules(results: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(p["name"] for r in results for p in r.get("per_module") or []))


def plot(results: list[dict[str, Any]], outdir: Path) -> list[Path]:
    """||g|| and the loss over steps (rows: one per model); ||g_m|| per module over steps (rows: one per run)."""
    if not results:
        return []

    def series(key: str):
        def lines(rs: list[dict[str, Any]]) -> list[Series]:
            return [Series([step_value(r.get("step")) for r in rs], [r.get(key) for r in rs])]
        return lines

    facets = figures.facets(results)
    note = "one row per model" if len(facets) > 1 else ""
    written = plot_over_steps(
        results, [Panel("gradient norm", "‖g‖₂ = ‖∇L(w)‖₂", series("grad_norm"), log=True),
                  Panel("loss", "L(w) (loss)", series("loss"), log=True)],
        outdir, "gradnorm", "full-batch gradient norm over training",
        unit_settings.caption(caption(results), results, note), rows="model", width=4.6, height=3.4)
    modules = _modules(results)
    if len(modules) > 1:
        colors = dict(zip(modules, figures.colors_from("dark", len(modules))))

        def per_module(rs: list[dict[str, Any]]) -> list[Series]:
            x = [step_value(r.get("step")) for r in rs]
            norms = [{p["name"]: p["norm"] for p in r.get("per_module") or []} for r in rs]
            return [Series(x, [n.get(m) for n in norms], label=m, color=colors[m]) for m in modules]

        written += plot_over_steps(
            results, [Panel("gradient norm per module", "‖g_m‖₂ of module m", per_module,
                            log=True)],
            outdir, "gradnorm_modules", "gradient norm per module over training",
            unit_settings.caption(caption(results), results), rows="run", legend_title="module", width=5.6,
            height=3.4)
    return written
