"""``ratios``: SAM's perturbed/current gradient ratio r = g~/g per parameter, and its categories.

Stores, per checkpoint, the statistics and the per-parameter category codes
bit-packed (about 1.3 bits per parameter) plus the IRE flat mask at
``--ire-rank``; ``overlap`` reads those back and never recomputes a gradient for
a stored checkpoint.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .base import CHECKPOINTS, Analysis, Option, check_options, perturbation_options

if TYPE_CHECKING:
    from ..pipeline.protocol import AnalysisSession

DEFAULT_IRE_RANK = 0.9
DEFAULT_EDGES = "1.2,1.5,2,4,8,16"

CATEGORY_DEFINITIONS = (
    ("r", "g~_i / g_i, SAM's perturbed gradient over the current gradient, per parameter i"),
    ("C1", "r > 1: the perturbed gradient is larger, same sign"),
    ("C2", "0 < r < 1: smaller, same sign"),
    ("C3", "r < -1: the sign flips and the perturbed gradient is larger"),
    ("C4", "-1 < r < 0: the sign flips and the perturbed gradient is smaller"),
    ("boundary", "r exactly -1, 0 or 1"),
    ("undefined", "|g_i| <= --eps (no ratio)"),
)

RATIO_OPTIONS = (
    *perturbation_options(),
    Option("eps", 1e-12, ("--eps",), "r_i is undefined where |g_i| <= eps."),
    Option("faithful", False, ("--faithful",), "The notebook's formula r = g~/(g + 1e-8)."),
    Option("edges", DEFAULT_EDGES, ("--edges",), "C1 bin edges (the first bin starts at 1)."),
    Option("ire_rank", DEFAULT_IRE_RANK, ("--ire-rank",),
           "IRE flat mask: coordinates whose g^2 is not in this top fraction."),
    Option("minibatch", None, ("--minibatch",), "g and g~ on the step's own minibatch of B samples (the notebook's "
           "definition): the indices or the seeded stream the trainer recorded, else a seeded draw per checkpoint "
           "(default: the whole selection).", annotation=int),
)

ANALYSIS = Analysis(
    name="ratios", version=1, order=20, target=CHECKPOINTS, shardable=True,
    summary="Per-parameter ratio r = g~/g of SAM's perturbed to current gradient: categories C1-C4, bins, "
            "magnitude split.",
    definitions=(
        *CATEGORY_DEFINITIONS,
        ("bins", "C1 parameters by r in (1, e1), [e1, e2), ..., [e_last, inf) for the --edges e1 < e2 < ..."),
        ("magnitude split", "share of C1 whose |g_i| is above the |C1|-th largest |g| over all i; chance level "
                            "|C1|/P; lift = share / chance"),
        ("IRE mask", "coordinates whose g_i^2 is not in the top --ire-rank fraction (flat directions)"),
        ("--minibatch B", "g and g~ on the B samples of the step's own minibatch (recorded by the trainer) or a "
                          "seeded draw; `minibatch.source` says which"),
    ),
    json="results[{path, step, rho, variant, n_params, grad_norm, perturbed_grad_norm, counts, fractions, buckets, "
         "magnitude_split, per_layer}]",
    options=(
        *RATIO_OPTIONS,
        Option("bucket", False, ("--bucket",), "Show the C1 ratio bins (table and histogram).", view=True),
        Option("per_layer", False, ("--per-layer",), "Show the per-tensor breakdown (always stored).", view=True),
    ),
    view_defaults={"bucket": True},
    schema={
        "path": "checkpoint file", "step": "training step", "source": "format, layout, prefix and step source",
        "rho": "SAM radius", "variant": "perturbation", "n_params": "P",
        "grad_norm": "||g||", "perturbed_grad_norm": "||g~||",
        "counts": "parameters per category (sum to P)", "fractions": "counts / P",
        "buckets": "C1 counts per ratio bin", "magnitude_split": "C1 among the largest |g| with chance and lift",
        "minibatch": "with --minibatch: {size, source (recorded indices, trainer stream, seeded draw), ...}",
        "per_layer": "the same per parameter tensor", "seconds": "wall time",
        "faithful": "r computed as the notebook's g~/(g + 1e-8)",
        "warnings": "with --minibatch: why the minibatch is not the step's own (e.g. a seeded draw)",
        "codes": "category code per parameter, bit-packed (stored, not printed)",
        "ire_flat": "the IRE flat mask at --ire-rank, bit-packed (stored, not printed)",
    },
)


def parse_edges(text: str) -> list[float]:
    from ..errors import SpecError

    try:
        edges = [float(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        edges = []
    if not edges or any(e <= 1 for e in edges) or any(b <= a for a, b in zip(edges, edges[1:])):
        raise SpecError(f"--edges {text}: give increasing numbers > 1 separated by commas, e.g. 1.2,1.5,2,4")
    return edges


def ratio_config(opts: dict[str, Any], settings: Any = None) -> dict[str, Any]:
    """The ratio units' config from the ratio options (shared with ``overlap``)."""
    from ..errors import SpecError

    check_options(ANALYSIS, opts)
    rho, eps, m, ire_rank = opts["rho"], opts["eps"], opts["m"], opts["ire_rank"]
    if rho <= 0 or eps < 0 or (m is not None and m < 1):
        raise SpecError("--rho must be > 0, --eps >= 0 and --m-sharpness >= 1")
    if not 0 < ire_rank < 1:
        raise SpecError(f"--ire-rank {ire_rank}: a fraction in (0, 1), e.g. 0.9")
    cfg = {"rho": rho, "variant": opts["variant"], "m": m, "eps": eps, "faithful": opts["faithful"],
           "edges": parse_edges(opts["edges"]), "eta": opts["eta"], "ire_rank": ire_rank}
    if opts.get("minibatch") is not None:  # absent otherwise: units stored before --minibatch keep their keys
        if opts["minibatch"] < 1:
            raise SpecError(f"--minibatch {opts['minibatch']}: a number of samples >= 1")
        cfg["minibatch"] = int(opts["minibatch"])
        cfg["seed"] = int(getattr(settings, "seed", 0) or 0) if settings is not None else 0
    return cfg


