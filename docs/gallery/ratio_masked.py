"""Ratio-masked SAM training (SAMECKPT): scale SAM's update on chosen ratio categories and compare.

The update direction is g~ · c on the parameters whose ratio category (C1..C4 of
r = g~/g on the minibatch, see docs/metrics.md) is in the mask, g~ elsewhere
(``sam_probe.training``, ``--samckpt DIGITS --condition c``; c = 1 is plain SAM, c = 0
drops those coordinates from the step, c = 2 doubles them).  SGD, SAM and every mask
1, 2, 3, 4, 12, 34 with c in {0, 0.5, 2} at two rho, on the digits MLP 64-64-64-10
(lr 0.1, batch 64), three seeds each (seed = init and minibatch order); test accuracy
and test loss at the end, as mean ± std over the seeds.  Writes ratio_masked.md (the
table) and ratio_masked.png.

    python docs/gallery/ratio_masked.py [--quick] [--out DIR]
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

NAME = "ratio_masked"
MODEL = {"in_dim": 64, "hidden": [64, 64], "out_dim": 10}
LR, BATCH = 0.1, 64


def size(quick: bool) -> dict:
    if quick:
        return {"steps": 100, "seeds": [0], "rhos": [0.1], "masks": ["1", "34"], "conditions": [0.0, 2.0]}
    return {"steps": 300, "seeds": [0, 1, 2], "rhos": [0.05, 0.2], "masks": ["1", "2", "3", "4", "12", "34"],
            "conditions": [0.0, 0.5, 2.0]}


def variants(cfg: dict) -> list[tuple[str, dict]]:
    """``(label, trainer options without rho)`` in the table's row order."""
    out = [("SGD", {"optimizer": "sgd"}), ("SAM", {"optimizer": "sam"})]
    for m in cfg["masks"]:
        for c in cfg["conditions"]:
            out.append((f"SAM, C{m} x {c:g}", {"optimizer": "sam", "samckpt": m, "condition": c}))
    return out


