"""``sam-probe sharpness CHECKPOINT``: certified top-k eigenvalues, trace, density, SAM sharpness."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from ..core.perturb import VARIANTS
from ..errors import SpecError
from ..report import sharpness as view
from .options import Common, analysis_options
from .runner import finish_per_checkpoint, per_checkpoint



def _sorted_desc(values: list[float], residuals: list[float], converged: list[bool]) -> tuple[list, list, list]:
    order = sorted(range(len(values)), key=lambda i: -values[i])
    return [values[i] for i in order], [residuals[i] for i in order], [converged[i] for i in order]


def compute_sharpness(obj, cfg: dict[str, Any]) -> dict[str, Any]:
    """All curvature numbers of one objective (pure: no files, no terminal)."""
    from ..core.density import hessian_density
    from ..core.lanczos import top_eigen
    from ..core.perturb import sam_sharpness
    from ..core.trace import hessian_trace

    out: dict[str, Any] = {}
    warnings: list[str] = []
    loss, acc = obj.evaluate()
    out["loss"] = loss
    if acc is not None:
        out["accuracy"] = acc
    out["n_params"] = obj.n_params
    if cfg["backend"] == "pyhessian":
        from ..core.pyhessian_backend import run_pyhessian

        res = run_pyhessian(obj, top_n=cfg["top_k"], eigen=cfg["top_k"] > 0, trace=cfg["trace"], tol=cfg["tol"],
                            trace_tol=cfg["trace_tol"], seed=cfg["seed"])
        d = res.to_dict()
        if cfg["top_k"] > 0:
            vals, resid, _ = _sorted_desc(d["eigenvalues"], d["residuals"], [True] * len(d["eigenvalues"]))
            out.update(eigenvalues=vals, residuals=resid, n_hvp=d["n_hvp_eigen"])
            bad = [i + 1 for i, r in enumerate(resid) if not r <= cfg["tol"]]
            if bad:
                warnings.append(f"PyHessian eigenpairs {bad} have relative residual above --tol {cfg['tol']:g} "
                                "(PyHessian has no residual test)")
        if cfg["trace"]:
            out.update(trace=d["trace"], trace_se=d["trace_se"], trace_n_hvp=d["n_hvp_trace"])
        out["backend"] = "pyhessian"
        out["pyhessian"] = {k: d[k] for k in ("seconds_setup", "seconds_eigen", "seconds_trace")}
        out["limitations"] = d["limitations"]
    elif cfg["top_k"] > 0:
        res = top_eigen(obj, cfg["top_k"], which=cfg["which"], tol=cfg["tol"], max_hvp=cfg["max_hvp"],
                        block_size=cfg["block_size"], seed=cfg["seed"])
        vals, resid, conv = _sorted_desc(list(res.eigenvalues), list(res.residuals), list(res.converged))
        out.update(eigenvalues=vals, residuals=resid, converged=conv, n_hvp=res.n_hvp, which=cfg["which"])
        warnings += list(res.warnings)
        if not all(conv):
            bad = [i + 1 for i, c in enumerate(conv) if not c]
            msg = f"eigenpairs {bad} not converged to --tol {cfg['tol']:g} (residuals reported; raise --max-hvp)"
            if msg not in warnings:
                warnings.append(msg)
    if cfg["trace"] and cfg["backend"] != "pyhessian":
        tr = hessian_trace(obj, cfg["trace_method"], tol=cfg["trace_tol"], max_hvp=cfg["trace_max_hvp"], seed=cfg["seed"])
        out.update(trace=tr.estimate, trace_se=tr.se, trace_probes=tr.n_probes, trace_n_hvp=tr.n_hvp,
                   trace_method=tr.method, trace_converged=tr.converged)
        warnings += list(tr.warnings)
    if cfg["density"]:
        dens = hessian_density(obj, steps=cfg["density_steps"], n_probes=cfg["density_probes"], seed=cfg["seed"])
        out["density"] = {"grid": dens.grid.tolist(), "density": dens.density.tolist(), "sigma": dens.sigma,
                          "n_hvp": dens.n_hvp, "steps": dens.steps, "mean": dens.mean,
                          "n_probes": len(dens.nodes)}
    if cfg["rho"] > 0:
        out["sam_sharpness"] = sam_sharpness(obj, rho=cfg["rho"], variant=cfg["variant"], m=cfg["m"])
        out.update(rho=cfg["rho"], variant=cfg["variant"])
        if cfg["m"]:
            out["m"] = cfg["m"]
    out["total_hvp"] = obj.n_hvp
    if warnings:
        out["warnings"] = warnings
    return out


def sharpness(
    checkpoints: list[Path] = typer.Argument(..., help="Checkpoint files or run directories."),
    top_k: int = typer.Option(5, "--top-k", "-k", help="Number of eigenvalues (0: none)."),
    tol: float = typer.Option(1e-3, "--tol", help="Relative residual ||Hv - lambda v|| / |lambda| every pair must reach."),
    which: str = typer.Option("LA", "--which", help="LA: largest algebraic, SA: smallest algebraic, LM: largest magnitude."),
    max_hvp: Optional[int] = typer.Option(None, "--max-hvp", help="HVP budget for the eigenvalues (default: ample)."),
    block_size: int = typer.Option(1, "--block-size", help="Lanczos block size (vmapped HVPs)."),
    trace: bool = typer.Option(False, "--trace", help="Estimate the Hessian trace."),
    trace_method: str = typer.Option("hutch++", "--trace-method", help="hutch++ or hutchinson."),
    trace_tol: float = typer.Option(1e-2, "--trace-tol", help="Stop when the relative standard error is below this."),
    trace_max_hvp: int = typer.Option(1000, "--trace-max-hvp", help="HVP budget for the trace."),
    density: bool = typer.Option(False, "--density", help="Spectral density by stochastic Lanczos quadrature."),
    density_steps: int = typer.Option(80, "--density-steps", help="Lanczos steps per SLQ probe."),
    density_probes: int = typer.Option(5, "--density-probes", help="SLQ probes."),
    rho: float = typer.Option(0.05, "--rho", help="SAM radius for L(w+e) - L(w) (0: skip)."),
    variant: str = typer.Option("l2", "--variant", help="Perturbation: l2, linf, usam or asam."),
    m: Optional[int] = typer.Option(None, "--m", help="m-sharpness: perturb each sub-batch of m samples separately."),
    backend: str = typer.Option("lanczos", "--backend", help="lanczos (sam-probe) or pyhessian (for comparison)."),
    *,
    common: Common,
) -> None:
    """Hessian top-k eigenvalues (certified by residuals), trace, spectral density and SAM sharpness."""
    which = which.upper()
    if which not in ("LA", "SA", "LM"):
        raise SpecError(f"--which {which}: choose LA, SA or LM")
    if variant not in VARIANTS:
        raise SpecError(f"--variant {variant}: choose one of {', '.join(VARIANTS)}")
    if backend not in ("lanczos", "pyhessian"):
        raise SpecError(f"--backend {backend}: choose lanczos or pyhessian")
    if trace_method not in ("hutch++", "hutchinson"):
        raise SpecError(f"--trace-method {trace_method}: choose hutch++ or hutchinson")
    if backend == "pyhessian" and density:
        raise SpecError("--density with --backend pyhessian: PyHessian's density needs torch.eig, removed from "
                        "modern torch; use the default backend")
    if top_k < 0 or tol <= 0 or trace_tol <= 0 or rho < 0:
        raise SpecError("--top-k, --tol, --trace-tol and --rho must be non-negative (tolerances positive)")
    cfg = dict(top_k=top_k, tol=tol, which=which, max_hvp=max_hvp, block_size=block_size, trace=trace,
               trace_method=trace_method, trace_tol=trace_tol, trace_max_hvp=trace_max_hvp, density=density,
               density_steps=density_steps, density_probes=density_probes, rho=rho, variant=variant, m=m,
               backend=backend, seed=common.settings.seed)

    def compute(ck, session, carry):
        return compute_sharpness(session.objective(ck), cfg)

    finish_per_checkpoint(common, per_checkpoint(common, checkpoints, "sharpness", cfg, compute), view)


def register(app: typer.Typer) -> None:
    app.command("sharpness")(analysis_options(sharpness))
