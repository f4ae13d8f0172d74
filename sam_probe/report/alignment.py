"""Tables and figures of stored ``alignment`` results."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from . import console, figures

VECTORS = ("full", "minibatch", "sam", "update")


def show(results: list[dict[str, Any]]) -> None:
    if not results:
        return
    vecs = [v for v in VECTORS if any(v in (r.get("chi") or {}) for r in results)]
    cols = ["run", "step", "k", "λ1"] + [f"chi {v}" for v in vecs] + \
        ["dL dom", "dL bulk", "dL full", "pred full", "eta", "eta*_emp", "eta·λmax"]
    rows = []
    for label, r in zip(figures.row_labels(results), results):
        chi, dl, pred = r.get("chi") or {}, r.get("dL") or {}, r.get("dL_pred") or {}
        ev = r.get("eigenvalues") or [None]
        rows.append([label, r.get("step"), r.get("k"), max(ev) if ev[0] is not None else None]
                    + [chi.get(v) for v in vecs]
                    + [dl.get("dom"), dl.get("bulk"), dl.get("full"), pred.get("full"), r.get("eta"),
                       r.get("eta_star"), r.get("eta_lambda_max")])
    console.out.print(console.table("alignment with the top-k Hessian eigenspace", cols, rows))


def plot(results: list[dict[str, Any]], outdir: Path) -> list[Path]:
    """chi_k of each vector over steps; one-step loss change along the dominant vs bulk subspace."""
    import pandas as pd
    import seaborn as sns

    if not results:
        return []
    chis, dls = [], []
    for r in results:
        base = {"run": figures.run_name(r), "step": r.get("step")}
        chis += [{**base, "vector": v, "chi_k": c} for v, c in (r.get("chi") or {}).items() if c is not None]
        dls += [{**base, "direction": d, "dL": x} for d, x in (r.get("dL") or {}).items() if x is not None]
    fig, axes = figures.new_figure(ncols=2)
    axes = list(axes.flat)
    if chis:
        sns.lineplot(data=pd.DataFrame(chis), x="step", y="chi_k", hue="vector", style="run", marker="o", ax=axes[0])
        axes[0].set_ylim(0, 1.02)
        axes[0].set_title("chi_k = ||P_k v|| / ||v||")
    if dls:
        sns.lineplot(data=pd.DataFrame(dls), x="step", y="dL", hue="direction", style="run", marker="o", ax=axes[1])
        axes[1].axhline(0, color="grey", lw=0.8)
        axes[1].set_title("one-step loss change: dominant vs bulk")
    return [figures.save(fig, outdir / "alignment")]
