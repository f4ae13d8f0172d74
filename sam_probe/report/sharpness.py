"""Tables and figures of stored ``sharpness`` results."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from . import console, figures


def rows(results: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    k = max((len(r.get("eigenvalues") or []) for r in results), default=0)
    cols = ["run", "step", "loss", "accuracy"] + [f"λ{i + 1}" for i in range(k)] + ["max resid", "HVPs"]
    has_trace = any("trace" in r for r in results)
    has_sam = any("sam_sharpness" in r for r in results)
    cols += (["trace", "± SE"] if has_trace else []) + (["SAM sharpness"] if has_sam else []) + ["seconds"]
    out = []
    for label, r in zip(figures.row_labels(results), results):
        ev = list(r.get("eigenvalues") or [])
        res = list(r.get("residuals") or [])
        row = [label, r.get("step"), r.get("loss"), r.get("accuracy")]
        row += ev + [None] * (k - len(ev))
        row += [max(res) if res else None, r.get("n_hvp")]
        row += [r.get("trace"), r.get("trace_se")] if has_trace else []
        row += [r.get("sam_sharpness")] if has_sam else []
        out.append(row + [r.get("seconds")])
    return cols, out


def show(results: list[dict[str, Any]]) -> None:
    if not results:
        return
    cols, body = rows(results)
    backend = results[0].get("backend", "lanczos")
    console.out.print(console.table(f"sharpness ({backend})", cols, body))
    lim = results[0].get("limitations")
    if lim:
        console.out.print("PyHessian limitations: " + "; ".join(lim), highlight=False)


def plot(results: list[dict[str, Any]], outdir: Path) -> list[Path]:
    """λ1 / trace / SAM sharpness over steps (one line per run) and spectral densities."""
    import pandas as pd
    import seaborn as sns

    written: list[Path] = []
    recs = []
    for r in results:
        base = {"run": figures.run_name(r), "step": r.get("step")}
        if r.get("eigenvalues"):
            recs.append({**base, "metric": "λ1 (top eigenvalue)", "value": r["eigenvalues"][0]})
        if r.get("trace") is not None:
            recs.append({**base, "metric": "trace", "value": r["trace"]})
        if r.get("sam_sharpness") is not None:
            recs.append({**base, "metric": "SAM sharpness", "value": r["sam_sharpness"]})
    if recs:
        df = pd.DataFrame(recs)
        metrics = list(dict.fromkeys(df["metric"]))
        fig, axes = figures.new_figure(ncols=len(metrics))
        axes = [axes] if len(metrics) == 1 else list(axes.flat)
        for ax, metric in zip(axes, metrics):
            sub = df[df["metric"] == metric]
            sns.lineplot(data=sub, x="step", y="value", hue="run", marker="o", ax=ax)
            ax.set_title(metric)
            ax.set_ylabel(metric)
        written.append(figures.save(fig, outdir / "sharpness"))
    dens = [r for r in results if r.get("density")]
    if dens:
        fig, ax = figures.new_figure()
        for r in dens:
            d = r["density"]
            ax.plot(d["grid"], d["density"], label=f"{figures.run_name(r)} step {r.get('step')}")
        ax.set_yscale("log")
        ax.set_xlabel("eigenvalue")
        ax.set_ylabel("density")
        ax.legend(fontsize="x-small")
        written.append(figures.save(fig, outdir / "sharpness_density"))
    return written
