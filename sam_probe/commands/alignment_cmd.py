"""``sam-probe alignment CHECKPOINT``: gradients against the dominant Hessian eigenspace."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from ..core.perturb import VARIANTS
from ..errors import SpecError
from ..report import alignment as view
from .options import Common, analysis_options
from .runner import finish_per_checkpoint, per_checkpoint

VECTORS = ("full", "minibatch", "sam", "update")


def parse_floats(text: str | None, option: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SpecError(f"{option} {text}: give numbers separated by commas") from None


def compute_alignment(obj, cfg: dict[str, Any], k: int, eta: float, prev_params=None) -> dict[str, Any]:
    """Certified top-k eigenvectors, then :func:`~sam_probe.core.alignment.alignment` (pure)."""
    from ..core.alignment import alignment
    from ..core.lanczos import top_eigen

    eig = top_eigen(obj, k, tol=cfg["tol"], max_hvp=cfg["max_hvp"], seed=cfg["seed"])
    res = alignment(obj, eig.eigenvectors, eig.eigenvalues, eta=eta, vectors=cfg["vectors"],
                    batch_size=cfg["minibatch_size"], seed=cfg["seed"], rho=cfg["rho"], variant=cfg["variant"],
                    prev_params=prev_params, eta_grid=cfg["eta_grid"])
    out = res.to_dict()
    out.update(residuals=list(eig.residuals), converged=list(eig.converged), n_hvp=eig.n_hvp)
    if not eig.all_converged:
        bad = [i + 1 for i, c in enumerate(eig.converged) if not c]
        out["warnings"] = [f"eigenpairs {bad} not converged to --tol {cfg['tol']:g}: the subspace (and chi) is "
                           "approximate; raise --max-hvp"] + list(eig.warnings)
    return out


def alignment(
    checkpoints: list[Path] = typer.Argument(..., help="Checkpoint files or run directories."),
    k: Optional[int] = typer.Option(None, "--k", help="Dimension of the dominant subspace (default: number of classes)."),
    vectors: str = typer.Option("full,minibatch,sam,update", "--vectors", help="Any of full, minibatch, sam, update."),
    eta: Optional[float] = typer.Option(None, "--eta", help="Step size of the one-step loss changes (default: the checkpoint's lr, else 0.1)."),
    eta_grid: Optional[str] = typer.Option(None, "--eta-grid", help="Comma-separated etas for eta*_emp (default: around 2/lambda_max; empty string skips)."),
    minibatch_size: int = typer.Option(128, "--minibatch-size", help="Samples of the seeded minibatch gradient."),
    rho: float = typer.Option(0.05, "--rho", help="SAM radius of the perturbed gradient."),
    variant: str = typer.Option("l2", "--variant", help="Perturbation: l2, linf, usam or asam."),
    tol: float = typer.Option(1e-3, "--tol", help="Residual tolerance of the eigenvectors."),
    max_hvp: Optional[int] = typer.Option(None, "--max-hvp", help="HVP budget of the eigensolver."),
    *,
    common: Common,
) -> None:
    """chi_k = ||P_k v|| / ||v|| of full, minibatch, SAM and update vectors; one-step loss changes along the
    dominant and bulk subspaces with their second-order predictions; eta*_emp and eta*lambda_max."""
    chosen = [v.strip() for v in vectors.split(",") if v.strip()]
    bad = [v for v in chosen if v not in VECTORS]
    if bad or not chosen:
        raise SpecError(f"--vectors {vectors}: choose from {', '.join(VECTORS)}")
    if variant not in VARIANTS:
        raise SpecError(f"--variant {variant}: choose one of {', '.join(VARIANTS)}")
    if k is not None and k < 1:
        raise SpecError("--k must be >= 1")
    cfg = {"k": k, "vectors": chosen, "eta": eta, "eta_grid": parse_floats(eta_grid, "--eta-grid"),
           "minibatch_size": minibatch_size, "rho": rho, "variant": variant, "tol": tol, "max_hvp": max_hvp,
           "seed": common.settings.seed}

    def compute(ck, session, carry):
        obj = session.objective(ck)
        data = session.data(ck)
        kk = k or data.n_classes or 10
        if kk >= obj.n_params:
            raise SpecError(f"{ck.path}: --k {kk} must be below the parameter count {obj.n_params}")
        lr = ck.hparams.get("lr")
        step_eta = eta if eta is not None else (float(lr) if isinstance(lr, (int, float)) and lr > 0 else 0.1)
        prev = None
        if "update" in chosen and carry.get("prev_path"):
            prev = session.objective(session.load(carry["prev_path"])).flat_params()
        return compute_alignment(obj, cfg, kk, step_eta, prev)

    finish_per_checkpoint(common, per_checkpoint(common, checkpoints, "alignment", cfg, compute), view)


def register(app: typer.Typer) -> None:
    app.command("alignment")(analysis_options(alignment))
