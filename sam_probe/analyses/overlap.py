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

ANALYSIS = Analysis(
    name="overlap", version=1, order=30, target=RUNS,
    summary="Persistence of a ratio category across steps: anchor overlap, Jaccard, persistent core and IRE link, "
            "each with its independence baseline and lift (uses stored ratio units, computes missing ones).",
    definitions=(
        ("S_t", "the parameters in --category at step t (see `sam-probe ratios --help`)"),
        ("anchor overlap", "|S_anchor ∩ S_t|; expected under independence P p_anchor p_t with p_t = |S_t|/P"),
        ("Jaccard", "|S_s ∩ S_t| / |S_s ∪ S_t| for every pair of steps"),
        ("persistent core", "|S_anchor ∩ ... ∩ S_t| over consecutive steps; expected P Π p_s"),
        ("lift", "observed / expected under independence (1 = chance)"),
        ("IRE mask", "coordinates whose g_i^2 is not in the top --ire-rank fraction; overlap of S_t with it"),
    ),
    json="{category, steps, sizes, anchor{step, overlap, expected, lift}, jaccard, persistent{size, expected}, "
         "ire{overlap, expected}} ({runs: [...]} for several runs)",
    options=(
        Option("category", "C1", ("--category", "-c"), "C1, C2, C3, C4, boundary or undefined.",
               choices=CATEGORY_CHOICES),
        Option("anchor", None, ("--anchor",), "Anchor step (default: the first stored step).", annotation=int),
        Option("no_pairwise", False, ("--no-pairwise",), "Skip the T x T Jaccard matrix."),
        *RATIO_OPTIONS,
    ),
    schema={
        "run": "run directory", "category": "category followed", "steps": "steps", "sizes": "|S_t| per step",
        "anchor": "overlap with the anchor step, expected and lift", "jaccard": "pairwise Jaccard matrix",
        "persistent": "persistent core size and expected", "ire": "overlap with the IRE flat mask and expected",
    },
)


def configure(opts: dict[str, Any], settings: Any) -> dict[str, Any]:
    from .base import check_options

    check_options(ANALYSIS, opts)
    return {"ratios": ratio_config(opts), "category": opts["category"], "anchor": opts["anchor"],
            "pairwise": not opts["no_pairwise"]}


def units(n_checkpoints: int) -> int:
    """Units one run costs (the progress total): a ratio unit per checkpoint, then the overlap unit."""
    return n_checkpoints + 1


def execute(session: AnalysisSession, targets: list[Path], cfg: dict[str, Any]):
    outcomes = []
    for run in targets:
        outcomes += session.guarded(run, functools.partial(overlap_of_run, session, run, cfg))
    return outcomes


def overlap_of_run(session: AnalysisSession, target: Path, cfg: dict[str, Any]):
    """Ratio units of every checkpoint (read back or computed), then the overlap unit of the run."""
    from ..core.bitpack import membership_mask
    from ..core.overlap import flat_mask, overlap_analysis
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

    def compute(cks, session: AnalysisSession, _cfg) -> dict[str, Any]:
        by_step = {o.step: o.result for o in good}
        masks, flats = [], []
        for ck in cks:
            r = by_step.get(ck.step)
            if r is None:
                continue
            masks.append(membership_mask(r["codes"], category))
            stored = r.get("ire_flat") or {}
            if stored.get("rank") == rcfg["ire_rank"]:
                flats.append(stored["mask"])
            else:  # a unit stored without its flat mask: one gradient pass
                flats.append(flat_mask(session.objective(ck).grad_flat().square(), rcfg["ire_rank"]))
        n = int((good[0].result or {})["n_params"])
        res = overlap_analysis(masks, n, steps=steps, category=category, anchor=anchor, flat_masks=flats,
                               ire_rank=rcfg["ire_rank"], pairwise=cfg["pairwise"])
        return {"run": str(target), **res.to_dict()}

    files = [(Path(o.path), o.step) for o in good]  # the run's readable checkpoints, already in step order
    return failed + [session.over_files(ANALYSIS, run_label(target), f"overlap-{category}", files, cfg, compute,
                                        origin=str(target))]


def is_result(result: dict[str, Any]) -> bool:
    """Overlap payloads hold an ``anchor`` (ratio units computed on the way are not printed)."""
    return "anchor" in result
