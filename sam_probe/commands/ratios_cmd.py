"""``sam-probe ratios`` and ``sam-probe overlap``: SAM's perturbed/current gradient ratio
categories per parameter, and how a category's parameter set persists across steps.

``ratios`` stores, per checkpoint, the statistics (JSON) and the per-parameter
category codes bit-packed (about 1.3 bits per parameter) plus the IRE flat mask
at ``--ire-rank``; ``overlap`` reads those back and never recomputes a gradient
for a stored checkpoint.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from ..core.categories import CATEGORIES
from ..core.perturb import VARIANTS
from ..errors import SpecError
from ..loading.runs import run_label
from ..pipeline import UnitOutcome, without_packed
from ..report import overlap as overlap_view
from ..report import ratios as ratios_view
from .options import Common, analysis_options
from .runner import finish_per_checkpoint, finish_whole_runs, guarded, per_checkpoint, session_with_progress

DEFAULT_IRE_RANK = 0.9


def parse_edges(text: str) -> list[float]:
    try:
        edges = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SpecError(f"--edges {text}: give increasing numbers > 1 separated by commas, e.g. 1.2,1.5,2,4") from None
    if not edges or any(e <= 1 for e in edges) or any(b <= a for a, b in zip(edges, edges[1:])):
        raise SpecError(f"--edges {text}: give increasing numbers > 1 separated by commas, e.g. 1.2,1.5,2,4")
    return edges


def ratio_config(rho: float, variant: str, m: int | None, eps: float, faithful: bool, edges: list[float],
                 eta: float, ire_rank: float) -> dict[str, Any]:
    if variant not in VARIANTS:
        raise SpecError(f"--variant {variant}: choose one of {', '.join(VARIANTS)}")
    if rho <= 0 or eps < 0 or (m is not None and m < 1):
        raise SpecError("--rho must be > 0, --eps >= 0 and --m >= 1")
    if not 0 < ire_rank < 1:
        raise SpecError(f"--ire-rank {ire_rank}: a fraction in (0, 1), e.g. 0.9")
    return {"rho": rho, "variant": variant, "m": m, "eps": eps, "faithful": faithful, "edges": edges, "eta": eta,
            "ire_rank": ire_rank}


def compute_ratios(obj, cfg: dict[str, Any]) -> dict[str, Any]:
    """Ratio statistics of one objective, with the packed codes and the IRE flat mask (pure)."""
    from ..core.overlap import flat_mask
    from ..core.perturb import perturbed_gradient
    from ..core.ratios import ratio_from_gradients

    pg = perturbed_gradient(obj, rho=cfg["rho"], variant=cfg["variant"], m=cfg["m"], eta=cfg["eta"], with_loss=False)
    res = ratio_from_gradients(pg.grad, pg.perturbed_grad, obj.space, rho=cfg["rho"], variant=cfg["variant"],
                               m=cfg["m"], eta=cfg["eta"], eps=cfg["eps"], faithful=cfg["faithful"], edges=cfg["edges"])
    out = res.to_dict()
    if cfg["m"]:
        out["m"] = cfg["m"]
    out["faithful"] = cfg["faithful"]
    out["codes"] = res.packed_codes()
    out["ire_flat"] = {"rank": cfg["ire_rank"], "mask": flat_mask(pg.grad.square(), cfg["ire_rank"])}
    return out


def _compute(cfg: dict[str, Any]):
    return lambda ck, session, carry: compute_ratios(session.objective(ck), cfg)


def _ratio_outcomes(session, target: Path, cfg: dict[str, Any]) -> list[UnitOutcome]:
    return session.per_checkpoint("ratios", target, cfg, _compute(cfg))


def ratios(
    checkpoints: list[Path] = typer.Argument(..., help="Checkpoint files or run directories."),
    rho: float = typer.Option(0.05, "--rho", help="SAM radius."),
    variant: str = typer.Option("l2", "--variant", help="Perturbation: l2, linf, usam or asam."),
    m: Optional[int] = typer.Option(None, "--m", help="m-sharpness: perturb each sub-batch of m samples separately."),
    eps: float = typer.Option(1e-12, "--eps", help="r_i is undefined where |g_i| <= eps."),
    eta: float = typer.Option(0.01, "--eta", help="ASAM's eta."),
    faithful: bool = typer.Option(False, "--faithful", help="The notebook's formula r = g~/(g + 1e-8)."),
    bucket: bool = typer.Option(False, "--bucket", help="Show the C1 ratio bins (table and histogram)."),
    edges: str = typer.Option("1.2,1.5,2,4,8,16", "--edges", help="C1 bin edges (the first bin starts at 1)."),
    per_layer: bool = typer.Option(False, "--per-layer", help="Show the per-tensor breakdown (always stored)."),
    ire_rank: float = typer.Option(DEFAULT_IRE_RANK, "--ire-rank", help="Top fraction of g^2 that is 'sharp' for the stored IRE flat mask."),
    *,
    common: Common,
) -> None:
    """Per-parameter ratio r = g~/g of SAM's perturbed to current gradient: categories C1-C4, bins, magnitude split."""
    cfg = ratio_config(rho, variant, m, eps, faithful, parse_edges(edges), eta, ire_rank)
    outcomes = per_checkpoint(common, checkpoints, "ratios", cfg, _compute(cfg))
    for o in outcomes:  # packed arrays stay in the store
        if o.result is not None:
            o.result = without_packed(o.result)
    finish_per_checkpoint(common, outcomes, ratios_view, bucket=bucket, per_layer=per_layer)


