"""SAM's ratio categories as the notebook defined them (the step's own minibatch), and their persistence
against informative nulls.

Per parameter, r_i = g~_i / g_i with g~ = ∇L_B(w + rho g/||g||) on the same batch B: C1 (r > 1, same sign
and larger), C2 (0 < r < 1), C3 (r < -1), C4 (-1 < r < 0).  The notebook took g and g~ on each training
step's own minibatch; computed on the whole training set instead, the categories are those of a
different (full-batch) quantity, so both are reported.  Over an l2-SAM run of the digits MLP 64-64-64-10
(rho 0.1, lr 0.1, batch 64; every step kept for 25 steps after the anchor step, then every 20): the
category fractions, the C1 ratio bins, the C1 magnitude split (the share of C1 among the |C1| largest
|g_i|, the notebook's 59-80%), and the persistence of the C1 set from the anchor — anchor overlap and
persistent core (C1 at every consecutive step since the anchor) — each against four nulls
(``sam_probe.overlap_analysis``): independence (falls like p^t: uninformative), the other steps in
shuffled order (keeps each parameter's frequency), a first-order Markov chain (keeps the one-step
stay/enter rates), and the SGD run's own C1 persistence at the same rho and steps (a control run).

    python docs/gallery/ratios.py [--quick] [--out DIR]
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _claims  # noqa: E402
import _common as C  # noqa: E402

NAME = "ratios"
MODEL = {"in_dim": 64, "hidden": [64, 64], "out_dim": 10}
LR, BATCH, RHO, IRE_RANK = 0.1, 64, 0.1, 0.9
CATS = ("C1", "C2", "C3", "C4")
NULLS = ("independence", "shuffled", "markov", "control")
NOTEBOOK = {"source": "the project's research notebook (perturbed/current gradient ratio), as in the seed documents; "
                      "ResNet-18 on CIFAR-100, about 11.2M parameters",
            "definition": "r = g~/(g + 1e-8) on each step's minibatch",
            "anchor_step": 172, "anchor_C1": 6e6, "anchor_C1_fraction_of_P": 6e6 / 11.2e6,
            "kept_to_final_step": 4e6, "kept_to_final_fraction_of_anchor": 4e6 / 6e6,
            "core_after_5_steps": 1e5, "core_after_5_fraction_of_anchor": 1e5 / 6e6,
            "magnitude_split_share_percent": [59, 80],
            "claims": ["checkpoint1 (C1) does not decrease over training",
                       "about 4e6 of the 6e6 C1 parameters at step 172 overlap with C1 up to the final step",
                       "the same parameters are not C1 over consecutive steps: after 5 steps 1e5 remain",
                       "60-80% of C1 has a gradient magnitude above the |C1|-th largest"]}


def size(quick: bool) -> dict:
    if quick:
        return {"steps": 120, "anchor": 60, "dense": 10, "every": 20}
    return {"steps": 400, "anchor": 200, "dense": 25, "every": 20}


def kept(cfg: dict) -> list[int]:
    a = cfg["anchor"]
    return sorted(set(range(a, a + cfg["dense"] + 1)) | set(range(0, cfg["steps"] + 1, cfg["every"])))


def analyse(model, states, data, n_train: int, seed: int):
    """Per kept step, ratios on the step's own minibatch and on the whole training set."""
    import sam_probe as sp
    from sam_probe.core import bitpack
    from sam_probe.core.overlap import flat_mask
    from sam_probe.training import draw_at

    rows, masks = [], {"minibatch": [], "selection": []}
    flats = []
    for step, state, _ in states:
        obj = C.objective(model, state, data, dtype=None)
        idx = draw_at(n_train, BATCH, seed, step)  # the minibatch the step from this checkpoint used
        row = {"step": step}
        for key, o in (("minibatch", obj.subset(idx)), ("selection", obj)):
            r = sp.ratio_analysis(o, rho=RHO, per_layer=False)
            masks[key].append(bitpack.membership_mask(r.packed_codes(), "C1"))
            row[key] = {"fractions": r.fractions, "buckets": r.buckets, "magnitude_split": r.magnitude_split}
            if key == "minibatch":
                flats.append(flat_mask(o.grad_flat().square(), IRE_RANK))
        row["n_params"] = r.n_params
        rows.append(row)
    return rows, masks, flats