def configure(opts: dict[str, Any], settings: Any) -> dict[str, Any]:
    return ratio_config(opts, settings)


def compute(ck, session: AnalysisSession, cfg: dict[str, Any], carry: dict[str, Any]) -> dict[str, Any]:
    obj = session.objective(ck)
    if not cfg.get("minibatch"):
        return compute_ratios(obj, cfg)
    from ._trainer import step_minibatch

    s = session.settings
    idx, desc = step_minibatch(ck, obj.n_samples, cfg["minibatch"], cfg.get("seed", 0),
                               {"max_samples": s.max_samples, "seed": s.seed})
    out = compute_ratios(obj.subset(idx.to(obj.device)), cfg)
    out["minibatch"] = desc
    if desc.get("note"):
        out["warnings"] = [desc["note"]]
    return out


def compute_ratios(obj, cfg: dict[str, Any]) -> dict[str, Any]:
    """Ratio statistics of one objective (the whole selection, or a step's minibatch as an
    ``obj.subset``), with the packed codes and the IRE flat mask (pure).

    A model-sharded objective (``--shard-model``): every rank computes ``g`` and ``g~`` on its shards
    (``||g||`` summed over ranks) and the statistics per shard, summed over ranks; the codes and the IRE
    mask are gathered to rank 0 in one process's order and packed there
    (:func:`~sam_probe.core.ratios.ratio_from_shards`, which says what that costs), so the stored unit
    holds the bytes of a one-process run.  Other ranks return ``codes: None`` (rank 0 writes)."""
    from ..core import inner
    from ..core.perturb import perturbed_gradient
    from ..core.ratios import ratio_from_gradients, ratio_from_shards

    kw = dict(rho=cfg["rho"], variant=cfg["variant"], m=cfg["m"], eta=cfg["eta"], eps=cfg["eps"],
              faithful=cfg["faithful"], edges=cfg["edges"], ire_rank=cfg["ire_rank"])
    with inner.over(obj):
        pg = perturbed_gradient(obj, rho=cfg["rho"], variant=cfg["variant"], m=cfg["m"], eta=cfg["eta"],
                                with_loss=False)
        if inner.active():
            res = ratio_from_shards(pg.grad, pg.perturbed_grad, obj.space, **kw)
        else:
            res = ratio_from_gradients(pg.grad, pg.perturbed_grad, obj.space, **kw)
    del pg  # g and g~ are not needed past this point
    out = res.to_dict()
    if cfg["m"]:
        out["m"] = cfg["m"]
    out["faithful"] = cfg["faithful"]
    out["codes"] = res.packed_codes()
    out["ire_flat"] = {"rank": cfg["ire_rank"], "mask": res.ire_flat}
    return out
