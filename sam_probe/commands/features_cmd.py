"""``sam-probe features RUN``: which input features a model amplifies first (minor first, major last)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from ..errors import SpecError
from ..report import features as view
from .options import Common, analysis_options
from .runner import finish_whole_runs, whole_runs


def compute_features(objectives, steps, data, cfg: dict[str, Any]) -> dict[str, Any]:
    """:func:`~sam_probe.core.features.features` of one run (pure); image heat-maps come from
    ``importance`` and ``image_shape`` at plotting time, so they are not stored twice."""
    from ..core.features import features as core_features

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


def features(
    runs: list[Path] = typer.Argument(..., help="Run directories."),
    strength: str = typer.Option("mean-abs", "--strength", help="Feature strength: mean-abs (mean |x_j|) or corr (|mean y x_j|)."),
    importance: str = typer.Option("auto", "--importance", help="auto, coef (|beta_j|), column-norm (||W1[:, j]||) or saliency."),
    minor_fraction: float = typer.Option(0.5, "--minor-fraction", help="The weakest q fraction of features is 'minor'."),
    background_threshold: float = typer.Option(0.05, "--background-threshold", help="Images: pixels below this fraction of the brightest mean intensity are background."),
    *,
    common: Common,
) -> None:
    """Per checkpoint: minor mass, dominant feature and its strength rank, Spearman(growth, strength);
    heat-maps of importance for image data.

    JSON: {"results": [...], "strength": [...], ...} for one run; {"runs": [...]} for several.
    """
    from ..core.features import IMPORTANCES, STRENGTHS

    if strength not in STRENGTHS:
        raise SpecError(f"--strength {strength}: choose {' or '.join(STRENGTHS)}")
    if importance not in IMPORTANCES:
        raise SpecError(f"--importance {importance}: choose one of {', '.join(IMPORTANCES)}")
    if not 0 < minor_fraction < 1:
        raise SpecError("--minor-fraction must be in (0, 1)")
    cfg = {"strength": strength, "importance": importance, "minor_fraction": minor_fraction,
           "background_threshold": background_threshold}

    def compute(cks, session) -> dict[str, Any]:
        data = session.data(cks[0])
        import torch

        if data.streamed or not isinstance(data.inputs, torch.Tensor):  # features are per input coordinate
            raise SpecError(f"--data {data.name}: features needs in-memory tensor inputs [N, d] (not streamed "
                            "data or dict batches such as token ids)")
        objectives = (session.objective(ck) for ck in cks)  # one at a time
        out = compute_features(objectives, [ck.step for ck in cks], data, cfg)
        return {"run": str(Path(cks[0].path).parent), "paths": [str(ck.path) for ck in cks], **out}

    finish_whole_runs(common, runs, whole_runs(common, runs, "features", cfg, compute, name="features"), view)


def register(app: typer.Typer) -> None:
    app.command("features")(analysis_options(features))