def main(argv=None) -> dict:
    args = C.parse(NAME, __doc__, argv)
    if args.replot:
        return C.replot(args.out, NAME, lambda n: figure(n["runs"], n["settings"]))
    t0 = time.time()
    import sam_probe as sp
    from sam_probe.loading.data import load_data

    cfg = size(args.quick)
    data = load_data("digits")
    out: dict = {}
    with C.one_thread():
        for opt in ("sgd", "sam"):  # the SGD run first: it is the SAM run's control
            model, states = C.train_run("mlp", MODEL, data, seed=0, optimizer=opt, lr=LR, steps=cfg["steps"],
                                        batch_size=BATCH, rho=RHO, keep=kept(cfg))
            rows, masks, flats = analyse(model, states, data, len(data), 0)
            steps = [r["step"] for r in rows]
            window = [i for i, st in enumerate(steps) if cfg["anchor"] <= st <= cfg["anchor"] + cfg["dense"]]
            ov = {}
            for key in ("minibatch", "selection"):
                # the whole run (anchor overlap to the last step, IRE link) and the dense window of consecutive
                # steps after the anchor (the persistent core against its nulls: the shuffled null is an order
                # of *these* steps, so early training, whose C1 sets differ, does not enter it)
                control = out["sgd"]["_overlap"][key + " window"] if opt == "sam" else None
                ov[key] = sp.overlap_analysis(masks[key], rows[0]["n_params"], steps, category="C1",
                                              anchor=cfg["anchor"], flat_masks=flats if key == "minibatch" else None,
                                              ire_rank=IRE_RANK, pairwise=False, null="shuffled")
                ov[key + " window"] = sp.overlap_analysis([masks[key][i] for i in window], rows[0]["n_params"],
                                                          [steps[i] for i in window], category="C1",
                                                          anchor=cfg["anchor"], pairwise=False, null="shuffled",
                                                          control=control)
            out[opt] = {"rows": rows, "_overlap": ov}
    for opt in out:
        out[opt]["overlap"] = {k: v.to_dict() for k, v in out[opt].pop("_overlap").items()}
    numbers = {"settings": {"model": "mlp 64-64-64-10", "data": "digits", "rho": RHO, "variant": "l2", "lr": LR,
                            "batch": BATCH, "steps": cfg["steps"], "anchor": cfg["anchor"], "dense": cfg["dense"],
                            "ire_rank": IRE_RANK, "definitions": {"minibatch": "g, g~ on the step's own minibatch "
                                                                  "(the notebook's)", "selection": "g, g~ on the whole "
                                                                  "training set"}},
               "notebook": NOTEBOOK, "runs": out, "summary": summarise(out, cfg)}
    fig = figure(out, cfg)
    return C.write(args.out, NAME, fig, numbers, t0)


