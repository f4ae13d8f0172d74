"""Late-phase SAM, with its controls: flatter than SGD at matched training loss? escaping faster than SGD's own
continuation? the same valley — and is that specific to late SAM?

Zhou et al. (2025) report that SAM switched on for the last few epochs of SGD training gives nearly the
solution sharpness and test accuracy of SAM throughout (sharpness ≈40% lower than SGD, accuracy +0.8-1.2%
on CIFAR-10/100), and describe two phases after the switch: SAM escapes SGD's minimum exponentially fast,
then converges to a flatter minimum in the same valley.  Here (digits MLP 64-64-64-10, 8,970 parameters,
minibatch 64, lr 0.1): SGD for all steps; SAM (l2, rho) for all steps; late-SAM = the SGD run continued
from the switch step (90% of the steps) with SAM, exactly as ``sam-probe train --resume CKPT --optimizer
sam``; for rho in {0.05, 0.1, 0.3} and 3 seeds (seed = init and minibatch order).  Measured with the
sam_probe API on the training set in float64:

- λ_max and trace at the end, and λ_max along each run, so that runs are compared at *matched training
  loss* (``sam_probe.core.compare``: the level both runs reach, interpolated in log loss) as well as at
  the last step;
- escape: distance from the switch-step weights at every step for 50 steps, for late-SAM, for the SGD
  continuation from the same weights (the null: SGD drifts too) and for a second SGD continuation on
  another minibatch order; exponential vs power-law fits of each with their R²; the share of the
  displacement in the top-10 Hessian eigenspace at the switch point (chance 10/P);
- same valley: the interpolation barrier SGD-final ↔ late-SAM-final, beside its controls SGD-final ↔
  SAM-final (same init, other optimiser) and SGD seed 0 ↔ SGD seed 1 (different init: the positive
  control that shows the barrier can detect two valleys).

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
LR, BATCH, K_TOP = 0.1, 64, 10
ALPHAS = [round(0.05 * i, 10) for i in range(-4, 25)]  # -0.2 .. 1.2, holding 0 and 1 exactly
PAPER = {"source": "Zhou et al. 2025, 'Sharpness-aware minimization efficiently selects flatter minima late in "
                   "training' (as summarised in the project's seed documents)",
         "setting": "CIFAR-10/100 (ResNets/WRNs), SAM for the last 3-5 epochs of SGD training",
         "sharpness_reduction_vs_sgd": "≈40% (late-SAM ≈ full SAM)",
         "test_accuracy_gain_vs_sgd": "+0.8% to +1.2% (late-SAM comparable to or better than full SAM)",
         "escape": "exponentially fast from the SGD minimum (theory), then convergence within the same valley"}


def size(quick: bool) -> dict:
    if quick:
        return {"steps": 300, "switch": 270, "seeds": [0, 1], "rhos": [0.3], "dense": 15, "traj_every": 30,
                "late_every": 15, "trace_hvp": 30}
    return {"steps": 3000, "switch": 2700, "seeds": [0, 1, 2], "rhos": [0.05, 0.1, 0.3], "dense": 50,
            "traj_every": 100, "late_every": 50, "trace_hvp": 400}


def lam(model, state, data) -> tuple[float, float]:
    import sam_probe as sp

    e = sp.top_eigen(C.objective(model, state, data), k=1, tol=1e-4)
    return float(e.eigenvalues[0]), float(e.residuals[0])


def final_numbers(model, state, data, test, seed: int, trace_hvp: int) -> dict:
    import sam_probe as sp

    obj = C.objective(model, state, data)
    eig = sp.top_eigen(obj, k=1, tol=1e-4)
    tr = sp.hessian_trace(obj, tol=0.02, max_hvp=trace_hvp, seed=seed)
    tl, ta = C.objective(model, state, test).evaluate()
    return {"seed": seed, "lambda_max": float(eig.eigenvalues[0]), "residual": float(eig.residuals[0]),
            "trace": tr.estimate, "trace_se": tr.se, "train_loss": obj.loss(), "test_loss": tl, "test_accuracy": ta}


def trajectory(model, states, data, every: int, first: int = 0) -> list[dict]:
    """``[{step, loss, lambda_max}]`` at the kept steps divisible by ``every`` (after ``first``) and the last."""
    last = states[-1][0]
    out = []
    for s, w, _ in states:
        if s >= first and ((s - first) % every == 0 or s == last):
            obj = C.objective(model, w, data)
            out.append({"step": s, "loss": obj.loss(), "lambda_max": lam(model, w, data)[0]})
    return out


def matched(a: list[dict], b: list[dict]) -> dict:
    """λ_max of runs ``a`` and ``b`` at the training loss both reach (``sam_probe.core.compare``)."""
    from sam_probe.core.compare import at_loss, matched_level

    runs = {k: [(r["step"], r["loss"], {"lambda_max": r["lambda_max"]}) for r in rs] for k, rs in (("a", a), ("b", b))}
    level = matched_level(runs)
    va, sa = at_loss(runs["a"], "lambda_max", level)
    vb, sb = at_loss(runs["b"], "lambda_max", level)
    return {"loss": level, "a": va, "a_step": sa, "b": vb, "b_step": sb,
            "change": None if not va or vb is None else vb / va - 1.0}


def escape(model, states_by_run: dict, switch: int, dense: int, data) -> dict:
    """Same-step distances from the switch weights, fits, and the top-k share of the displacement."""
    import torch

    import sam_probe as sp
    from sam_probe.core.paths import escape_fits, subspace_share

    names = [n for n, _ in model.named_parameters()]
    ref = states_by_run["sgd"][switch]
    obj = C.objective(model, ref, data)
    eig = sp.top_eigen(obj, k=K_TOP, tol=1e-4)
    V, _ = torch.linalg.qr(eig.eigenvectors.double())
    w0 = obj.space.flatten({n: ref[n].double() for n in names})
    out = {"k": K_TOP, "chance_share": K_TOP / obj.n_params, "eigen_residual_max": max(eig.residuals), "runs": {}}
    for key, st in states_by_run.items():
        steps = [s for s in sorted(st) if switch < s <= switch + dense]
        disp = [obj.space.flatten({n: st[s][n].double() for n in names}) - w0 for s in steps]
        d = [float(x.norm()) for x in disp]
        out["runs"][key] = {"steps": [s - switch for s in steps], "distance": d, "fit": escape_fits(steps, d, switch),
                            "top_k_share": subspace_share(V, disp)}
    return out


def barrier(model, a, b, data) -> float:
    import sam_probe as sp

    return float(sp.interpolate(C.objective(model, a, data), a, b, ALPHAS).barrier)


def main(argv=None) -> dict:
    args = C.parse(NAME, __doc__, argv)
    if args.replot:
        return C.replot(args.out, NAME, figure)
    t0 = time.time()
    from sam_probe.loading.data import load_data
    from sam_probe.training import TrainState

    cfg = size(args.quick)
    T, switch = cfg["steps"], cfg["switch"]
    data, test = load_data("digits"), load_data("digits", split="test")
    dense = list(range(switch, switch + cfg["dense"] + 1))
    sgd_keep = sorted(set(range(0, T + 1, cfg["traj_every"])) | set(dense))
    late_keep = sorted(set(dense) | set(range(switch, T + 1, cfg["late_every"])))
    per_seed: dict = {}
    with C.one_thread():
        for seed in cfg["seeds"]:
            rec: dict = {"final": {}, "trajectory": {}, "matched": {}}
            model, st = C.train_run("mlp", MODEL, data, seed=seed, optimizer="sgd", lr=LR, steps=T, batch_size=BATCH,
                                    keep=sgd_keep)
            sgd = {s: w for s, w, _ in st}
            rec["final"]["sgd"] = final_numbers(model, sgd[T], data, test, seed, cfg["trace_hvp"])
            rec["trajectory"]["sgd"] = trajectory(model, st, data, cfg["traj_every"])
            states = {"sgd": sgd}
            _, st2 = C.train_run("mlp", MODEL, data, seed=seed, optimizer="sgd", lr=LR, steps=switch + cfg["dense"],
                                 batch_size=BATCH, keep=dense, weights=sgd[switch], start=TrainState(step=switch),
                                 stream_seed=seed + 1000)
            states["sgd, other minibatches"] = {s: w for s, w, _ in st2}
            for rho in cfg["rhos"]:
                _, sl = C.train_run("mlp", MODEL, data, seed=seed, optimizer="sam", rho=rho, lr=LR, steps=T,
                                    batch_size=BATCH, keep=late_keep, weights=sgd[switch],
                                    start=TrainState(step=switch, draws=switch))
                late = {s: w for s, w, _ in sl}
                states[f"late-sam {rho:g}"] = late
                _, ss = C.train_run("mlp", MODEL, data, seed=seed, optimizer="sam", rho=rho, lr=LR, steps=T,
                                    batch_size=BATCH, checkpoint_every=cfg["traj_every"] * 3)
                sam = {s: w for s, w, _ in ss}
                rec["final"][f"late-sam {rho:g}"] = final_numbers(model, late[T], data, test, seed, cfg["trace_hvp"])
                rec["final"][f"sam {rho:g}"] = final_numbers(model, sam[T], data, test, seed, cfg["trace_hvp"])
                rec["trajectory"][f"late-sam {rho:g}"] = trajectory(model, sl, data, cfg["late_every"], first=switch)
                rec["trajectory"][f"sam {rho:g}"] = trajectory(model, ss, data, cfg["traj_every"] * 3)
                for other in (f"late-sam {rho:g}", f"sam {rho:g}"):
                    rec["matched"][other] = matched(rec["trajectory"]["sgd"], rec["trajectory"][other])
                rec.setdefault("barrier", {})[f"sgd ↔ late-sam {rho:g}"] = barrier(model, sgd[T], late[T], data)
                rec["barrier"][f"sgd ↔ sam {rho:g}"] = barrier(model, sgd[T], sam[T], data)
                rec["barrier"][f"pre-switch ↔ late-sam {rho:g}"] = barrier(model, sgd[switch], late[T], data)
                rec.setdefault("_sam_final", {})[rho] = sam[T]
            rec["escape"] = escape(model, states, switch, cfg["dense"], data)
            rec["_sgd_final"] = sgd[T]
            per_seed[seed] = rec
        s0, s1 = cfg["seeds"][:2]
        positive = {"sgd seed 0 ↔ sgd seed 1": barrier(model, per_seed[s0]["_sgd_final"], per_seed[s1]["_sgd_final"],
                                                      data)}
        top = max(cfg["rhos"])
        positive["sam seed 0 ↔ sam seed 1"] = barrier(model, per_seed[s0]["_sam_final"][top],
                                                      per_seed[s1]["_sam_final"][top], data)
    for rec in per_seed.values():
        rec.pop("_sgd_final")
        rec.pop("_sam_final")
    numbers = {"settings": {"model": "mlp 64-64-64-10", "data": "digits", "lr": LR, "batch": BATCH, "steps": T,
                            "switch_step": switch, "sam_fraction": 1 - switch / T, "rhos": cfg["rhos"],
                            "seeds": cfg["seeds"], "lambda_tol": 1e-4, "trace": "hutch++", "escape_steps": cfg["dense"],
                            "top_k": K_TOP},
               "paper": PAPER, "per_seed": {str(k): v for k, v in per_seed.items()},
               "positive_control_barrier": positive}
    numbers["summary"] = summarise(per_seed, cfg)
    fig = figure(numbers)
    return C.write(args.out, NAME, fig, numbers, t0)


def summarise(per_seed: dict, cfg: dict) -> dict:
    """Mean ± std over seeds of every comparison the README paragraph quotes."""
    seeds = list(per_seed)
    out: dict = {"final": {}, "change_at_end": {}, "change_at_matched_loss": {}, "escape": {}, "barrier": {}}
    runs = list(per_seed[seeds[0]]["final"])
    for run in runs:
        out["final"][run] = {k: C.mean_std([per_seed[s]["final"][run][k] for s in seeds])
                             for k in ("lambda_max", "trace", "train_loss", "test_loss", "test_accuracy")}
    for run in runs:
        if run == "sgd":
            continue
        for k in ("lambda_max", "trace"):
            out["change_at_end"].setdefault(run, {})[k] = C.mean_std(
                [per_seed[s]["final"][run][k] / per_seed[s]["final"]["sgd"][k] - 1 for s in seeds])
        out["change_at_end"][run]["train_loss_ratio"] = C.mean_std(
            [per_seed[s]["final"][run]["train_loss"] / per_seed[s]["final"]["sgd"]["train_loss"] for s in seeds])
        out["change_at_end"][run]["test_accuracy_diff"] = C.mean_std(
            [per_seed[s]["final"][run]["test_accuracy"] - per_seed[s]["final"]["sgd"]["test_accuracy"] for s in seeds])
        out["change_at_matched_loss"][run] = {
            "lambda_max": C.mean_std([per_seed[s]["matched"][run]["change"] for s in seeds]),
            "loss": C.mean_std([per_seed[s]["matched"][run]["loss"] for s in seeds]),
            "sgd_step": C.mean_std([per_seed[s]["matched"][run]["a_step"] for s in seeds])}
    for key in per_seed[seeds[0]]["escape"]["runs"]:
        e = [per_seed[s]["escape"]["runs"][key] for s in seeds]
        out["escape"][key] = {
            "distance_after_1": C.mean_std([x["distance"][0] for x in e]),
            "distance_at_end": C.mean_std([x["distance"][-1] for x in e]),
            "exponential_r2": C.mean_std([(x["fit"]["exponential"] or {}).get("r2") for x in e]),
            "power_r2": C.mean_std([(x["fit"]["power"] or {}).get("r2") for x in e]),
            "power_exponent": C.mean_std([(x["fit"]["power"] or {}).get("exponent") for x in e]),
            "better": [x["fit"]["better"] for x in e],
            "top_k_share_first": C.mean_std([x["top_k_share"][0] for x in e]),
            "top_k_share_end": C.mean_std([x["top_k_share"][-1] for x in e])}
    out["escape"]["chance_share"] = per_seed[seeds[0]]["escape"]["chance_share"]
    for key in per_seed[seeds[0]]["barrier"]:
        out["barrier"][key] = C.mean_std([per_seed[s]["barrier"][key] for s in seeds])
    return out


def figure(numbers: dict):
    import seaborn as sns

    from sam_probe.report.figures import new_figure

    col = C.colors()
    s = numbers["settings"]
    rhos = s["rhos"]
    per = numbers["per_seed"]
    seeds = list(per)
    shades = sns.color_palette("Oranges", len(rhos) + 1)[1:]
    greens = sns.color_palette("Greens", len(rhos) + 1)[1:]
    fig, axes = new_figure(ncols=3, nrows=2, width=5.4, height=3.9)

    ax = axes[0][0]  # λ_max against training loss: the matched-loss view
    for seed, ls in zip(seeds, ("-", "--", ":")):
        tr = per[seed]["trajectory"]
        ax.plot([r["loss"] for r in tr["sgd"]], [r["lambda_max"] for r in tr["sgd"]], color=col["sgd"], ls=ls, lw=1,
                label="SGD" if seed == seeds[0] else None)
        for rho, c1, c2 in zip(rhos, shades, greens):
            t = tr[f"sam {rho:g}"]
            ax.plot([r["loss"] for r in t], [r["lambda_max"] for r in t], color=c1, ls=ls, lw=1,
                    label=f"SAM rho {rho:g}" if seed == seeds[0] else None)
            t = tr[f"late-sam {rho:g}"]
            ax.plot([r["loss"] for r in t], [r["lambda_max"] for r in t], color=c2, ls=ls, marker=".", ms=3, lw=1,
                    label=f"late-SAM rho {rho:g}" if seed == seeds[0] else None)
    ax.set_xscale("log")
    ax.invert_xaxis()
    C.plain_log(ax, "x")
    ax.set_xlabel("training loss (CE, nats; log, decreasing →)")
    ax.set_ylabel("λ_max of the train-loss Hessian")
    ax.set_title("sharpness against training loss (line styles: seeds)", fontsize=10)
    ax.legend(loc="upper left", fontsize=7, frameon=False)

    ax = axes[0][1]  # change of λ_max vs SGD: at the end and at matched loss, per rho
    summ = numbers["summary"]
    x = np.arange(len(rhos))
    for off, kind, label, hatch in ((-0.2, "change_at_end", "at the last step", ""),
                                    (0.2, "change_at_matched_loss", "at matched training loss", "//")):
        for j, (name, c) in enumerate((("late-sam", greens[-1]), ("sam", shades[-1]))):
            vals = [summ[kind][f"{name} {r:g}"]["lambda_max"] for r in rhos]
            m = [100 * (v[0] if v[0] is not None else np.nan) for v in vals]
            e = [100 * (v[1] or 0) for v in vals]
            ax.bar(x + off + (j - 0.5) * 0.18, m, width=0.17, yerr=e, color=c, hatch=hatch, capsize=2,
                   label=f"{'late-SAM' if name == 'late-sam' else 'SAM'}, {label}")
    ax.axhline(0, color=col["baseline"], lw=0.8)
    ax.axhline(-40, color=col["event"], ls="--", lw=1, label="paper: ≈ −40%")
    ax.set_xticks(x)
    ax.set_xticklabels([f"rho {r:g}" for r in rhos])
    ax.set_ylabel("λ_max change vs SGD (%; mean ± std over seeds)")
    ax.set_ylim(-105, 45)
    ax.set_title("flatter than SGD? (hatched: at matched training loss)", fontsize=10)
    ax.legend(loc="upper left", fontsize=6.5, frameon=True, ncol=2)

    ax = axes[0][2]  # test accuracy
    acc = [("sgd", "SGD", col["sgd"])] + [(f"late-sam {r:g}", f"late {r:g}", g) for r, g in zip(rhos, greens)] + \
          [(f"sam {r:g}", f"SAM {r:g}", o) for r, o in zip(rhos, shades)]
    for i, (key, lab, c) in enumerate(acc):
        v = [100 * per[sd]["final"][key]["test_accuracy"] for sd in seeds]
        ax.bar(i, np.mean(v), color=c, width=0.7)
        ax.plot([i] * len(v), v, "k.", ms=5)
    ax.set_xticks(range(len(acc)))
    ax.set_xticklabels([a[1] for a in acc], rotation=45, ha="right", fontsize=8)
    lo = min(100 * per[sd]["final"][k]["test_accuracy"] for sd in seeds for k, _, _ in acc)
    ax.set_ylim(lo - 2, 100)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("test accuracy (bars: mean, dots: seeds)", fontsize=10)

    ax = axes[1][0]  # escape: distance from the switch weights
    e0 = per[seeds[0]]["escape"]
    colors = {"sgd": col["sgd"], "sgd, other minibatches": col["baseline"]}
    colors.update({f"late-sam {r:g}": g for r, g in zip(rhos, greens)})
    for key, r in e0["runs"].items():
        f = r["fit"]
        lab = f"{key}: power R² {f['power']['r2']:.3f}, exp R² {f['exponential']['r2']:.3f}" if f["power"] else key
        ax.plot(r["steps"], r["distance"], color=colors[key], marker=".", ms=3, lw=1, label=lab)
    ax.set_xscale("log")
    ax.set_yscale("log")
    C.plain_log(ax)
    ax.set_xlabel(f"steps after the switch (log; step {s['switch_step']} = 0)")
    ax.set_ylabel("||w_t − w_switch||")
    ax.set_title(f"escape (seed {seeds[0]}): a power law is a straight line", fontsize=10)
    ax.legend(loc="lower right", fontsize=6.5, frameon=True)

    ax = axes[1][1]  # share of the displacement in the top-k space
    for key, r in e0["runs"].items():
        ax.plot(r["steps"], r["top_k_share"], color=colors[key], marker=".", ms=3, lw=1, label=key)
    ax.axhline(e0["chance_share"], color=col["baseline"], ls=":", label=f"chance k/P = {e0['chance_share']:.4f}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("steps after the switch (log)")
    ax.set_ylabel(f"share of w_t − w_switch in the top-{s['top_k']} space")
    ax.set_title("which directions the escape takes", fontsize=10)
    ax.legend(loc="center left", fontsize=7, frameon=True)

    ax = axes[1][2]  # barriers with controls
    bars = [(k, summ["barrier"][k]) for k in summ["barrier"]]
    bars += [(k, [v, None]) for k, v in numbers["positive_control_barrier"].items()]
    for i, (k, (m, sd)) in enumerate(bars):
        c = col["baseline"] if "seed" in k else (greens[-1] if "late" in k else shades[-1])
        ax.barh(i, m, xerr=sd or 0, color=c, capsize=2)
        ax.text(max(m, 0) + 0.01, i, f"{m:.3g}", va="center", fontsize=7)
    ax.set_yticks(range(len(bars)))
    ax.set_yticklabels([k for k, _ in bars], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("interpolation barrier (train loss above the chord, nats)")
    ax.set_title("same valley? (grey: different inits)", fontsize=10)
    C.caption(fig, "Late-phase SAM on the digits MLP, with controls",
              f"mlp 64-64-64-10, batch {s['batch']}, lr {s['lr']}, {s['steps']} steps; late-SAM = SAM from step "
              f"{s['switch_step']} ({s['sam_fraction']:.0%}); rho {', '.join(map(str, rhos))}; {len(seeds)} seeds")
    return fig


if __name__ == "__main__":
    main()
