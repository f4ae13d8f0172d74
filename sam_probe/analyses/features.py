"""``features``: which input features a model amplifies first (minor first, major last)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .base import RUNS, Analysis, Option

from ..core.names import IMPORTANCES, STRENGTHS

if TYPE_CHECKING:
    from ..pipeline.protocol import AnalysisSession

ANALYSIS = Analysis(
    name="features", version=1, order=70, target=RUNS,
    summary="Per checkpoint: minor mass, dominant feature and its strength rank, Spearman(growth, strength); "
            "heat-maps of importance for image data.",
    definitions=(
        ("strength s_j", "mean |x_j| of input feature j over the data (--strength corr: |mean y x_j|)"),
        ("importance a_j", "|beta_j| (end-to-end coefficient) for (diagonal) linear nets, ||W1[:, j]|| for "
                           "first-layer-linear models, else the mean input-gradient saliency"),
        ("minor mass", "share of the total importance on the weakest --minor-fraction of features"),
        ("dominant", "the feature with the largest importance, and its rank by strength (0 = strongest)"),
        ("spearman", "rank correlation of per-feature growth log a_j(t+1) - log a_j(t) with strength "
                     "(negative: minor features grow first)"),
        ("background mass", "images: share of importance on pixels darker than --background-threshold"),
    ),
    json='{results[{step, minor_mass, dominant_index, dominant_strength_rank, spearman_growth_strength}], '
         'strength} ({runs: [...]} for several runs)',
    options=(
        Option("strength", "mean-abs", ("--strength",), "Feature strength: mean-abs (mean |x_j|) or corr "
               "(|mean y x_j|).", choices=STRENGTHS),
        Option("importance", "auto", ("--importance",), "auto, coef (|beta_j|), column-norm (||W1[:, j]||) or "
               "saliency.", choices=IMPORTANCES),
        Option("minor_fraction", 0.5, ("--minor-fraction",), "The weakest q fraction of features is 'minor'."),
        Option("background_threshold", 0.05, ("--background-threshold",), "Images: pixels below this fraction of "
               "the brightest mean intensity are background."),
    ),
    schema={
        "run": "run directory", "paths": "checkpoint files", "results": "per checkpoint statistics",
        "strength": "feature strengths", "data": "data spec",
        "importance": "[T, d] importance per checkpoint and input feature", "method": "importance method used",
        "strength_method": "mean-abs or corr", "minor": "indices of the minor features (the weakest --minor-fraction)",
        "minor_fraction": "the fraction of features called minor",
        "collapse_threshold": "total importance below this fraction of its peak: collapsed",
        "image_shape": "[H, W] of image inputs (heat-maps)", "background": "indices of background pixels",
    },
)


def configure(opts: dict[str, Any], settings: Any) -> dict[str, Any]:
    from ..errors import SpecError
    from .base import check_options

    check_options(ANALYSIS, opts)
    if not 0 < opts["minor_fraction"] < 1:
        raise SpecError("--minor-fraction must be in (0, 1)")
    return dict(opts)


def compute(cks, session: AnalysisSession, cfg: dict[str, Any]) -> dict[str, Any]:
    import torch

    from ..errors import SpecError

    data = session.data(cks[0])
    if data.streamed or not isinstance(data.inputs, torch.Tensor):  # features are per input coordinate
        raise SpecError(f"--data {data.name}: features needs in-memory tensor inputs [N, d] (not streamed "
                        "data or dict batches such as token ids)")
    objectives = (session.objective(ck) for ck in cks)  # one at a time
    out = compute_features(objectives, [ck.step for ck in cks], data, cfg)
    return {"run": str(Path(cks[0].path).parent), "paths": [str(ck.path) for ck in cks], **out}


def compute_features(objectives, steps, data, cfg: dict[str, Any]) -> dict[str, Any]:
    """:func:`~sam_probe.core.features.features` of one run (pure); image heat-maps come from
    ``importance`` and ``image_shape`` at plotting time, so they are not stored twice."""
    from ..core.features import features as core_features
    from ..errors import SpecError

    image_shape = tuple(data.image_shape) if data.image_shape else None
    if image_shape is not None and len(image_shape) == 3 and image_shape[0] == 1:
        image_shape = image_shape[1:]
    images = data.pixel_means.reshape(1, -1) if data.pixel_means is not None else None
    try:
        res = core_features(objectives, steps, strength=cfg["strength"], importance_method=cfg["importance"],
                            minor_fraction=cfg["minor_fraction"], image_shape=image_shape, images=images,
                            background_threshold=cfg["background_threshold"] if image_shape else None)
    except ValueError as exc:
        raise SpecError(f"features: {exc}") from None
    out = res.to_dict()
    out.pop("heatmaps", None)
    out["data"] = data.name
    return out