def summarise(out: dict, cfg: dict) -> dict:
    """The numbers the README paragraph quotes, per definition, beside the notebook's."""
    s: dict = {}
    for key in ("minibatch", "selection"):
        whole = out["sam"]["overlap"][key]
        ov = out["sam"]["overlap"][key + " window"]
        st = ov["steps"]
        i0 = st.index(cfg["anchor"])
        a0 = ov["sizes"][i0]
        core = ov["persistent"]["size"]
        c1 = [r[key]["fractions"]["C1"] for r in out["sam"]["rows"]]
        share = [r[key]["magnitude_split"]["share"] for r in out["sam"]["rows"]]
        chance = [r[key]["magnitude_split"]["chance"] for r in out["sam"]["rows"]]
        d: dict = {"C1_fraction": {"first": c1[0], "min": min(c1), "last": c1[-1],
                                   "sgd_last": out["sgd"]["rows"][-1][key]["fractions"]["C1"]},
                   "anchor_C1_fraction_of_P": a0 / ov["n_params"],
                   "kept_to_final_fraction_of_anchor": whole["anchor"]["overlap"][-1] / a0,
                   "kept_to_final_lift": {n: whole["nulls"][n]["anchor"]["lift"][-1] for n in ("independence",
                                                                                             "shuffled", "markov")},
                   "core_fraction_of_anchor": {str(k): core[i0 + k] / a0 for k in (1, 2, 5, 10, cfg["dense"])
                                               if i0 + k < len(core)},
                   "magnitude_split": {"share_min": min(x for x in share if x is not None),
                                       "share_max": max(x for x in share if x is not None),
                                       "share_last": share[-1], "chance_last": chance[-1],
                                       "lift_last": out["sam"]["rows"][-1][key]["magnitude_split"]["lift"]},
                   "lifts": {}}
        for null in NULLS:
            nl = ov["nulls"].get(null)
            if nl is None:
                continue
            d["lifts"][null] = {"anchor_after_1": nl["anchor"]["lift"][i0 + 1],
                                "core_after_1": nl["persistent"]["lift"][i0 + 1],
                                "core_after_5": nl["persistent"]["lift"][min(i0 + 5, len(st) - 1)],
                                "core_after_10": nl["persistent"]["lift"][min(i0 + 10, len(st) - 1)],
                                "core_after_20": nl["persistent"]["lift"][min(i0 + 20, len(st) - 1)],
                                "core_after_dense": nl["persistent"]["lift"][min(i0 + cfg["dense"], len(st) - 1)]}
        dense = slice(i0 + 2, len(st) - 1)  # the last step of the window is all of it: every order agrees there
        d["shuffled_lift_range"] = [min(x for x in ov["nulls"]["shuffled"]["persistent"]["lift"][dense]),
                                    max(x for x in ov["nulls"]["shuffled"]["persistent"]["lift"][dense])]
        d["claim_persists_beyond_markov"] = _claims.persists_beyond(ov["nulls"]["markov"]["persistent"]["lift"][dense])
        d["claim_persists_beyond_shuffled"] = _claims.persists_beyond(
            ov["nulls"]["shuffled"]["persistent"]["lift"][dense])
        d["claim_persists_beyond_control"] = _claims.persists_beyond(
            ov["nulls"]["control"]["persistent"]["lift"][dense]) if "control" in ov["nulls"] else None
        s[key] = d
    return s


