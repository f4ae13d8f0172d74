"""Tables and figures of stored ``alignment`` results (χ_k in the top-k eigenspace, dominant vs bulk loss change).

Loss changes are shown as the loss *decrease* −ΔL in the table and the figure alike
(positive: the step lowered the loss).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from . import figures, unit_settings
from .tables import Table, step_value
from .unit_settings import config, curvature_name, fmt_value, sam_text, setting
from .views import Panel, Series, plot_over_steps, style_handle

VECTORS = ("full", "minibatch", "sam", "update")
DIRECTIONS = ("dom", "bulk", "full")
DIRECTION_NAMES = {"dom": "dominant (top-k)", "bulk": "bulk (rest)", "full": "full step"}


def caption(results: list[dict[str, Any]]) -> str:
    """The alignment settings in words."""
    if not results:
        return ""
    r = results[0]
    cfg = config(r)
    k, curv, eta = setting(cfg, r, "k"), curvature_name(cfg, r), setting(cfg, r, "eta")
    return ", ".join(b for b in (f"top-{k} {curv} eigenspace" if k else f"{curv} eigenspace",
                                 f"η={fmt_value(eta)}" if eta is not None else "",
                                 f"minibatch {setting(cfg, r, 'minibatch_size', r.get('batch_size'))}",
                                 sam_text(cfg, r)) if b)


def _neg(v: Any) -> float | None:
    return -float(v) if isinstance(v, (int, float)) else None


def tables_of(results: list[dict[str, Any]]) -> list[Table]:
    if not results:
        return []
    vecs = [v for v in VECTORS if any(v in (r.get("chi") or {}) for r in results)]
    cols = ["run", unit_settings.step_kind(results), "k", "λ1"] + [f"χ {v}" for v in vecs] + \
        ["−ΔL dom", "−ΔL bulk", "−ΔL full", "pred. −ΔL full", "η", "η*_emp", "η·λmax"]
    rows = []
    for label, r in zip(figures.row_labels(results), results):
        chi, dl, pred = r.get("chi") or {}, r.get("dL") or {}, r.get("dL_pred") or {}
        ev = [e for e in (r.get("eigenvalues") or []) if e is not None]
        rows.append([label, step_value(r.get("step")), r.get("k"), max(ev) if ev else None]
                    + [chi.get(v) for v in vecs]
                    + [_neg(dl.get("dom")), _neg(dl.get("bulk")), _neg(dl.get("full")), _neg(pred.get("full")),
                       r.get("eta"), r.get("eta_star"), r.get("eta_lambda_max")])
    curv = curvature_name(config(results[0]), results[0])
    return [Table(f"alignment with the top-k {curv} eigenspace", cols, rows,
                  ["−ΔL: loss decrease of one step of size η along each subspace (positive: the loss fell); "
                   "pred.: its second-order prediction"])]


def chance(r: dict[str, Any]) -> float | None:
    """χ_k of a random direction: sqrt(k / P) (needs the parameter count P in the result)."""
    k, n = r.get("k"), r.get("n_params")
    return math.sqrt(k / n) if isinstance(k, (int, float)) and isinstance(n, (int, float)) and n > 0 else None


def plot(results: list[dict[str, Any]], outdir: Path) -> list[Path]:
    """Per run: χ_k of each vector over steps (with chance) and the one-step loss decrease −ΔL by subspace."""
    if not results:
        return []
    cb = figures.colors_from("colorblind", 10)
    vcol = dict(zip(VECTORS, (cb[0], cb[1], cb[2], cb[4])))  # the update never shares the bulk line's hue
    dark = figures.colors_from("dark", 10)
    dcol = {"dom": dark[0], "bulk": dark[1], "full": (0.1, 0.1, 0.1)}

    def chi(rs: list[dict[str, Any]]) -> list[Series]:
        x = [step_value(r.get("step")) for r in rs]
        out = [Series(x, [(r.get("chi") or {}).get(v) for r in rs], color=vcol[v],
                      label="update (w_t+1 − w_t)" if v == "update" else f"{v} gradient") for v in VECTORS]
        return out + [Series(x, [chance(r) for r in rs], color="0.4", label="chance √(k/P)",
                             style={"ls": "--", "lw": 1.0, "marker": None})]

    def decrease(rs: list[dict[str, Any]]) -> list[Series]:
        x = [step_value(r.get("step")) for r in rs]
        out = []
        for d in DIRECTIONS:
            out.append(Series(x, [_neg((r.get("dL") or {}).get(d)) for r in rs], color=dcol[d],
                              label=DIRECTION_NAMES[d]))
            out.append(Series(x, [_neg((r.get("dL_pred") or {}).get(d)) for r in rs], color=dcol[d],
                              label="_pred", style={"ls": "none", "marker": "x", "ms": 5}))
        return out

    panels = [Panel("χ_k of each vector", "χ_k = ‖P_k v‖ / ‖v‖ (fraction, 0–1)", chi, ylim=(0, 1.02)),
              Panel("one step along each subspace (× 2nd-order prediction)", "loss decrease −ΔL (loss)", decrease,
                    log=True)]
    return plot_over_steps(results, panels, outdir, "alignment", "gradient alignment with the dominant eigenspace",
                           unit_settings.caption(caption(results), results), rows="run",
                           legend_title="vector v / direction",
                           legend_extra=[style_handle("prediction", ls="none", marker="x")], width=4.8, height=3.4)
