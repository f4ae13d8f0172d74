"""``sharpness``: certified top-k eigenvalues, trace, spectral density and SAM sharpness per checkpoint."""
from __future__ import annotations

from typing import Any

from ..core.names import TRACE_METHODS, WHICH
from .base import CHECKPOINTS, Analysis, Option, check_options, perturbation_options

ANALYSIS = Analysis(
    name="sharpness", version=1, order=10, target=CHECKPOINTS,
    summary="Hessian top-k eigenvalues (certified by residuals), trace, spectral density and SAM sharpness.",
    definitions=(
        ("lambda_i", "i-th eigenvalue of the Hessian of the mean loss at the wanted end (--which)"),
        ("resid", "relative residual ||H v - lambda v|| / |lambda| of each eigenpair, computed from the stored HVPs"),
        ("trace", "Hutch++/Hutchinson estimate of tr(H) with its standard error (± SE)"),
        ("density", "stochastic Lanczos quadrature estimate of the eigenvalue density, Gaussian-smoothed"),
        ("SAM sharpness", "L(w + e) - L(w) with e the one-step SAM perturbation of radius rho"),
    ),
    json="results[{path, step, loss, accuracy, eigenvalues, residuals, n_hvp, trace, trace_se, sam_sharpness, seconds}]",
    options=(
        Option("top_k", 5, ("--top-k", "-k"), "Number of eigenvalues (0: none)."),
        Option("tol", 1e-3, ("--tol",), "Relative residual ||Hv - lambda v|| / |lambda| every pair must reach."),
        Option("which", "LA", ("--which",), "LA: largest algebraic, SA: smallest algebraic, LM: largest magnitude.",
               choices=WHICH),
        Option("max_hvp", None, ("--max-hvp",), "HVP budget for the eigenvalues (default: ample).", annotation=int),
        Option("block_size", 1, ("--block-size",), "Lanczos block size (vmapped HVPs)."),
        Option("trace", False, ("--trace",), "Estimate the Hessian trace."),
        Option("trace_method", "hutch++", ("--trace-method",), "hutch++ or hutchinson.",
               choices=TRACE_METHODS),
        Option("trace_tol", 1e-2, ("--trace-tol",), "Stop when the relative standard error is below this."),
        Option("trace_max_hvp", 1000, ("--trace-max-hvp",), "HVP budget for the trace."),
        Option("density", False, ("--density",), "Spectral density by stochastic Lanczos quadrature."),
        Option("density_steps", 80, ("--density-steps",), "Lanczos steps per SLQ probe."),
        Option("density_probes", 5, ("--density-probes",), "SLQ probes."),
        *perturbation_options(rho_help="SAM radius for L(w+e) - L(w) (0: skip)."),
        Option("backend", "lanczos", ("--backend",), "lanczos (sam-probe) or pyhessian (for comparison).",
               choices=("lanczos", "pyhessian")),
    ),
    schema={
        "path": "checkpoint file", "step": "training step", "source": "format, layout, prefix and step source",
        "loss": "mean loss over the selection", "accuracy": "fraction correct (classification)",
        "n_params": "parameters P", "eigenvalues": "top-k eigenvalues, descending",
        "residuals": "relative residual of each eigenpair", "converged": "residual <= --tol, per pair",
        "n_hvp": "HVPs of the eigen solve", "which": "LA, SA or LM",
        "trace": "trace estimate (null without --trace)", "trace_se": "its standard error",
        "sam_sharpness": "L(w+e) - L(w) (null with --rho 0)", "rho": "SAM radius", "variant": "perturbation",
        "total_hvp": "every HVP of the unit", "warnings": "why a number is not certified", "seconds": "wall time",
    },
)


def _sorted_desc(values: list[float], residuals: list[float], converged: list[bool]) -> tuple[list, list, list]:
    order = sorted(range(len(values)), key=lambda i: -values[i])
    return [values[i] for i in order], [residuals[i] for i in order], [converged[i] for i in order]


def configure(opts: dict[str, Any], settings: Any) -> dict[str, Any]:
    """Checked config (the stored unit's key, with the seed)."""
    from ..errors import SpecError

    opts = dict(opts)
    opts["which"] = str(opts["which"]).upper()
    check_options(ANALYSIS, opts)
    if opts["backend"] == "pyhessian" and opts["density"]:
        raise SpecError("--density with --backend pyhessian: PyHessian's density needs torch.eig, removed from "
                        "modern torch; use the default backend")
    if opts["top_k"] < 0 or opts["tol"] <= 0 or opts["trace_tol"] <= 0 or opts["rho"] < 0:
        raise SpecError("--top-k, --tol, --trace-tol and --rho must be non-negative (tolerances positive)")
    if opts["m"] is not None and opts["m"] < 1:
        raise SpecError("--m-sharpness must be >= 1")
    return {**opts, "seed": settings.seed}


def compute(ck, session, cfg: dict[str, Any], carry: dict[str, Any]) -> dict[str, Any]:
    return compute_sharpness(session.objective(ck), cfg)


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
    out["accuracy"] = acc
    out["n_params"] = obj.n_params
    out.update(trace=None, trace_se=None, sam_sharpness=None)
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
        out["sam_sharpness"] = sam_sharpness(obj, rho=cfg["rho"], variant=cfg["variant"], m=cfg["m"], eta=cfg["eta"])
        out.update(rho=cfg["rho"], variant=cfg["variant"])
        if cfg["m"]:
            out["m"] = cfg["m"]
    out["total_hvp"] = obj.n_hvp
    if warnings:
        out["warnings"] = warnings
    return out
