"""Late-phase SAM: SAM for only the last 10% of the steps finds a flatter minimum at equal accuracy.

Zhou et al. (2025) train with SGD and switch to SAM for the last few epochs: SAM leaves
SGD's minimum quickly and reaches a much flatter one (the issue quotes ≈40% lower
sharpness) with the same test accuracy.  Here: the digits MLP 64-64-64-10 (8,970
parameters), minibatch 64, lr 0.1; SGD throughout, l2-SAM throughout, and late-SAM (SGD,
then SAM rho 0.3 for the last 10% of the steps) on the same seed and minibatch order.
Measured with the sam_probe API: λ_max (Lanczos, residual ≤ 1e-4) and the Hessian trace
(Hutch++, with its standard error) on the training set in float64, test loss/accuracy,
the distance from the switch-step weights and its escape rate, and the interpolation
barrier between the pre-switch and final weights.

    python docs/gallery/late_sam.py [--quick] [--out DIR]
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

NAME = "late_sam"
MODEL = {"in_dim": 64, "hidden": [64, 64], "out_dim": 10}
LR, BATCH, RHO = 0.1, 64, 0.3
OPTS = ("sgd", "sam", "late-sam")
LABEL = {"sgd": "SGD", "sam": "SAM", "late-sam": "late-SAM"}
TITLE = {"lambda_max": "λ_max", "trace": "trace", "test_accuracy": "test accuracy"}
ALPHAS = [round(0.05 * i, 10) for i in range(-4, 25)]  # -0.2 .. 1.2, holding 0 and 1 exactly


def size(quick: bool) -> dict:
    if quick:
        return {"steps": 600, "seeds": [0], "every": 20, "lam_every": 60, "trace_hvp": 100}
    return {"steps": 3000, "seeds": [0, 1, 2], "every": 10, "lam_every": 50, "trace_hvp": 400}


def main(argv=None) -> dict:
    args = C.parse(NAME, __doc__, argv)
    t0 = time.time()
    import sam_probe as sp
    from sam_probe.loading.data import load_data

    cfg = size(args.quick)
    T = cfg["steps"]
    switch = int(round(0.9 * T))
    data, test = load_data("digits"), load_data("digits", split="test")
    after = list(range(switch, T + 1, cfg["every"]))
    final: dict = {opt: [] for opt in OPTS}
    paths: dict = {}
    with C.one_thread():
        for seed in cfg["seeds"]:
            states = {}
            for opt in OPTS:
                model, st = C.train_run("mlp", MODEL, data, seed=seed, optimizer=opt, lr=LR, steps=T, batch_size=BATCH,
                                        rho=RHO, switch_step=switch if opt == "late-sam" else None,
                                        keep=after if opt != "sam" else [])
                states[opt] = {s: w for s, w, _ in st}
                obj = C.objective(model, st[-1][1], data)
                eig = sp.top_eigen(obj, k=1, tol=1e-4)
                tr = sp.hessian_trace(obj, tol=0.02, max_hvp=cfg["trace_hvp"], seed=seed)
                tl, ta = C.objective(model, st[-1][1], test).evaluate()
                final[opt].append({"seed": seed, "lambda_max": eig.eigenvalues[0], "residual": eig.residuals[0],
                                   "trace": tr.estimate, "trace_se": tr.se, "train_loss": obj.loss(),
                                   "test_loss": tl, "test_accuracy": ta})
            if seed == cfg["seeds"][0]:
                paths = path_measures(model, states, data, switch, T, cfg)
    numbers = {"settings": {"model": "mlp 64-64-64-10", "data": "digits", "lr": LR, "batch": BATCH, "rho": RHO,
                            "steps": T, "switch_step": switch, "sam_fraction": 1 - switch / T, "seeds": cfg["seeds"],
                            "lambda_tol": 1e-4, "trace": "hutch++"},
               "final": final, "paths": paths}
    summary = {}
    for opt in OPTS:
        summary[opt] = {k: _mean_std([r[k] for r in final[opt]])
                        for k in ("lambda_max", "trace", "train_loss", "test_loss", "test_accuracy")}
    for k in ("lambda_max", "trace"):
        summary[f"late-sam vs sgd: {k} change"] = summary["late-sam"][k][0] / summary["sgd"][k][0] - 1
    summary["late-sam vs sgd: test accuracy difference"] = (summary["late-sam"]["test_accuracy"][0]
                                                            - summary["sgd"]["test_accuracy"][0])
    numbers["summary"] = summary
    fig = figure(numbers, cfg)
    return C.write(args.out, NAME, fig, numbers, t0)


def _mean_std(v) -> list[float]:
    """``[mean, std over seeds (ddof 1; 0 for one seed)]``."""
    return [float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0]


def path_measures(model, states, data, switch: int, T: int, cfg: dict) -> dict:
    """Distance from the switch-step weights, escape rates, λ_max after the switch, barriers (first seed)."""
    import sam_probe as sp

    out: dict = {"distance": {}, "escape_rate": {}, "lambda_after": {}}
    names = [n for n, _ in model.named_parameters()]
    for opt in ("sgd", "late-sam"):
        steps = sorted(states[opt])
        d = sp.distance([{n: states[opt][s][n] for n in names} for s in steps], ref=0, steps=steps, k=5)
        out["distance"][opt] = {"steps": d.steps, "distance": d.distance}
        out["escape_rate"][opt] = d.escape_rate
        out["escape_steps"] = d.escape_steps
        lam = {}
        for s in steps:
            if (s - switch) % cfg["lam_every"] == 0 or s == T:
                lam[s] = sp.top_eigen(C.objective(model, states[opt][s], data), k=1, tol=1e-4).eigenvalues[0]
        out["lambda_after"][opt] = lam
    base = C.objective(model, states["late-sam"][T], data)
    for key, a, b in (("pre-switch -> late-SAM", states["late-sam"][switch], states["late-sam"][T]),
                      ("SGD -> late-SAM", states["sgd"][T], states["late-sam"][T])):
        r = sp.interpolate(base, a, b, ALPHAS)
        out.setdefault("interpolation", {})[key] = {"alphas": r.alphas, "loss": r.loss, "barrier": r.barrier,
                                                    "barrier_alpha": r.barrier_alpha}
    return out


def figure(numbers: dict, cfg: dict):
    from sam_probe.report.figures import new_figure

    col = C.colors()
    s = numbers["settings"]
    fig, axes = new_figure(ncols=3, nrows=2, width=4.6, height=3.5)
    x = np.arange(len(OPTS))
    for ax, key, unit, err in ((axes[0][0], "lambda_max", "λ_max of the train-loss Hessian", None),
                               (axes[0][1], "trace", "Hessian trace (Hutch++)", "trace_se"),
                               (axes[0][2], "test_accuracy", "test accuracy (fraction)", None)):
        for i, opt in enumerate(OPTS):
            vals = [r[key] for r in numbers["final"][opt]]
            ax.bar(i, np.mean(vals), width=0.6, color=col[opt])
            ax.plot(np.full(len(vals), i), vals, "k.", ms=6)
            if err:
                ax.errorbar(np.full(len(vals), i + 0.12), vals, yerr=[r[err] for r in numbers["final"][opt]],
                            fmt="none", ecolor="k", capsize=2, lw=0.8)
        ax.set_xticks(x)
        ax.set_xticklabels([LABEL[o] for o in OPTS])
        ax.set_ylabel(unit)
        ax.set_title(f"final {TITLE[key]} (bars: mean, dots: seeds)", fontsize=10)
    lo = min(r["test_accuracy"] for o in OPTS for r in numbers["final"][o])
    axes[0][2].set_ylim(max(0.0, lo - 0.03), 1.0)

    p = numbers["paths"]
    ax = axes[1][0]
    for opt in ("sgd", "late-sam"):
        d = p["distance"][opt]
        st = np.array(d["steps"]) - s["switch_step"]
        dist = np.array(d["distance"])
        ax.plot(st[1:], dist[1:], color=col[opt], marker=".", label=f"{LABEL[opt]} (escape rate {p['escape_rate'][opt]:.3f}/step)")
    ax.axvspan(0, p["escape_steps"][-1] - s["switch_step"], color=col["baseline"], alpha=0.12, lw=0,
               label="points of the escape-rate fit")
    ax.set_yscale("log")
    C.plain_log(ax)
    ax.set_xlabel(f"steps after the switch (step {s['switch_step']})")
    ax.set_ylabel("||w_t − w_switch|| (parameter units)")
    ax.set_title("distance from the switch-step weights", fontsize=10)
    ax.legend(loc="lower right", fontsize=8, frameon=False)

    ax = axes[1][1]
    for opt in ("sgd", "late-sam"):
        lam = p["lambda_after"][opt]
        ks = sorted(int(k) for k in lam)
        ax.plot(np.array(ks) - s["switch_step"], [lam[k] for k in ks], color=col[opt], marker="o", label=LABEL[opt])
    ax.set_xlabel("steps after the switch")
    ax.set_ylabel("λ_max (train loss)")
    ax.set_title("sharpness after the switch (seed 0)", fontsize=10)
    ax.legend(loc="upper right", fontsize=8, frameon=False)

    ax = axes[1][2]
    for (key, r), ls in zip(p["interpolation"].items(), ("-", "--")):
        ax.plot(r["alphas"], r["loss"], color=col["late-sam"] if ls == "-" else col["sgd"], ls=ls,
                label=f"{key}: barrier {r['barrier']:.2g}")
    ax.axvline(0, color=col["baseline"], lw=0.8, ls=":")
    ax.axvline(1, color=col["baseline"], lw=0.8, ls=":")
    ax.set_yscale("log")
    C.plain_log(ax)
    ax.set_xlabel("a in (1 − a) w_A + a w_B")
    ax.set_ylabel("train loss (CE, nats)")
    ax.set_title("linear interpolation (seed 0)", fontsize=10)
    ax.legend(loc="upper center", fontsize=8, frameon=False)
    C.caption(fig, "Late-phase SAM on the digits MLP",
              f"mlp 64-64-64-10, batch {s['batch']}, lr {s['lr']}, {s['steps']} steps; late-SAM: SAM rho {s['rho']} "
              f"from step {s['switch_step']} ({s['sam_fraction']:.0%} of the steps); {len(s['seeds'])} seed(s)")
    return fig


if __name__ == "__main__":
    main()