def figure(out: dict, cfg: dict):
    import seaborn as sns

    from sam_probe.report.figures import new_figure

    col = C.colors()
    pal = sns.color_palette("colorblind", 10)
    sam = out["sam"]
    rows = sam["rows"]
    steps = np.array([r["step"] for r in rows])
    fig, ax = new_figure(ncols=3, nrows=2, width=5.0, height=3.6)

    a = ax[0][0]
    for k, cat in enumerate(CATS):
        a.plot(steps, [r["minibatch"]["fractions"][cat] for r in rows], color=pal[k], label=f"{cat}, minibatch")
    a.plot(steps, [r["selection"]["fractions"]["C1"] for r in rows], color=pal[0], ls=":", label="C1, whole set")
    a.plot([r["step"] for r in out["sgd"]["rows"]], [r["minibatch"]["fractions"]["C1"] for r in out["sgd"]["rows"]],
           color=pal[0], ls="--", label="C1, SGD run (minibatch)")
    a.set_xlabel("training step")
    a.set_ylabel("fraction of the P parameters")
    a.set_ylim(0, 1)
    a.set_title("ratio categories r = g~/g (SAM run)", fontsize=10)
    a.legend(loc="center right", fontsize=7)

    a = ax[0][1]
    nb = len(rows[0]["minibatch"]["buckets"])
    c1 = np.array([[b["count"] for b in r["minibatch"]["buckets"]] for r in rows], dtype=float)
    c1 = c1 / np.maximum(c1.sum(1, keepdims=True), 1)
    labels = []
    for b in rows[0]["minibatch"]["buckets"]:
        hi = "∞" if b["hi"] is None or not np.isfinite(b["hi"]) else f"{b['hi']:g}"
        labels.append(f"{'(' if b['lo'] == 1 else '['}{b['lo']:g}, {hi})")
    a.stackplot(steps, c1.T, colors=sns.color_palette("mako_r", nb),
                labels=[f"C1.{i + 1} r in {lab}" for i, lab in enumerate(labels)])
    a.set_xlabel("training step")
    a.set_ylabel("fraction of C1")
    a.set_ylim(0, 1)
    a.set_title("C1 ratio bins (minibatch)", fontsize=10)
    C.legend_outside(a, fontsize=7)

    a = ax[0][2]
    for key, ls in (("minibatch", "-"), ("selection", ":")):
        a.plot(steps, [r[key]["magnitude_split"]["share"] for r in rows], color=col["sam"], ls=ls, marker=".",
               label=f"share of C1 with |g_i| > tau ({key})")
        a.plot(steps, [r[key]["magnitude_split"]["chance"] for r in rows], color=col["baseline"], ls=ls,
               label=f"chance |C1| / P ({key})")
    a.axhspan(0.59, 0.80, color=col["event"], alpha=0.12, label="notebook: 59-80%")
    a.set_xlabel("training step")
    a.set_ylabel("fraction")
    a.set_ylim(0, 1)
    a.set_title("C1 magnitude split", fontsize=10)
    a.legend(loc="lower right", fontsize=6.5)

    for a, part, title in ((ax[1][0], "anchor", "C1 overlap with the anchor step (whole run)"),
                           (ax[1][1], "persistent", "C1 at every step since the anchor (core)")):
        ov = sam["overlap"]["minibatch" if part == "anchor" else "minibatch window"]
        i0 = list(ov["steps"]).index(cfg["anchor"])
        st = np.array(ov["steps"])[i0:] - cfg["anchor"]
        a0 = ov["sizes"][i0]
        obs = np.array(ov[part]["overlap" if part == "anchor" else "size"][i0:], dtype=float) / a0
        x = np.maximum(st, 0.5)
        a.plot(x, obs, color=col["sam"], marker=".", lw=2, label="observed (minibatch)")
        for null, c, ls in (("independence", col["baseline"], ":"), ("shuffled", pal[2], "--"),
                            ("markov", pal[4], "-."), ("control", col["sgd"], "--")):
            e = ov["nulls"].get(null)
            if e is None:
                continue
            ex = np.array([np.nan if v is None else v for v in e[part]["expected"][i0:]], dtype=float) / a0
            a.plot(x, np.maximum(ex, 1e-9), color=c, ls=ls, label=f"{null} null" if null != "control" else
                   "control: the SGD run's own retention")
        if part == "persistent":
            a.plot([5], [NOTEBOOK["core_after_5_fraction_of_anchor"]], "k*", ms=9, label="notebook: 1e5 of 6e6 after 5")
        else:
            a.axhline(NOTEBOOK["kept_to_final_fraction_of_anchor"], color="k", lw=0.8, ls=":",
                      label="notebook: 4e6 of 6e6 to the end")
        a.set_xscale("log")
        a.set_yscale("log")
        a.set_ylim(1e-4 if part == "persistent" else 0.05, 1.5)
        a.set_xlabel(f"steps after the anchor {cfg['anchor']} (log; 0 at 0.5)")
        a.set_ylabel("fraction of the anchor's C1 set (log)")
        a.set_title(title, fontsize=10)
        a.legend(loc="lower left", fontsize=6.5)

    a = ax[1][2]
    ov = sam["overlap"]["minibatch window"]
    i0 = list(ov["steps"]).index(cfg["anchor"])
    for null, c in (("shuffled", pal[2]), ("markov", pal[4]), ("control", col["sgd"]), ("independence",
                                                                                          col["baseline"])):
        if null not in ov["nulls"]:
            continue
        lift = ov["nulls"][null]["persistent"]["lift"][i0 + 1:]
        st = np.array(ov["steps"][i0 + 1:]) - cfg["anchor"]
        a.plot(st, [np.nan if v is None else v for v in lift], color=c, marker=".", label=null)
    a.axhline(1.0, color="k", lw=0.8)
    a.set_xscale("log")
    a.set_yscale("log")
    a.set_xlabel("steps after the anchor (log)")
    a.set_ylabel("core lift = observed / null (log)")
    a.set_title(f"core against each null ({cfg['dense']} consecutive steps)", fontsize=10)
    a.legend(loc="upper left", fontsize=7)
    C.caption(fig, "SAM's ratio categories on the digits MLP (the notebook's minibatch definition)",
              f"l2-SAM rho {RHO}, lr {LR}, batch {BATCH}, {cfg['steps']} steps; anchor step {cfg['anchor']}, every "
              f"step kept for {cfg['dense']} steps after it; P = {rows[0]['n_params']:,}")
    return fig


if __name__ == "__main__":
    main()
