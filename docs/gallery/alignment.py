"""Suspicious alignment: the gradient lives in the top Hessian eigenspace, yet the loss falls in the bulk.

Gur-Ari et al. (2018) found the gradient quickly concentrated in the top-k eigenspace
(k = number of classes); Song et al. (2025) showed that the step along that subspace does
not lower the loss, the bulk does; Deng et al. (2026) describe the alignment χ_k first
falling, then rising over training, and a critical step size η* at which one step
switches from raising to lowering χ_k.  Here: SGD on the digits MLP 64-64-64-10 (lr 0.1,
batch 64), at checkpoints from step 0 on: χ_k = ||P_k g|| / ||g|| of the full-batch
gradient (and of a minibatch gradient) with k = 10 certified eigenvectors; the one-step
loss changes dL_dom, dL_bulk, dL_full at η = lr with their second-order predictions; and
Δχ_k(η) = χ_k(∇L(w − η g)) − χ_k(g) over a grid of η with η*_emp (``sam_probe.alignment``).

    python docs/gallery/alignment.py [--quick] [--out DIR]
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

NAME = "alignment"
MODEL = {"in_dim": 64, "hidden": [64, 64], "out_dim": 10}
LR, BATCH, K = 0.1, 64, 10


def size(quick: bool) -> dict:
    if quick:
        return {"steps": 200, "keep": [0, 5, 10, 20, 40, 80, 120, 200], "grid_points": 13, "eta_steps": [20, 200]}
    return {"steps": 800, "keep": [0, 2, 5, 10, 15, 20, 30, 40, 60, 80, 100, 150, 200, 300, 400, 500, 600, 800],
            "grid_points": 25, "eta_steps": [10, 100, 800]}


def main(argv=None) -> dict:
    args = C.parse(NAME, __doc__, argv)
    t0 = time.time()
    import sam_probe as sp
    from sam_probe.core.alignment import default_eta_grid
    from sam_probe.loading.data import load_data

    cfg = size(args.quick)
    data = load_data("digits")
    rows = []
    with C.one_thread():
        model, states = C.train_run("mlp", MODEL, data, seed=0, optimizer="sgd", lr=LR, steps=cfg["steps"],
                                    batch_size=BATCH, keep=cfg["keep"])
        for step, state, _ in states:
            obj = C.objective(model, state, data)
            eig = sp.top_eigen(obj, k=K, tol=1e-4)
            grid = default_eta_grid(max(eig.eigenvalues), LR, cfg["grid_points"]) if step in cfg["eta_steps"] else []
            res = sp.alignment(obj, eig.eigenvectors, eig.eigenvalues, eta=LR, vectors=["full", "minibatch"],
                               batch_size=BATCH, eta_grid=grid)
            rows.append({"step": step, "chi_full": res.chi["full"], "chi_minibatch": res.chi["minibatch"],
                         "dL": res.dL, "dL_pred": res.dL_pred, "lambda_max": res.lambda_max, "loss": res.loss,
                         "eta_lambda_max": res.eta_lambda_max, "eta_grid": res.eta_grid, "delta_chi": res.delta_chi,
                         "eta_star": res.eta_star, "max_residual": max(eig.residuals), "n_params": obj.n_params})
    chi = np.array([r["chi_full"] for r in rows])
    i_min = int(np.argmin(chi))
    numbers = {"settings": {"model": "mlp 64-64-64-10", "data": "digits", "optimizer": "sgd", "lr": LR,
                            "batch": BATCH, "k": K, "steps": cfg["steps"], "eigen_tol": 1e-4},
               "chance_chi": math.sqrt(K / rows[0]["n_params"]), "rows": rows,
               "chi_first": float(chi[0]), "chi_min": float(chi[i_min]), "chi_min_step": rows[i_min]["step"],
               "chi_last": float(chi[-1]), "down_then_up": bool(0 < i_min < len(chi) - 1 and chi[i_min] < chi[0]
                                                               and chi[i_min] < chi[-1]),
               "bulk_over_dom": [abs(r["dL"]["bulk"]) / max(abs(r["dL"]["dom"]), 1e-300) for r in rows],
               "eta_star": {r["step"]: r["eta_star"] for r in rows if r["eta_grid"]}}
    fig = figure(numbers)
    return C.write(args.out, NAME, fig, numbers, t0)


def figure(numbers: dict):
    from sam_probe.report.figures import new_figure

    col = C.colors()
    rows = numbers["rows"]
    steps = np.array([r["step"] for r in rows])
    x = np.maximum(steps, 0.5)  # step 0 drawn at 0.5 on the log axis (marked)
    fig, grid = new_figure(ncols=2, nrows=2, width=5.8, height=3.4)
    axes = [grid[0][0], grid[0][1], grid[1][1], grid[1][0]]
    ax = axes[0]
    ax.plot(x, [r["chi_full"] for r in rows], marker="o", color=col["sgd"], label="full-batch gradient")
    ax.plot(x, [r["chi_minibatch"] for r in rows], marker=".", ls="--", color=col["sam"], label=f"minibatch ({BATCH})")
    ax.axhline(numbers["chance_chi"], color=col["baseline"], ls=":", label="random direction √(k/P)")
    ax.axvline(max(numbers["chi_min_step"], 0.5), color=col["event"], lw=0.8, ls="--",
               label=f"minimum at step {numbers['chi_min_step']}")
    ax.set_xscale("log")
    ax.set_xlabel("training step (log; step 0 drawn at 0.5)")
    ax.set_ylabel(f"χ_k = ||P_k g|| / ||g||, k = {K}")
    ax.set_ylim(0, 1)
    ax.set_title("alignment with the top-k eigenspace", fontsize=10)
    C.legend_outside(ax, fontsize=8)

    ax = axes[1]
    for key, label, c in (("dom", "dL_dom (top-k part of the step)", col["sam"]),
                          ("bulk", "dL_bulk (the rest)", col["sgd"]), ("full", "dL_full (the SGD step)", col["late-sam"])):
        ax.plot(x, [r["dL"][key] for r in rows], marker="o", color=c, label=label)
        ax.plot(x, [r["dL_pred"][key] for r in rows], ls=":", color=c, lw=1)
    ax.plot([], [], ls=":", color="k", lw=1, label="second-order prediction")
    ax.axhline(0, color=col["baseline"], lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("symlog", linthresh=1e-4)
    ax.set_xlabel("training step (log)")
    ax.set_ylabel(f"L(w − η P g) − L(w) at η = {LR} (nats)")
    ax.set_title("one-step loss change by subspace", fontsize=10)
    C.legend_outside(ax, fontsize=8)

    ax = axes[3]
    chi_sq = np.array([r["chi_full"] ** 2 for r in rows])
    dom_share = np.array([r["dL"]["dom"] / (r["dL"]["dom"] + r["dL"]["bulk"]) for r in rows])
    ax.plot(x, chi_sq, marker="o", color=col["sgd"], label="share of ||g||² in the top-k space (χ_k²)")
    ax.plot(x, dom_share, marker="s", color=col["sam"], label="share of the loss decrease from the top-k part")
    ax.set_xscale("log")
    ax.set_ylim(0, 1)
    ax.set_xlabel("training step (log)")
    ax.set_ylabel("fraction")
    ax.set_title("aligned gradient, bulk decrease", fontsize=10)
    C.legend_outside(ax, fontsize=8)

    ax = axes[2]
    for r, c in zip([r for r in rows if r["eta_grid"]], (col["sgd"], col["sam"], col["late-sam"])):
        eta = np.array(r["eta_grid"]) * r["lambda_max"]
        ax.plot(eta, r["delta_chi"], marker=".", color=c, label=f"step {r['step']} (λ_max {r['lambda_max']:.2f})")
        if r["eta_star"] is not None:
            ax.axvline(r["eta_star"] * r["lambda_max"], color=c, ls="--", lw=1,
                       label=f"η*_emp λ_max = {r['eta_star'] * r['lambda_max']:.2f}")
    ax.axvline(LR * rows[-1]["lambda_max"], color=col["baseline"], ls=":", lw=1, label=f"η = lr at step {rows[-1]['step']}")
    ax.axhline(0, color=col["baseline"], lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_xlabel("η · λ_max (edge of stability at 2)")
    ax.set_ylabel("Δχ_k after one full-batch step")
    ax.set_title("critical step size", fontsize=10)
    C.legend_outside(ax, fontsize=8)
    C.caption(fig, "Suspicious alignment on the digits MLP (SGD)",
              f"mlp 64-64-64-10, SGD lr {LR}, batch {BATCH}, k = {K} eigenvectors (residual ≤ 1e-4), "
              f"full training set, float64")
    return fig


if __name__ == "__main__":
    main()
