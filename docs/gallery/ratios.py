"""SAM's ratio categories: which parameters SAM's perturbed gradient pushes harder, and for how long.

Per parameter, r_i = g~_i / g_i with g~ = ∇L(w + rho g/||g||): C1 (r > 1, same sign and
larger), C2 (0 < r < 1), C3 (r < -1), C4 (-1 < r < 0).  Over a SAM run on the digits MLP
64-64-64-10 (rho 0.1, lr 0.1, batch 64), with ``sam_probe.ratio_analysis`` on the full training
set at every kept checkpoint: the category fractions, the C1 ratio bins, the C1 magnitude
split (share of C1 among the |C1| largest |g_i|, against its chance level |C1|/P), and with
``sam_probe.overlap_analysis``: the overlap of the C1 set with the C1 set of an early anchor
step, the persistent core (C1 at every consecutive kept step since the anchor) and the
overlap of C1 with the IRE flat mask (coordinates whose g_i² is not in the top 90%), each
against its independence baseline.  Checkpoints are kept at every step for 25 steps after
the anchor, so "within a few steps" is measured in single optimizer steps.

    python docs/gallery/ratios.py [--quick] [--out DIR]
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

NAME = "ratios"
MODEL = {"in_dim": 64, "hidden": [64, 64], "out_dim": 10}
LR, BATCH, RHO, IRE_RANK = 0.1, 64, 0.1, 0.9
CATS = ("C1", "C2", "C3", "C4")


def size(quick: bool) -> dict:
    if quick:
        return {"steps": 120, "anchor": 10, "dense": 10, "every": 20}
    return {"steps": 400, "anchor": 20, "dense": 25, "every": 20}


def kept(cfg: dict) -> list[int]:
    a = cfg["anchor"]
    dense = set(range(a, a + cfg["dense"] + 1))
    return sorted(dense | set(range(0, cfg["steps"] + 1, cfg["every"])))


def analyse(model, states, data):
    import sam_probe as sp
    from sam_probe.core import bitpack
    from sam_probe.core.overlap import flat_mask

    rows, masks, flats = [], [], []
    for step, state, _ in states:
        obj = C.objective(model, state, data, dtype=None)
        r = sp.ratio_analysis(obj, rho=RHO, per_layer=False)
        g = obj.grad_flat()
        masks.append(bitpack.membership_mask(r.packed_codes(), "C1"))
        flats.append(flat_mask(g.square(), IRE_RANK))
        rows.append({"step": step, "fractions": r.fractions, "buckets": r.buckets,
                     "magnitude_split": r.magnitude_split, "n_params": r.n_params})
    return rows, masks, flats


def main(argv=None) -> dict:
    args = C.parse(NAME, __doc__, argv)
    t0 = time.time()
    import sam_probe as sp
    from sam_probe.loading.data import load_data

    cfg = size(args.quick)
    data = load_data("digits")
    out = {}
    with C.one_thread():
        for opt in ("sam", "sgd"):
            model, states = C.train_run("mlp", MODEL, data, seed=0, optimizer=opt, lr=LR, steps=cfg["steps"],
                                        batch_size=BATCH, rho=RHO, keep=kept(cfg))
            rows, masks, flats = analyse(model, states, data)
            steps = [r["step"] for r in rows]
            ov = sp.overlap_analysis(masks, rows[0]["n_params"], steps, category="C1", anchor=cfg["anchor"],
                                     flat_masks=flats, ire_rank=IRE_RANK, pairwise=False)
            out[opt] = {"rows": rows, "overlap": ov.to_dict()}
    sam = out["sam"]
    ov = sam["overlap"]
    steps = ov["steps"]
    i0 = steps.index(cfg["anchor"])
    core = np.array(ov["persistent"]["size"], dtype=float) / ov["n_params"]
    c1 = np.array([r["fractions"]["C1"] for r in sam["rows"]])
    half = next((steps[i] - cfg["anchor"] for i in range(i0, len(steps)) if core[i] <= 0.5 * core[i0]), None)
    numbers = {"settings": {"model": "mlp 64-64-64-10", "data": "digits (full train set for g, g~)", "rho": RHO,
                            "variant": "l2", "lr": LR, "batch": BATCH, "steps": cfg["steps"], "anchor": cfg["anchor"],
                            "ire_rank": IRE_RANK},
               "sam_C1_first": float(c1[0]), "sam_C1_last": float(c1[-1]),
               "sgd_C1_last": float(out["sgd"]["rows"][-1]["fractions"]["C1"]),
               "core_at_anchor": float(core[i0]), "core_after_1": float(core[i0 + 1]),
               "core_after_5": float(core[i0 + 5]), "core_after_dense": float(core[i0 + cfg["dense"]]),
               "core_halves_within_steps": half,
               "core_lift_after_5": ov["persistent"]["lift"][i0 + 5],
               "anchor_lift_last": ov["anchor"]["lift"][-1],
               "magnitude_lift_last": sam["rows"][-1]["magnitude_split"]["lift"],
               "ire_lift_last": ov["ire"]["lift"][-1], "runs": out}
    fig = figure(out, cfg)
    return C.write(args.out, NAME, fig, numbers, t0)


def figure(out: dict, cfg: dict):
    import seaborn as sns

    from sam_probe.report.figures import new_figure

    col = C.colors()
    pal = sns.color_palette("colorblind", 10)
    sam = out["sam"]
    rows = sam["rows"]
    steps = np.array([r["step"] for r in rows])
    fig, ax = new_figure(ncols=3, nrows=2, width=4.7, height=3.4)

    a = ax[0][0]
    for k, cat in enumerate(CATS):
        a.plot(steps, [r["fractions"][cat] for r in rows], color=pal[k], label=f"{cat} (SAM run)")
    a.plot([r["step"] for r in out["sgd"]["rows"]], [r["fractions"]["C1"] for r in out["sgd"]["rows"]], color=pal[0],
           ls="--", label="C1 (SGD run)")
    a.set_xlabel("training step")
    a.set_ylabel("fraction of the P parameters")
    a.set_ylim(0, 1)
    a.set_title("ratio categories r = g~/g", fontsize=10)
    C.legend_outside(a, fontsize=8)

    a = ax[0][1]
    nb = len(rows[0]["buckets"])
    c1 = np.array([[b["count"] for b in r["buckets"]] for r in rows], dtype=float)
    c1 = c1 / np.maximum(c1.sum(1, keepdims=True), 1)
    labels = []
    for b in rows[0]["buckets"]:
        hi = "∞" if b["hi"] is None or not np.isfinite(b["hi"]) else f"{b['hi']:g}"
        labels.append(f"{'(' if b['lo'] == 1 else '['}{b['lo']:g}, {hi})")
    a.stackplot(steps, c1.T, colors=sns.color_palette("mako_r", nb),
                labels=[f"C1.{i + 1} r in {lab}" for i, lab in enumerate(labels)])
    a.set_xlabel("training step")
    a.set_ylabel("fraction of C1")
    a.set_ylim(0, 1)
    a.set_title("C1 ratio bins", fontsize=10)
    C.legend_outside(a, fontsize=7)

    a = ax[0][2]
    share = [r["magnitude_split"]["share"] for r in rows]
    chance = [r["magnitude_split"]["chance"] for r in rows]
    a.plot(steps, share, color=col["sam"], marker=".", label="share of C1 with |g_i| > tau")
    a.plot(steps, chance, color=col["baseline"], ls=":", label="chance |C1| / P")
    a.set_xlabel("training step")
    a.set_ylabel("fraction")
    a.set_ylim(0, 1)
    a.set_title("C1 magnitude split (tau = |C1|-th largest |g|)", fontsize=10)
    C.legend_outside(a, fontsize=8)

    ov = sam["overlap"]
    st = np.array(ov["steps"])
    n = ov["n_params"]
    a = ax[1][0]
    a.plot(st, np.array(ov["anchor"]["overlap"]) / n, color=col["sam"], marker=".", label="|S_t0 ∩ S_t| / P")
    a.plot(st, np.array(ov["anchor"]["expected"]) / n, color=col["baseline"], ls=":", label="independence P p_t0 p_t")
    a.axvline(cfg["anchor"], color=col["event"], ls="--", lw=1, label=f"anchor t0 = {cfg['anchor']}")
    a.set_xlabel("training step")
    a.set_ylabel("fraction of P")
    a.set_ylim(0, 1)
    a.set_title("C1 overlap with the anchor step", fontsize=10)
    C.legend_outside(a, fontsize=8)

    a = ax[1][1]
    i0 = list(st).index(cfg["anchor"])
    after = st[i0:] - cfg["anchor"]
    a.plot(np.maximum(after, 0.5), np.array(ov["persistent"]["size"][i0:]) / n, color=col["sam"], marker=".",
           label="persistent core K(t0, t) / P")
    exp = np.maximum(np.array(ov["persistent"]["expected"][i0:]) / n, 1e-12)
    a.plot(np.maximum(after, 0.5), exp, color=col["baseline"], ls=":", label="independence P Π p_s")
    a.set_xscale("log")
    a.set_yscale("log")
    a.set_ylim(1e-6, 1.2)
    a.set_xlabel("steps after the anchor t0 (log; 0 at 0.5)")
    a.set_ylabel("fraction of P (log)")
    a.set_title("C1 at every kept step since t0", fontsize=10)
    C.legend_outside(a, fontsize=8)

    a = ax[1][2]
    ire = ov["ire"]
    a.plot(st, np.array(ire["overlap"]) / n, color=col["sam"], marker=".", label="|C1 ∩ flat mask| / P")
    a.plot(st, np.array(ire["expected"]) / n, color=col["baseline"], ls=":", label="independence")
    a.plot(st, np.array(ire["flat_size"]) / n, color=pal[2], ls="--", lw=1, label="flat mask size / P")
    a.set_xlabel("training step")
    a.set_ylabel("fraction of P")
    a.set_title(f"C1 vs the IRE flat mask (g² not in the top {IRE_RANK:.0%})", fontsize=10)
    C.legend_outside(a, fontsize=8)
    C.caption(fig, "SAM's ratio categories on the digits MLP",
              f"mlp 64-64-64-10 trained with l2-SAM rho {RHO}, lr {LR}, batch {BATCH}, {cfg['steps']} steps; "
              f"g and g~ on the full training set; every step kept for {cfg['dense']} steps after t0; P = {n:,}")
    return fig


if __name__ == "__main__":
    main()