def main(argv=None) -> dict:
    args = C.parse(NAME, __doc__, argv)
    t0 = time.time()
    from sam_probe.loading.data import load_data

    cfg = size(args.quick)
    data, test = load_data("digits"), load_data("digits", split="test")
    results: dict = {}
    with C.one_thread():
        for label, opts in variants(cfg):
            for rho in (cfg["rhos"] if opts["optimizer"] != "sgd" else [None]):
                accs, losses = [], []
                for seed in cfg["seeds"]:
                    model, states = C.train_run("mlp", MODEL, data, seed=seed, lr=LR, steps=cfg["steps"],
                                                batch_size=BATCH, rho=rho or 0.05, **opts)
                    loss, acc = C.objective(model, states[-1][1], test).evaluate()
                    if not np.isfinite(loss):
                        loss, acc = float("nan"), float("nan")
                    accs.append(acc)
                    losses.append(loss)
                results[label, rho] = {"accuracy": accs, "loss": losses}
    numbers = {"settings": {"model": "mlp 64-64-64-10", "data": "digits (test split)", "lr": LR, "batch": BATCH,
                            "steps": cfg["steps"], "seeds": cfg["seeds"], "rhos": cfg["rhos"],
                            "masks": cfg["masks"], "conditions": cfg["conditions"]},
               "results": [{"variant": k[0], "rho": k[1], **v, "accuracy_mean": _mean(v["accuracy"]),
                            "accuracy_std": _std(v["accuracy"]), "loss_mean": _mean(v["loss"]),
                            "loss_std": _std(v["loss"])} for k, v in results.items()]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{NAME}.md").write_text(table(results, cfg))
    fig = figure(results, cfg)
    return C.write(args.out, NAME, fig, numbers, t0)


def _mean(v) -> float:
    return float(np.mean(v))


def _std(v) -> float:
    return float(np.std(v, ddof=1)) if len(v) > 1 else 0.0


def _cell(v, scale: float, digits: int) -> str:
    if not np.all(np.isfinite(v)):
        return "diverged"
    return f"{_mean(v) * scale:.{digits}f} ± {_std(v) * scale:.{digits}f}"


def table(results: dict, cfg: dict) -> str:
    """Markdown: one row per variant, per rho a test-accuracy and a test-loss column."""
    head = "| variant | " + " | ".join(f"acc % (rho {r:g}) | loss (rho {r:g})" for r in cfg["rhos"]) + " |"
    sep = "|---|" + "---:|---:|" * len(cfg["rhos"])
    lines = [f"# Ratio-masked SAM on digits (written by docs/gallery/{NAME}.py)", "",
             f"Test accuracy (%) and test loss (CE, nats) of the digits MLP 64-64-64-10 after {cfg['steps']} steps "
             f"(lr {LR}, batch {BATCH}), mean ± std over seeds {cfg['seeds']}. `C12 x 0` = update g~ with the "
             "coordinates in C1 or C2 set to 0, `x 2` doubled; SGD has no rho (same numbers in every column).", "",
             head, sep]
    for label, opts in variants(cfg):
        cells = []
        for rho in cfg["rhos"]:
            r = results[label, None if opts["optimizer"] == "sgd" else rho]
            cells += [_cell(r["accuracy"], 100.0, 2), _cell(r["loss"], 1.0, 4)]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def figure(results: dict, cfg: dict):
    from sam_probe.report.figures import new_figure

    col = C.colors()
    labels = [lab for lab, _ in variants(cfg)]
    fig, axes = new_figure(ncols=2, nrows=1, width=5.2, height=0.3 * len(labels) + 1.8)
    axes = axes[0]
    y = np.arange(len(labels))
    offsets = np.linspace(-0.18, 0.18, len(cfg["rhos"])) if len(cfg["rhos"]) > 1 else [0.0]
    markers = ("o", "s", "^")
    for ax, key, scale, xlabel, window in ((axes[0], "accuracy", 100.0, "test accuracy (%)", (84.0, 99.0)),
                                           (axes[1], "loss", 1.0, "test loss (CE, nats)", (0.05, 0.65))):
        lo, hi = window
        for k, rho in enumerate(cfg["rhos"]):
            for i, (lab, opts) in enumerate(variants(cfg)):
                r = results[lab, None if opts["optimizer"] == "sgd" else rho]
                v = np.array(r[key], dtype=float) * scale
                if not np.all(np.isfinite(v)):
                    continue
                c = col["sgd"] if opts["optimizer"] == "sgd" else (col["sam"] if "samckpt" not in opts else col["masked"])
                yy = y[i] + offsets[k]
                m = float(v.mean())
                if m < lo or m > hi:  # off the window: an arrow at the edge with the value
                    edge = lo if m < lo else hi
                    ax.plot(edge, yy, marker="<" if m < lo else ">", color=c, ms=6, clip_on=False)
                    ax.annotate(f"{m:.3g}", (edge, yy), xytext=(6 if m < lo else -6, 0), textcoords="offset points",
                                ha="left" if m < lo else "right", va="center", fontsize=7, color=c)
                    continue
                ax.errorbar(m, yy, xerr=v.std(ddof=1) if len(v) > 1 else None, fmt=markers[k],
                            color=c, ms=5, capsize=2, label=f"rho {rho:g}" if i == len(labels) - 1 else None)
        sam = results["SAM", cfg["rhos"][0]][key]
        ax.axvline(np.mean(sam) * scale, color=col["sam"], ls=":", lw=1)
        sgd = results["SGD", None][key]
        ax.axvline(np.mean(sgd) * scale, color=col["sgd"], ls=":", lw=1)
        ax.set_xlim(lo, hi)
        ax.set_yticks(y)
        ax.set_yticklabels(labels if ax is axes[0] else [])
        ax.invert_yaxis()
        ax.set_xlabel(xlabel + " (arrows: off the axis, with the value)")
    axes[0].set_title("test accuracy (mean ± std over seeds)", fontsize=10)
    axes[1].set_title("test loss; dotted: SGD (blue), SAM rho " f"{cfg['rhos'][0]:g} (orange)", fontsize=10)
    C.legend_outside(axes[1], fontsize=8)
    C.caption(fig, "Ratio-masked SAM on digits (SAMECKPT)",
              f"mlp 64-64-64-10, lr {LR}, batch {BATCH}, {cfg['steps']} steps, seeds {cfg['seeds']}; "
              "masked update: g~ · c on the chosen categories, g~ elsewhere")
    return fig


if __name__ == "__main__":
    main()
