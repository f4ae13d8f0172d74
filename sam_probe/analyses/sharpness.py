"""``sharpness``: certified top-k eigenvalues, trace, spectral density and SAM sharpness per checkpoint."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..core.names import GROUPINGS, TRACE_METHODS, WHICH
from ..core.registry import CURVATURE_REGISTRY
from .base import (CHECKPOINTS, Analysis, Option, basis_where, check_options, curvature_options,
                   perturbation_options, solver_config, solver_options, warm_start_option, warm_started)

if TYPE_CHECKING:
    from ..pipeline.protocol import AnalysisSession

ANALYSIS = Analysis(
    name="sharpness", version=4, order=10, target=CHECKPOINTS, shardable=True,
    summary="Top-k eigenvalues of the Hessian (or GGN, Fisher, empirical Fisher) certified by residuals, trace, "
            "spectral density, per-layer spectra, and one-step, worst-case and average-case sharpness.",
    definitions=(
        ("lambda_i", "i-th eigenvalue of the curvature (--curvature) of the mean loss at the wanted end (--which)"),
        ("resid", "relative residual ||A v - lambda v|| / |lambda| of each eigenpair, computed from the stored products"),
        ("trace", "Hutch++/Hutchinson estimate of tr(A) with its standard error (± SE)"),
        ("density", "stochastic Lanczos quadrature estimate of the eigenvalue density, Gaussian-smoothed"),
        ("ggn / fisher / ef", "J'H_l J; its MC estimate with labels drawn from the model (expectation = GGN for "
                              "CE); (1/N) sum_i g_i g_i'"),
        ("per layer", "top eigenvalue and trace of each diagonal block (parameter tensor or module)"),
        ("SAM sharpness", "L(w + e) - L(w) with e the one-step SAM perturbation of radius rho"),
        ("worst case", "max over ||e|| <= rho of L(w + e) - L(w) reached by projected ascent (a lower bound)"),
        ("average case", "mean of L(w + d) - L(w) over Gaussian d of the same radius, with SE"),
        ("eta*lambda_max", "step size (--lr, else the checkpoint's optimizer state or hyper-parameters) times the top "
                           "Hessian eigenvalue; gradient descent's edge of stability is 2"),
        ("SAM edge", "for SAM-trained checkpoints: eta*lambda(1 + rho*lambda/||g||) against 2, i.e. lambda against "
                     "||g||/(2 rho)(sqrt(1 + 8 rho/(eta ||g||)) - 1) (Long & Bartlett 2024)"),
    ),
    json="results[{path, step, loss, accuracy, curvature, eigenvalues, residuals, n_hvp, trace, trace_se, "
         "per_layer, sam_sharpness, worst_case_sharpness, worst_case_steps, average_case_sharpness, "
         "average_case_se, eta, eta_source, eta_lambda_max, lambda_edge, sam_edge, seconds}]",
    unkeyed=("warm_start", "basis_device", "basis_dir"),
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
        *curvature_options(),
        Option("per_layer", None, ("--per-layer",), "Per-layer spectra: top eigenvalue and trace of every "
               "parameter tensor's block (--per-layer module: every module's).", annotation=str,
               choices=GROUPINGS, flag_value="tensor"),
        warm_start_option(),
        *solver_options(),
        Option("order_check", True, ("--order-check/--no-order-check",), "Bound any eigenvalue beyond the "
               "k-th that the solve missed (docs/metrics.md); off: residuals only, 30-40 % fewer HVPs."),
        Option("cold_check", False, ("--cold-check",), "Also solve each warm-started checkpoint from a cold "
               "start and report the HVPs the warm start saved (costs a second solve)."),
        *perturbation_options(rho_help="SAM radius for L(w+e) - L(w) (0: skip)."),
        Option("worst_case", False, ("--worst-case",), "Worst-case sharpness over the rho-ball by projected "
               "gradient ascent (Auto-PGD) from the one-step SAM point (--variant l2 or linf)."),
        Option("ascent_steps", 20, ("--ascent-steps",), "Ascent steps of --worst-case."),
        Option("adaptive", False, ("--adaptive",), "Worst/average case in the adaptive ball e = T d, "
               "T = |w| + eta, ||d|| <= rho."),
        Option("average_case", False, ("--average-case",), "Average-case sharpness over Gaussian perturbations "
               "of radius rho."),
        Option("samples", 20, ("--samples",), "Perturbations of --average-case."),
        Option("backend", "lanczos", ("--backend",), "lanczos (sam-probe) or pyhessian (for comparison).",
               choices=("lanczos", "pyhessian")),
        Option("lr", None, ("--lr",), "Step size for the edge of stability (default: the checkpoint's optimizer "
               "state, else its hyper-parameters).", annotation=float),
    ),
    schema={
        "path": "checkpoint file", "step": "training step", "source": "format, layout, prefix and step source",
        "loss": "mean loss over the selection", "accuracy": "fraction correct (classification)",
        "n_params": "parameters P", "curvature": CURVATURE_REGISTRY.choices_text(),
        "eigenvalues": "k eigenvalues from the wanted end (--which): LA descending, SA ascending, LM by |lambda| "
                       "descending",
        "order_checked": "the order check from a fresh random vector bounds every eigenvalue beyond the k-th within "
                         "tol of lambda_k, with probability order_confidence",
        "order_confidence": "1 - delta of the order check's bound (0.999)",
        "guard_bound": "U: the level the order check bounds lambda_(k+1) by (with probability order_confidence)",
        "gap": "relative gap |lambda_k - lambda_(k+1)| / |lambda_k| from the order check",
        "gap_warning": "lambda_k and lambda_(k+1) too close for the residuals to determine the top-k eigenspace",
        "solver": "the eigen solve's memory plan: basis rows, stored products, where the basis lives, peak vectors",
        "residuals": "relative residual of each eigenpair", "converged": "residual <= --tol, per pair",
        "n_hvp": "HVPs of the eigen solve", "which": "LA, SA or LM",
        "trace": "trace estimate (null without --trace)", "trace_se": "its standard error",
        "per_layer": "[{name, top_eigenvalue, residual, trace, trace_se, n_params}] (null without --per-layer)",
        "warm_start": "the eigen solve started from the previous checkpoint's Ritz vectors",
        "n_hvp_saved": "HVPs the warm start saved against a cold solve (with --cold-check)",
        "sam_sharpness": "L(w+e) - L(w) (null with --rho 0)", "rho": "SAM radius", "variant": "perturbation",
        "worst_case_sharpness": "max L(w+e) - L(w) reached over the ball (null without --worst-case)",
        "worst_case_steps": "ascent steps used", "worst_case_last_improvement": "step of the last improvement",
        "average_case_sharpness": "mean L(w+d) - L(w) (null without --average-case)",
        "average_case_se": "its standard error",
        "eigenvalue_se": "fisher: sampling standard error of each eigenvalue against the exact Fisher",
        "precision": "--dtype bfloat16/float16: model and solver dtypes, unit roundoff u, per-product accuracy "
                     "c*u (included in residuals) and the smallest --tol it certifies (docs/metrics.md)",
        "product_residuals": "inexact products (fisher, --hvp fd): their error / |lambda|, included in residuals",
        "trace_sampling_se": "fisher: the trace's sampling error, included in trace_se",
        "total_hvp": "every HVP of the unit", "warnings": "why a number is not certified", "seconds": "wall time",
        "eta": "step size of the edge of stability (null when unknown)", "eta_source": "--lr, optimizer state or "
        "hyper-parameters", "eta_lambda_max": "eta * lambda_max (edge of stability at 2)", "lambda_edge": "2 / eta",
        "sam_edge": "{variant, rho, grad_norm, lambda_edge, eta_lambda_eff} for SAM-trained checkpoints",
        "warm_start_from": "the step whose Ritz vectors started the solve",
        "trace_method": "hutch++ or hutchinson", "trace_probes": "random probes of the trace",
        "trace_n_hvp": "HVPs of the trace", "trace_converged": "the trace's relative SE reached --trace-tol",
        "density": "{grid, density, sigma, n_hvp, steps, mean, n_probes}: SLQ spectral density (null without "
                   "--density)",
        "per_layer_by": "tensor or module: the blocks of per_layer",
        "m": "--m-sharpness sub-batch size of sam_sharpness", "n_hvp_cold": "HVPs of the cold solve (--cold-check)",
        "total_products": "every product with --curvature's operator (other than the Hessian) of the unit",
        "worst_case_start": "L(w+e) - L(w) at the one-step SAM start of the ascent",
        "worst_case_rho": "radius of the worst-case ball", "worst_case_variant": "its norm (l2 or linf)",
        "worst_case_m": "m-sharpness sub-batch size of the ascent (null: the whole selection)",
        "worst_case_n_grad": "gradients of the ascent", "worst_case_delta_norm": "norm of the worst perturbation found",
        "average_case_samples": "Gaussian perturbations drawn", "average_case_rho": "their radius",
        "adaptive": "worst/average case in the adaptive ball e = T d, T = |w| + eta", "adaptive_eta": "its eta",
    },
)


def _order(values: list[float], which: str = "LA") -> list[int]:
    """Indices from the wanted end (``which``): LA descending, SA ascending, LM by |λ| descending."""
    key = {"LA": lambda i: -values[i], "SA": lambda i: values[i], "LM": lambda i: -abs(values[i])}[which]
    return sorted(range(len(values)), key=key)


def _sorted_desc(values: list[float], residuals: list[float], converged: list[bool],
                 which: str = "LA") -> tuple[list, list, list]:
    """Pairs from the wanted end (``which``), see :func:`_order`."""
    order = _order(values, which)
    return [values[i] for i in order], [residuals[i] for i in order], [converged[i] for i in order]


def configure(opts: dict[str, Any], settings: Any) -> dict[str, Any]:
    """Checked config (the stored unit's key, with the seed)."""
    from ..errors import SpecError

    opts = dict(opts)
    opts["which"] = str(opts["which"]).upper()
    check_options(ANALYSIS, opts)
    if getattr(settings, "shard_model", False):
        parts = ["--backend pyhessian"] if opts["backend"] == "pyhessian" else []
        if opts["curvature"] != "hessian":
            parts.insert(0, f"--curvature {opts['curvature']} (a sharded model gives Hessian products only)")
        if parts:
            raise SpecError(f"--shard-model computes every Hessian quantity of sharpness with sam-probe's own "
                            f"solvers: drop {', '.join(parts)}")
    if opts["backend"] == "pyhessian" and opts["density"]:
        raise SpecError("--density with --backend pyhessian: PyHessian's density needs torch.eig, removed from "
                        "modern torch; use the default backend")
    if opts.get("lr") is not None and opts["lr"] <= 0:
        raise SpecError(f"--lr {opts['lr']}: a step size > 0")
    if opts["top_k"] < 0 or opts["tol"] <= 0 or opts["trace_tol"] <= 0 or opts["rho"] < 0:
        raise SpecError("--top-k, --tol, --trace-tol and --rho must be non-negative (tolerances positive)")
    if opts["m"] is not None and opts["m"] < 1:
        raise SpecError("--m-sharpness must be >= 1")
    if opts["backend"] == "pyhessian" and (opts["curvature"] != "hessian" or opts["per_layer"]):
        raise SpecError("--backend pyhessian computes Hessian eigenvalues only: drop --curvature / --per-layer")
    if (opts["mc_samples"] is not None and opts["mc_samples"] < 1) or opts["ascent_steps"] < 1 or opts["samples"] < 2:
        raise SpecError("--mc-samples and --ascent-steps must be >= 1, --samples >= 2")
    if (opts["worst_case"] or opts["average_case"]) and opts["rho"] <= 0:
        raise SpecError("--worst-case / --average-case need a radius: --rho > 0")
    if opts["worst_case"] and opts["variant"] not in ("l2", "linf"):
        raise SpecError(f"--worst-case with --variant {opts['variant']}: the ball is l2 or linf (add --adaptive "
                        "for the |w| + eta scaling)")
    if opts.get("order_check", True):  # the default stays out of the config: units stored before the option keep their key
        opts.pop("order_check", None)
    else:
        opts["order_check"] = False
    return {**opts, "seed": settings.seed, **solver_config(opts, settings)}


def compute(ck, session: AnalysisSession, cfg: dict[str, Any], carry: dict[str, Any]) -> dict[str, Any]:
    from ._trainer import eos_fields

    out = warm_started(ck, cfg, carry, lambda warm: compute_sharpness(session.objective(ck), cfg, warm, carry))
    out.update(eos_fields(ck, session, cfg.get("lr"), out))
    return out


def compute_sharpness(obj, cfg: dict[str, Any], warm=None, carry: dict[str, Any] | None = None) -> dict[str, Any]:
    """All curvature numbers of one objective (pure: no files, no terminal).

    ``warm``: the previous checkpoint's Ritz vectors (a warm start); the new ones are left in
    ``carry["warm"]`` for the next checkpoint.  A model-sharded objective (``--shard-model``) is
    computed with every inner product summed over its ranks (:mod:`sam_probe.core.inner`)."""
    from ..core import inner

    with inner.over(obj):
        return _compute_sharpness(obj, cfg, warm, carry)


def _compute_sharpness(obj, cfg: dict[str, Any], warm=None, carry: dict[str, Any] | None = None) -> dict[str, Any]:
    from ..core.density import curvature_density
    from ..core.lanczos import top_eigen
    from ..core.operators import curvature_operator
    from ..core.perturb import sam_sharpness
    from ..core.product_errors import eigen_errors, trace_errors
    from ..core.trace import curvature_trace

    out: dict[str, Any] = {}
    warnings: list[str] = []
    loss, acc = obj.evaluate()
    out["loss"] = loss
    out["accuracy"] = acc
    out["n_params"] = obj.n_params
    from ..core import precision

    if precision.is_half(obj.dtype):  # the model in half precision, the solvers in float32
        out["precision"] = precision.info(obj.dtype)
    out.update(trace=None, trace_se=None, sam_sharpness=None, curvature=cfg["curvature"], per_layer=None,
               worst_case_sharpness=None, worst_case_steps=None, average_case_sharpness=None, average_case_se=None)
    op = curvature_operator(obj, cfg["curvature"], mc_samples=cfg["mc_samples"], seed=cfg["seed"], tol=cfg["tol"])
    warnings += [w for w in (getattr(op, "warning", None),) if w]
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
        res = top_eigen(op, cfg["top_k"], which=cfg["which"], tol=cfg["tol"], max_hvp=cfg["max_hvp"],
                        block_size=cfg["block_size"], seed=cfg["seed"], warm=warm, where=basis_where(cfg),
                        check=cfg.get("order_check", True))
        inexact = eigen_errors(op, list(res.eigenvalues), res.eigenvectors, list(res.residuals), cfg["tol"])
        order = _order(list(res.eigenvalues), cfg["which"])
        vals, resid, conv = _sorted_desc(list(res.eigenvalues), inexact.pop("residuals", list(res.residuals)),
                                         inexact.pop("converged", list(res.converged)), cfg["which"])
        for key in ("product_residuals", "eigenvalue_se"):  # an inexact operator's own error (core/product_errors.py)
            if key in inexact:
                out[key] = [inexact[key][i] for i in order]
        warnings += inexact.pop("warnings", [])
        out.update(eigenvalues=vals, residuals=resid, converged=conv, n_hvp=res.n_hvp, which=cfg["which"],
                   warm_start=res.warm_start, order_checked=res.order_checked,
                   order_confidence=res.order_confidence, guard_bound=res.guard_bound, gap=res.gap,
                   gap_warning=res.gap_warning, solver=dict(res.plan))
        if res.warm_start and cfg["cold_check"]:
            cold = top_eigen(op, cfg["top_k"], which=cfg["which"], tol=cfg["tol"], max_hvp=cfg["max_hvp"],
                             block_size=cfg["block_size"], seed=cfg["seed"], where=basis_where(cfg),
                             check=cfg.get("order_check", True))
            out.update(n_hvp_cold=cold.n_hvp, n_hvp_saved=cold.n_hvp - res.n_hvp)
        if carry is not None:
            carry["warm"] = res.eigenvectors
        warnings += list(res.warnings)
        if not all(res.converged):  # the solver's own (an inexact operator's error warns above)
            bad = [i + 1 for i, c in enumerate(_sorted_desc(list(res.eigenvalues), list(res.residuals),
                                                            list(res.converged), cfg["which"])[2]) if not c]
            msg = f"eigenpairs {bad} not converged to --tol {cfg['tol']:g} (residuals reported; raise --max-hvp)"
            if msg not in warnings:
                warnings.append(msg)
    if cfg["trace"] and cfg["backend"] != "pyhessian":
        tr = curvature_trace(op, cfg["trace_method"], tol=cfg["trace_tol"], max_hvp=cfg["trace_max_hvp"],
                             seed=cfg["seed"], **({"where": basis_where(cfg)} if cfg["trace_method"] == "hutch++"
                                                  else {}))
        out.update(trace=tr.estimate, trace_se=tr.se, trace_probes=tr.n_probes, trace_n_hvp=tr.n_hvp,
                   trace_method=tr.method, trace_converged=tr.converged)
        warnings += list(tr.warnings)
        sampled = trace_errors(op, tr.estimate, tr.se, cfg["trace_tol"])
        warnings += sampled.pop("warnings", [])
        out.update(sampled)
    if cfg["density"]:
        dens = curvature_density(op, steps=cfg["density_steps"], n_probes=cfg["density_probes"], seed=cfg["seed"])
        out["density"] = {"grid": dens.grid.tolist(), "density": dens.density.tolist(), "sigma": dens.sigma,
                          "n_hvp": dens.n_hvp, "steps": dens.steps, "mean": dens.mean,
                          "n_probes": len(dens.nodes)}
    if cfg["per_layer"]:
        from ..core.per_layer import per_layer_spectra

        rows = per_layer_spectra(op, by=cfg["per_layer"], tol=cfg["tol"], trace_tol=cfg["trace_tol"],
                                 trace_max_hvp=min(cfg["trace_max_hvp"], 300), trace_method=cfg["trace_method"],
                                 seed=cfg["seed"], where=basis_where(cfg))
        out["per_layer"] = [r.to_dict() for r in rows]
        out["per_layer_by"] = cfg["per_layer"]
        bad = [r.name for r in rows if not getattr(r, "converged", True)]
        if bad:
            warnings.append(f"per-layer top eigenvalue not converged to --tol {cfg['tol']:g} for {', '.join(bad[:5])}"
                            + (f" and {len(bad) - 5} more" if len(bad) > 5 else ""))
    if cfg["worst_case"]:
        from ..core.sharpness_measures import worst_case_sharpness

        wc = worst_case_sharpness(obj, cfg["rho"], variant=cfg["variant"], adaptive=cfg["adaptive"], eta=cfg["eta"],
                                  m=cfg["m"], steps=cfg["ascent_steps"], seed=cfg["seed"])
        out.update(wc.to_dict())
    if cfg["average_case"]:
        from ..core.sharpness_measures import average_case_sharpness

        out.update(average_case_sharpness(obj, cfg["rho"], samples=cfg["samples"], adaptive=cfg["adaptive"],
                                          eta=cfg["eta"], seed=cfg["seed"]).to_dict())
    if cfg["rho"] > 0:
        out["sam_sharpness"] = sam_sharpness(obj, rho=cfg["rho"], variant=cfg["variant"], m=cfg["m"], eta=cfg["eta"])
        out.update(rho=cfg["rho"], variant=cfg["variant"])
        if cfg["m"]:
            out["m"] = cfg["m"]
    out["total_hvp"] = obj.n_hvp  # Hessian-vector products of the unit
    if cfg["curvature"] != "hessian":
        out["total_products"] = op.n_matvec  # products with the chosen curvature
    if warnings:
        out["warnings"] = warnings
    return out
