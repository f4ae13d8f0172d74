"""Suspicious alignment: the gradient lives in the top Hessian eigenspace, yet the loss falls in the bulk — against
the first-order null, in one step and over many.

Gur-Ari et al. (2018) found the gradient quickly concentrated in the top-k eigenspace (k = number of
classes); Song et al. (2025) showed that steps along that subspace do not lower the loss while steps in
its complement (the bulk) do, and that SGD restricted to the bulk (Bulk-SGD) trains like SGD while
Dom-SGD stalls; Deng et al. (2026) describe χ_k first falling, then rising, and a critical step size.

The null: to first order a step ``-η P g`` lowers the loss by ``η gᵀPg``, so the one-step split is
``dL_bulk / dL_dom ≈ (1 - χ²)/χ²`` on *any* landscape; "the bulk lowers the loss more" is then true
of every checkpoint with χ² < 1/2.  Here two runs of the digits MLP 64-64-64-10:

- SGD, cross-entropy, lr 0.1, batch 64 (η λ_max ≈ 0.1-0.3, far below the edge of stability);
- full-batch GD, squared error on one-hot targets, lr 2: λ_max rises to 2/η and stays there (the
  edge of stability, Cohen et al. 2021).

At checkpoints of each: χ_k of the full gradient (k = 10 certified eigenvectors), the one-step
``dL_dom, dL_bulk, dL_full`` at η = lr against the first-order null and the second-order prediction;
from one checkpoint of each, ``H`` further steps of the same optimiser unprojected, projected on the
top-10 space (Dom) and on its complement (Bulk), the projector recomputed every 10 steps
(``sam-probe train --resume CKPT --project dom|bulk --k 10 --eigen-every 10``); and η*_emp.

    python docs/gallery/alignment.py [--quick] [--out DIR]
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _claims  # noqa: E402
import _common as C  # noqa: E402

NAME = "alignment"
MODEL = {"in_dim": 64, "hidden": [64, 64], "out_dim": 10}
K = 10
PAPER = {"source": "Gur-Ari et al. 2018 (gradient in the top-k space); Song et al. 2025 ('Does SGD really happen in "
                   "tiny subspaces?': Dom-SGD stalls, Bulk-SGD trains like SGD); Deng et al. 2026 (suspicious "
                   "alignment, critical step size), as summarised in the project's seed documents",
         "claims": ["chi_k of the gradient rises to a large value (the gradient lives in the top-k space)",
                    "steps along the top-k space do not lower the loss (they can raise it); the bulk does",
                    "alignment first decreases, then increases; a critical step size separates the two"],
         "numbers": "none quoted in the seed summaries (qualitative claims)"}
RUNS = {"sgd": {"label": "SGD, CE, lr 0.1, batch 64", "lr": 0.1, "batch": 64, "loss": "ce"},
        "eos": {"label": "GD, MSE, lr 2 (edge of stability)", "lr": 2.0, "batch": 0, "loss": "mse"}}


def size(quick: bool) -> dict:
    if quick:
        return {"sgd": {"steps": 200, "keep": [0, 10, 30, 80, 200], "start": 200},
                "eos": {"steps": 200, "keep": [0, 100, 200], "start": 200},
                "horizon": 30, "eigen_every": 10, "grid_points": 9, "eta_steps": [30]}
    return {"sgd": {"steps": 800, "keep": [0, 2, 5, 10, 15, 20, 30, 40, 60, 80, 100, 150, 200, 300, 400, 500, 600, 800],
                    "start": 200},
            "eos": {"steps": 1000, "keep": [0, 50, 100, 200, 300, 400, 600, 800, 1000], "start": 400},
            "horizon": 200, "eigen_every": 10, "grid_points": 25, "eta_steps": [10, 100, 800]}


def datasets():
    import dataclasses

    import torch

    from sam_probe.loading.data import load_data

    ce = load_data("digits")
    mse = dataclasses.replace(ce, targets=torch.nn.functional.one_hot(ce.targets, 10).float(),
                              meta={**ce.meta, "loss": "mse"})
    return {"sgd": ce, "eos": mse}


def one_step_rows(model, states, data, lr: float, eta_steps: list[int], grid_points: int) -> list[dict]:
    import sam_probe as sp
    from sam_probe.core.alignment import default_eta_grid

    rows = []
    for step, state, _ in states:
        obj = C.objective(model, state, data)
        eig = sp.top_eigen(obj, k=K, tol=1e-4)
        grid = default_eta_grid(max(eig.eigenvalues), lr, grid_points) if step in eta_steps else []
        res = sp.alignment(obj, eig.eigenvectors, eig.eigenvalues, eta=lr, vectors=["full"], eta_grid=grid)
        chi_sq = res.chi["full"] ** 2
        measured = res.dL["bulk"] / res.dL["dom"] if res.dL["dom"] != 0 else None
        rows.append({"step": step, "loss": res.loss, "chi": res.chi["full"], "chi_sq": chi_sq, "dL": res.dL,
                     "dL_pred": res.dL_pred, "lambda_max": res.lambda_max, "eta_lambda_max": res.eta_lambda_max,
                     "bulk_over_dom": measured, "first_order_null": _claims.first_order_ratio(chi_sq),
                     "beyond_null": None if measured is None else measured / _claims.first_order_ratio(chi_sq),
                     "naive_claim": _claims.naive_bulk_claim(res.dL),
                     "claim_beyond_first_order": _claims.bulk_beyond_first_order(res.dL, chi_sq),
                     "eta_grid": res.eta_grid, "delta_chi": res.delta_chi, "eta_star": res.eta_star,
                     "max_residual": max(eig.residuals), "n_params": obj.n_params})
    return rows


def projected(model, state, data, spec: dict, start: int, horizon: int, every: int, chi_sq: float) -> dict:
    """Loss of the unprojected, Dom and Bulk continuations of ``state`` (at step ``start``) for ``horizon`` steps."""
    from sam_probe.training import TrainState

    out = {"start": start, "horizon": horizon, "chi_sq_at_start": chi_sq, "curves": {}}
    for kind in ("full", "dom", "bulk"):
        m, st = C.train_run("mlp", MODEL, data, seed=0, optimizer="sgd", lr=spec["lr"], batch_size=spec["batch"],
                            steps=start + horizon, checkpoint_every=max(1, horizon // 20), weights=state,
                            start=TrainState(step=start, draws=start), project=None if kind == "full" else kind, k=K,
                            eigen_every=every, eigen_tol=1e-3)
        losses = [C.objective(m, w, data).loss() for _, w, _ in st]
        out["curves"][kind] = {"steps": [s - start for s, _, _ in st], "loss": losses}
    dec = {k: v["loss"][0] - v["loss"][-1] for k, v in out["curves"].items()}
    out["decrease"] = dec
    out["bulk_over_dom"] = dec["bulk"] / dec["dom"] if dec["dom"] > 0 else None
    out["first_order_null"] = _claims.first_order_ratio(chi_sq)
    out["claim"] = _claims.multi_step_bulk(dec, chi_sq)
    return out


def main(argv=None) -> dict:
    args = C.parse(NAME, __doc__, argv)
    if args.replot:
        return C.replot(args.out, NAME, figure)
    t0 = time.time()
    cfg = size(args.quick)
    data = datasets()
    out: dict = {}
    with C.one_thread():
        for key, spec in RUNS.items():
            rc = cfg[key]
            keep = sorted(set(rc["keep"]) | {rc["start"]})
            model, states = C.train_run("mlp", MODEL, data[key], seed=0, optimizer="sgd", lr=spec["lr"],
                                        steps=rc["steps"], batch_size=spec["batch"], keep=keep)
            rows = one_step_rows(model, states, data[key], spec["lr"], cfg["eta_steps"] if key == "sgd" else [],
                                 cfg["grid_points"])
            at = {s: w for s, w, _ in states}[rc["start"]]
            chi_sq = next(r["chi_sq"] for r in rows if r["step"] == rc["start"])
            out[key] = {"settings": {**spec, "steps": rc["steps"]}, "rows": rows,
                        "projected": projected(model, at, data[key], spec, rc["start"], cfg["horizon"],
                                               cfg["eigen_every"], chi_sq)}
    sgd = out["sgd"]["rows"]
    chi = np.array([r["chi"] for r in sgd])
    i_min = int(np.argmin(chi))
    late = [r for r in sgd if r["step"] >= 120]
    eos_rows = [r for r in out["eos"]["rows"] if r["step"] >= 100]
    numbers = {"settings": {"model": "mlp 64-64-64-10", "data": "digits", "k": K, "eigen_tol": 1e-4,
                            "horizon": cfg["horizon"], "eigen_every": cfg["eigen_every"]},
               "paper": PAPER, "runs": out,
               "chance_chi": math.sqrt(K / sgd[0]["n_params"]),
               "chi_first": float(chi[0]), "chi_min": float(chi[i_min]), "chi_min_step": sgd[i_min]["step"],
               "chi_last": float(chi[-1]),
               "down_then_up": bool(0 < i_min < len(chi) - 1 and chi[i_min] < chi[0] and chi[i_min] < chi[-1]),
               "eta_star": {r["step"]: r["eta_star"] for r in sgd if r["eta_grid"]},
               "one_step": {
                   "sgd_from_step_120": {"bulk_over_dom": [r["bulk_over_dom"] for r in late],
                                         "first_order_null": [r["first_order_null"] for r in late],
                                         "beyond_null": [r["beyond_null"] for r in late],
                                         "naive_claim_holds": [r["naive_claim"] for r in late],
                                         "claim_beyond_first_order": [r["claim_beyond_first_order"] for r in late]},
                   "eos_from_step_100": {"eta_lambda_max": [r["eta_lambda_max"] for r in eos_rows],
                                         "chi_sq": [r["chi_sq"] for r in eos_rows],
                                         "bulk_over_dom": [r["bulk_over_dom"] for r in eos_rows],
                                         "first_order_null": [r["first_order_null"] for r in eos_rows],
                                         "beyond_null": [r["beyond_null"] for r in eos_rows],
                                         "claim_beyond_first_order": [r["claim_beyond_first_order"]
                                                                      for r in eos_rows]}},
               "multi_step": {k: {kk: out[k]["projected"][kk] for kk in ("start", "horizon", "chi_sq_at_start",
                                                                          "decrease", "bulk_over_dom",
                                                                          "first_order_null", "claim")}
                              for k in out}}
    fig = figure(numbers)
    return C.write(args.out, NAME, fig, numbers, t0)


def figure(numbers: dict):
    from sam_probe.report.figures import new_figure

    col = C.colors()
    runs = numbers["runs"]
    fig, ax = new_figure(ncols=3, nrows=2, width=5.2, height=3.7)
    style = {"sgd": (col["sgd"], "o", RUNS["sgd"]["label"]), "eos": (col["sam"], "s", RUNS["eos"]["label"])}

    a = ax[0][0]
    for key, (c, mk, lab) in style.items():
        rows = runs[key]["rows"]
        x = np.maximum([r["step"] for r in rows], 0.5)
        a.plot(x, [r["chi"] for r in rows], marker=mk, color=c, label=lab)
    a.axhline(numbers["chance_chi"], color=col["baseline"], ls=":", label="random direction √(k/P)")
    a.set_xscale("log")
    a.set_ylim(0, 1)
    a.set_xlabel("training step (log; step 0 at 0.5)")
    a.set_ylabel(f"χ_k = ||P_k g|| / ||g||, k = {K}")
    a.set_title("alignment of the full gradient", fontsize=10)
    a.legend(loc="lower right", fontsize=7)

    a = ax[0][1]
    for key, (c, mk, lab) in style.items():
        rows = [r for r in runs[key]["rows"] if r["step"] > 0]
        a.plot([r["step"] for r in rows], [r["eta_lambda_max"] for r in rows], marker=mk, color=c, label=lab)
    a.axhline(2.0, color=col["event"], ls="--", label="edge of stability η λ_max = 2")
    a.set_xscale("log")
    a.set_xlabel("training step (log)")
    a.set_ylabel("η · λ_max")
    a.set_title("step size against curvature", fontsize=10)
    a.legend(loc="center right", fontsize=7)

    a = ax[0][2]
    for key, (c, mk, lab) in style.items():
        rows = [r for r in runs[key]["rows"] if r["bulk_over_dom"] is not None and r["step"] > 0]
        a.plot([r["step"] for r in rows], [abs(r["bulk_over_dom"]) for r in rows], marker=mk, color=c,
               label=f"{lab}: measured")
        a.plot([r["step"] for r in rows], [r["first_order_null"] for r in rows], ls=":", color=c,
               label="first-order null (1 − χ²)/χ²")
    a.axhline(1.0, color=col["baseline"], lw=0.8)
    a.set_xscale("log")
    a.set_yscale("log")
    C.plain_log(a)
    a.set_xlabel("training step (log)")
    a.set_ylabel("|dL_bulk / dL_dom| (one step at η = lr)")
    a.set_title("one step: beyond the first-order null?", fontsize=10)
    a.legend(loc="upper left", fontsize=6.5)

    for a, key in ((ax[1][0], "sgd"), (ax[1][1], "eos")):
        p = runs[key]["projected"]
        for kind, c, lab in (("full", col["baseline"], "unprojected"), ("dom", col["sam"], f"Dom (top-{K} space)"),
                             ("bulk", col["sgd"], "Bulk (complement)")):
            cv = p["curves"][kind]
            a.plot(cv["steps"], cv["loss"], color=c, marker=".", ms=3,
                   label=f"{lab}: −ΔL = {p['decrease'][kind]:.3g}")
        a.set_yscale("log")
        C.plain_log(a)
        a.set_xlabel(f"steps after step {p['start']}")
        a.set_ylabel("training loss")
        a.set_title(f"{RUNS[key]['label']}: {p['horizon']} projected steps\n(χ² at start {p['chi_sq_at_start']:.2f}; "
                    f"first-order null: bulk/dom = {p['first_order_null']:.2f})", fontsize=9)
        a.legend(loc="lower left", fontsize=7)

    a = ax[1][2]
    rows = [r for r in runs["sgd"]["rows"] if r["eta_grid"]]
    for r, c in zip(rows, (col["sgd"], col["sam"], col["late-sam"])):
        eta = np.array(r["eta_grid"]) * r["lambda_max"]
        a.plot(eta, r["delta_chi"], marker=".", color=c, label=f"step {r['step']} (λ_max {r['lambda_max']:.2f})")
        if r["eta_star"] is not None:
            a.axvline(r["eta_star"] * r["lambda_max"], color=c, ls="--", lw=1,
                      label=f"η*_emp λ_max = {r['eta_star'] * r['lambda_max']:.2f}")
    a.axhline(0, color=col["baseline"], lw=0.8)
    a.set_xscale("log")
    a.set_yscale("symlog", linthresh=1e-3)
    a.set_xlabel("η · λ_max (edge of stability at 2)")
    a.set_ylabel("Δχ_k after one full-batch step")
    a.set_title("critical step size (SGD run)", fontsize=10)
    a.legend(loc="lower left", fontsize=6.5)
    C.caption(fig, "Suspicious alignment on the digits MLP: one step and many, against the first-order null",
              f"mlp 64-64-64-10; k = {K} eigenvectors (residual ≤ 1e-4); full training set, float64; projector "
              f"recomputed every {numbers['settings']['eigen_every']} steps")
    return fig


if __name__ == "__main__":
    main()