def overlap_of_run(session, target: Path, cfg: dict[str, Any], category: str, anchor: int | None,
                   pairwise: bool) -> list[UnitOutcome]:
    """Ratio units of every checkpoint (read back or computed), then the overlap unit of the run."""
    from ..core.bitpack import membership_mask
    from ..core.overlap import flat_mask, overlap_analysis

    units = _ratio_outcomes(session, target, cfg)
    good = [o for o in units if o.result is not None]
    failed = [o for o in units if o.result is None]
    if not good:
        return failed or [UnitOutcome(str(target), None, "failed", error=f"{target}: no readable checkpoints")]
    steps = [o.step for o in good]
    if anchor is not None and anchor not in steps:
        return failed + [UnitOutcome(str(target), None, "failed",
                                     error=f"--anchor {anchor}: not a step of {target} (steps: {steps})")]
    ov_cfg = {**cfg, "category": category, "anchor": anchor, "pairwise": pairwise}

    def compute(cks, session) -> dict[str, Any]:
        by_step = {o.step: o.result for o in good}
        masks, flats = [], []
        for ck in cks:
            r = by_step.get(ck.step)
            if r is None:
                continue
            masks.append(membership_mask(r["codes"], category))
            stored = r.get("ire_flat") or {}
            if stored.get("rank") == cfg["ire_rank"]:
                flats.append(stored["mask"])
            else:  # a unit stored without its flat mask: one gradient pass
                flats.append(flat_mask(session.objective(ck).grad_flat().square(), cfg["ire_rank"]))
        n = int(good[0].result["n_params"])
        res = overlap_analysis(masks, n, steps=steps, category=category, anchor=anchor, flat_masks=flats,
                               ire_rank=cfg["ire_rank"], pairwise=pairwise)
        return {"run": str(target), **res.to_dict()}

    files = [(Path(o.path), o.step) for o in good]  # the run's readable checkpoints, already in step order
    return failed + [session.over_files("overlap", run_label(target), f"overlap-{category}", files, ov_cfg, compute,
                                        origin=str(target))]


def overlap(
    runs: list[Path] = typer.Argument(..., help="Run directories (several checkpoints each)."),
    category: str = typer.Option("C1", "--category", "-c", help="C1, C2, C3, C4, boundary or undefined."),
    anchor: Optional[int] = typer.Option(None, "--anchor", help="Anchor step (default: the first stored step)."),
    ire_rank: float = typer.Option(DEFAULT_IRE_RANK, "--ire-rank", help="IRE flat mask: coordinates whose g^2 is not in this top fraction."),
    no_pairwise: bool = typer.Option(False, "--no-pairwise", help="Skip the T x T Jaccard matrix."),
    rho: float = typer.Option(0.05, "--rho", help="SAM radius of the ratio categories."),
    variant: str = typer.Option("l2", "--variant", help="Perturbation: l2, linf, usam or asam."),
    m: Optional[int] = typer.Option(None, "--m", help="m-sharpness sub-batch size."),
    eps: float = typer.Option(1e-12, "--eps", help="r_i is undefined where |g_i| <= eps."),
    eta: float = typer.Option(0.01, "--eta", help="ASAM's eta."),
    faithful: bool = typer.Option(False, "--faithful", help="The notebook's formula r = g~/(g + 1e-8)."),
    edges: str = typer.Option("1.2,1.5,2,4,8,16", "--edges", help="C1 bin edges (part of the ratio units' key)."),
    *,
    common: Common,
) -> None:
    """Persistence of a ratio category across steps: anchor overlap, Jaccard, persistent core, IRE link,
    each with its independence baseline and lift. Uses stored ratio units (computes missing ones).

    JSON: the overlap object for one run; {"runs": [...]} for several.
    """
    if category not in CATEGORIES:
        raise SpecError(f"--category {category}: choose one of {', '.join(CATEGORIES)}")
    cfg = ratio_config(rho, variant, m, eps, faithful, parse_edges(edges), eta, ire_rank)
    outcomes: list[UnitOutcome] = []
    with session_with_progress(common) as session:
        for run in runs:
            outcomes += guarded(run, lambda r=run: overlap_of_run(session, r, cfg, category, anchor, not no_pairwise))
    finish_whole_runs(common, runs, outcomes, overlap_view, is_result=lambda r: "anchor" in r)


def register(app: typer.Typer) -> None:
    app.command("ratios")(analysis_options(ratios))
    app.command("overlap")(analysis_options(overlap))
