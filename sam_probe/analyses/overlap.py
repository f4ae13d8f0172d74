"""``overlap``: how a ratio category's parameter set persists across the steps of a run.

Built on the ``ratios`` units of the run's checkpoints: stored ones are read
back (never recomputed), missing ones are computed with the same options.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .base import RUNS, Analysis, Option
from .ratios import RATIO_OPTIONS, ratio_config

from ..core.names import CATEGORIES as CATEGORY_CHOICES

if TYPE_CHECKING:
    from ..pipeline.protocol import AnalysisSession

NULL_CHOICES = ("independence", "shuffled", "markov", "control")

ANALYSIS = Analysis(
    name="overlap", version=2, order=30, target=RUNS, shardable=True,
    summary="Persistence of a ratio category across steps: anchor overlap, Jaccard, persistent core and IRE link, "
            "against informative nulls (time-shuffled, first-order Markov, a control run) as well as "
            "independence (uses stored ratio units, computes missing ones).",
    definitions=(
        ("S_t", "the parameters in --category at step t (see `sam-probe ratios --help`)"),
        ("anchor overlap", "|S_anchor ∩ S_t|; expected under independence P p_anchor p_t with p_t = |S_t|/P"),
        ("Jaccard", "|S_s ∩ S_t| / |S_s ∪ S_t| for every pair of steps"),
        ("persistent core", "|S_anchor ∩ ... ∩ S_t| over consecutive steps; expected P Π p_s"),
        ("lift", "observed / expected under the chosen --null (1 = what the null explains)"),
        ("independence", "sets drawn independently with the observed sizes: E = P p_anchor p_t, E[core] = P Π p_s "
                         "(falls like p^t: a weak null)"),
        ("shuffled", "the other stored steps in random order around the anchor (each parameter keeps how often it "
                     "is in the category): exact mean over all orders"),
        ("markov", "a first-order two-state chain with the observed stay/enter rates between consecutive stored "
                   "steps (the first transition is fitted: lift 1 there)"),
        ("control", "the --control run's retention of its own anchor set at the same steps"),
        ("IRE mask", "coordinates whose g_i^2 is not in the top --ire-rank fraction; overlap of S_t with it"),
    ),
    json="{category, steps, sizes, anchor{step, overlap, expected, lift}, jaccard, persistent{size, expected, lift}, "
         "ire{overlap, expected}, null, nulls{independence, shuffled, markov, control}} ({runs: [...]} for several "
         "runs)",
    options=(
        Option("category", "C1", ("--category", "-c"), "C1, C2, C3, C4, boundary or undefined.",
               choices=CATEGORY_CHOICES),
        Option("anchor", None, ("--anchor",), "Anchor step (default: the first stored step).", annotation=int),
        Option("no_pairwise", False, ("--no-pairwise",), "Skip the T x T Jaccard matrix."),
        Option("null", "shuffled", ("--null",), "The null the headline expected/lift use: independence, shuffled, "
               "markov or control (all computed ones are in `nulls`).", choices=NULL_CHOICES),
        Option("control", None, ("--control",), "A control run (e.g. SGD analysed at the same rho, or another "
               "seed): its persistence at the same steps is the `control` null.", annotation=str),
        *RATIO_OPTIONS,
    ),
    schema={
        "run": "run directory", "category": "category followed", "steps": "steps", "sizes": "|S_t| per step",
        "anchor": "overlap with the anchor step, expected and lift", "jaccard": "pairwise Jaccard matrix",
        "persistent": "persistent core size, expected and lift under --null",
        "ire": "overlap with the IRE flat mask and expected",
        "null": "the null of the headline expected/lift", "nulls": "{null: {anchor, persistent: {expected, lift}}}",
        "control": "the control run", "minibatch": "--minibatch B of the ratio units (null: whole selection)",
        "n_params": "P", "fractions": "|S_t| / P per step",
        "jaccard_expected": "Jaccard expected under independence, per pair (null with --no-pairwise)",
        "pairwise": "{overlap, expected}: |S_a ∩ S_b| and its independence expectation per pair",
    },
)


def configure(opts: dict[str, Any], settings: Any) -> dict[str, Any]:
    from .base import check_options

    from ..errors import SpecError

    check_options(ANALYSIS, opts)
    if opts["null"] == "control" and not opts["control"]:
        raise SpecError("--null control needs --control RUN (the run whose persistence is the baseline)")
    if opts["control"] and not Path(opts["control"]).exists():
        raise SpecError(f"--control {opts['control']}: no such run directory")
    return {"ratios": ratio_config(opts, settings), "category": opts["category"], "anchor": opts["anchor"],
            "pairwise": not opts["no_pairwise"], "null": opts["null"], "control": opts["control"]}


def units(n_checkpoints: int) -> int:
    """Units one run costs (the progress total): a ratio unit per checkpoint, then the overlap unit."""
    return n_checkpoints + 1


def execute(session: AnalysisSession, targets: list[Path], cfg: dict[str, Any]):
    outcomes = []
    for run in targets:
        outcomes += session.guarded(run, functools.partial(overlap_of_run, session, run, cfg))
    return outcomes


def control_overlap(session: AnalysisSession, cfg: dict[str, Any], anchor: int | None):
    """The control run's overlap result (its ratio units read back or computed with the same options)
    and the digests of its checkpoints (part of the overlap unit's key); raises a SpecError on failure."""
    from ..core.bitpack import membership_mask
    from ..core.overlap import overlap_analysis
    from ..errors import SpecError
    from . import get
    from .ratios import compute as ratio_compute

    units = session.per_checkpoint(get("ratios"), Path(cfg["control"]), cfg["ratios"], ratio_compute)
    good = [o for o in units if o.result is not None and o.step is not None]
    if not good:
        raise SpecError(f"--control {cfg['control']}: no readable checkpoints")
    results: list[dict[str, Any]] = [o.result or {} for o in good]
    steps = [int(o.step or 0) for o in good]
    a = anchor if anchor is not None else steps[0]
    if a not in steps:
        raise SpecError(f"--control {cfg['control']}: it has no checkpoint at the anchor step {a} (steps: {steps})")
    from ..loading.checkpoints import file_sha256

    if not _writes(session):  # --shard-model: rank 0 alone holds the codes and computes the overlap
        return None, [file_sha256(o.path) for o in good], int(results[0]["n_params"])
    masks = [membership_mask(r["codes"], cfg["category"]) for r in results]
    res = overlap_analysis(masks, int(results[0]["n_params"]), steps=steps, category=cfg["category"], anchor=a,
                           pairwise=False, nulls=False)
    return res, [file_sha256(o.path) for o in good], res.n_params


def _writes(session: AnalysisSession) -> bool:
    """Whether this process computes the overlap itself: always, except on ranks other than 0 under
    ``--shard-model`` (only rank 0 holds the gathered codes and masks; the others take part in the
    gradients and ratio units, then return a placeholder that is neither printed nor stored)."""
    from .. import distributed

    return not getattr(session.settings, "shard_model", False) or distributed.is_main()


def _flat_mask(obj: Any, rank: float) -> Any:
    """The IRE flat mask of ``obj``'s gradient (sharded: gathered to rank 0, ``None`` elsewhere)."""
    from ..core import inner
    from ..core.overlap import flat_mask

    group = getattr(obj, "shard_group", None)
    if group is None:
        return flat_mask(obj.grad_flat().square(), rank)
    from ..core.ratios import flat_mask_of_shards

    with inner.sharded(group):
        return flat_mask_of_shards(obj.grad(), obj.space, rank)


def overlap_of_run(session: AnalysisSession, target: Path, cfg: dict[str, Any]):
    """Ratio units of every checkpoint (read back or computed), then the overlap unit of the run."""
    from ..core.bitpack import membership_mask
    from ..core.overlap import overlap_analysis
    from ..loading.runs import run_label
    from ..errors import SpecError
    from . import get
    from .ratios import compute as ratio_compute

    rcfg, category, anchor = cfg["ratios"], cfg["category"], cfg["anchor"]
    units = session.per_checkpoint(get("ratios"), target, rcfg, ratio_compute)
    good = [o for o in units if o.result is not None]
    failed = [o for o in units if o.result is None]
    if not good:
        return failed or [session.failed(target, f"{target}: no readable checkpoints")]
    steps = [o.step for o in good if o.step is not None]  # every ratio unit has its step
    if anchor is not None and anchor not in steps:
        return failed + [session.failed(target, SpecError(f"not a step of {target} (steps: {steps})", option="anchor",
                                                          value=anchor))]

    control, unit_cfg = None, cfg
    if cfg.get("control"):
        control, shas, n_control = control_overlap(session, cfg, anchor if anchor is not None else steps[0])
        n_run = int((good[0].result or {})["n_params"])
        if n_control != n_run:
            return failed + [session.failed(target, f"--control {cfg['control']}: {n_control} parameters, "
                                                     f"{target} has {n_run}")]
        unit_cfg = {**cfg, "control_shas": shas}

    def compute(cks, session: AnalysisSession, _cfg) -> dict[str, Any]:
        by_step = {o.step: o.result for o in good}
        masks, flats = [], []
        mine = _writes(session)
        for ck in cks:
            r = by_step.get(ck.step)
            if r is None:
                continue
            if mine:
                masks.append(membership_mask(r["codes"], category))
            stored = r.get("ire_flat") or {}
            if stored.get("rank") == rcfg["ire_rank"]:
                flats.append(stored["mask"])
            else:  # a unit stored without its flat mask: one gradient pass (on every rank when sharded)
                flats.append(_flat_mask(session.objective(ck), rcfg["ire_rank"]))
        if not mine:
            return {"run": str(target)}
        n = int((good[0].result or {})["n_params"])
        res = overlap_analysis(masks, n, steps=steps, category=category, anchor=anchor, flat_masks=flats,
                               ire_rank=rcfg["ire_rank"], pairwise=cfg["pairwise"], null=cfg.get("null", "shuffled"),
                               control=control)
        out = {"run": str(target), **res.to_dict(), "minibatch": rcfg.get("minibatch")}
        if control is not None:
            out["control"] = str(cfg["control"])
        return out

    files = [(Path(o.path), o.step) for o in good]  # the run's readable checkpoints, already in step order
    return failed + [session.over_files(ANALYSIS, run_label(target), f"overlap-{category}", files, unit_cfg, compute,
                                        origin=str(target))]


def is_result(result: dict[str, Any]) -> bool:
    """Overlap payloads hold an ``anchor`` (ratio units computed on the way are not printed)."""
    return "anchor" in result
