"""``alignment``: gradients against the dominant Hessian eigenspace, one checkpoint at a time."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..core.registry import CURVATURE_REGISTRY
from .base import (CHECKPOINTS, Analysis, Option, basis_where, curvature_options, perturbation_options,
                   solver_config, solver_options, warm_start_option, warm_started)

if TYPE_CHECKING:
    from ..pipeline.protocol import AnalysisSession

VECTORS = ("full", "minibatch", "sam", "update")

ANALYSIS = Analysis(
    name="alignment", version=4, order=40, target=CHECKPOINTS, shardable=True, unkeyed=("warm_start", "basis_device", "basis_dir"),
    summary="chi_k = ||P_k v|| / ||v|| of full, minibatch, SAM and update vectors; one-step loss changes along the "
            "dominant and bulk subspaces with their second-order predictions; eta*_emp and eta*lambda_max.",
    definitions=(
        ("P_k", "projector on the certified top-k eigenvectors V_k of the curvature (--curvature; k: --k, default "
                "the number of classes)"),
        ("chi_k", "||P_k v|| / ||v|| for v = full gradient, seeded minibatch gradient, SAM gradient g~, update "
                  "w_t - w_(t-1); chance level sqrt(k/P)"),
        ("dL dom / bulk / full", "L(w - eta P_k g) - L(w), L(w - eta (I - P_k) g) - L(w), L(w - eta g) - L(w) "
                                 "(eta: --step-size)"),
        ("dL_pred", "second-order prediction -eta g'Pg + eta^2/2 g'PHPg of each"),
        ("eta*_emp", "on the --eta-grid, the smallest eta where chi_k's change after one step changes sign"),
        ("eta*lambda_max", "eta times the top eigenvalue of --curvature's operator (lambda_of); for the Hessian "
                           "the step size in units of the edge of stability (2), for other operators their own scale"),
    ),
    json="results[{path, step, k, eigenvalues, chi, chi_sq, dL{dom, bulk, full}, dL_pred, eta_star, eta_lambda_max}]",
    options=(
        Option("k", None, ("--k",), "Dimension of the dominant subspace (default: number of classes).", annotation=int),
        Option("vectors", "full,minibatch,sam,update", ("--vectors",), "Any of full, minibatch, sam, update."),
        Option("step_size", None, ("--step-size",), "Step size eta of the one-step loss changes (default: the "
               "checkpoint's lr, else 0.1).", annotation=float, hidden_flags=("--eta",)),
        Option("eta_grid", None, ("--eta-grid",), "Comma-separated etas for eta*_emp (default: around "
               "2/lambda_max; empty string skips).", annotation=str),
        Option("minibatch_size", 128, ("--minibatch-size",), "Samples of the seeded minibatch gradient."),
        *(o for o in perturbation_options(rho_help="SAM radius of the perturbed gradient.")
          if o.name in ("rho", "variant")),
        Option("tol", 1e-3, ("--tol",), "Residual tolerance of the eigenvectors."),
        Option("max_hvp", None, ("--max-hvp",), "HVP budget of the eigensolver.", annotation=int),
        *curvature_options(),
        warm_start_option(),
        *solver_options(),
    ),
    schema={
        "path": "checkpoint file", "step": "training step", "source": "format, layout, prefix and step source",
        "k": "subspace dimension", "n_params": "P (chance level of chi_k: sqrt(k/P))", "eigenvalues": "top-k eigenvalues", "residuals": "their relative residuals",
        "chi": "chi_k per vector", "chi_sq": "chi_k squared per vector", "dL": "one-step loss changes dom/bulk/full",
        "dL_pred": "their second-order predictions", "eta": "step size used", "eta_source": "--step-size, optimizer state, hyper-parameters or default 0.1", "eta_star": "eta*_emp",
        "eta_lambda_max": "eta * lambda_max of the --curvature operator",
        "lambda_of": "the operator lambda_max belongs to (Hessian, GGN, ...)",
        "edge_of_stability": "whether eta_lambda_max is the Hessian's (comparable with the edge of stability at 2)", "curvature": f"operator of the eigenvectors ({CURVATURE_REGISTRY.choices_text()})",
        "warm_start": "the eigen solve started from the previous checkpoint's Ritz vectors", "warnings": "why a number is not certified", "seconds": "wall time",
        "warm_start_from": "the step whose Ritz vectors started the solve",
        "converged": "residual <= --tol, per eigenpair", "n_hvp": "HVPs of the eigen solve",
        "loss": "L(w)", "lambda_max": "top eigenvalue of the --curvature operator",
        "eta_lambda_usam": "--variant usam: eta lambda_max (1 + rho lambda_max), USAM's edge at 2",
        "eta_grid": "the etas of eta*_emp", "delta_chi": "chi_k's change after one step at each eta of the grid",
        "rho": "SAM radius of the sam vector", "variant": "its perturbation",
        "batch_size": "samples of the minibatch gradient (null without the minibatch vector)",
        "seed": "seed of the minibatch draw and the eigen solve",
    },
)


def parse_floats(text: str | None, option: str) -> list[float] | None:
    from ..errors import SpecError

    if text is None:
        return None
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SpecError(f"{option} {text}: give numbers separated by commas") from None


def configure(opts: dict[str, Any], settings: Any) -> dict[str, Any]:
    from ..errors import SpecError
    from .base import check_options

    check_options(ANALYSIS, opts)
    chosen = [v.strip() for v in str(opts["vectors"]).split(",") if v.strip()]
    if not chosen or any(v not in VECTORS for v in chosen):
        raise SpecError(f"--vectors {opts['vectors']}: choose from {', '.join(VECTORS)}")
    if opts["k"] is not None and opts["k"] < 1:
        raise SpecError("--k must be >= 1")
    if getattr(settings, "shard_model", False) and opts["curvature"] != "hessian":
        raise SpecError(f"--shard-model with --curvature {opts['curvature']}: a sharded model gives Hessian "
                        "products only; drop --curvature")
    return {"k": opts["k"], "vectors": chosen, "eta": opts["step_size"], "eta_grid": parse_floats(opts["eta_grid"], "--eta-grid"),
            "minibatch_size": opts["minibatch_size"], "rho": opts["rho"], "variant": opts["variant"],
            "tol": opts["tol"], "max_hvp": opts["max_hvp"], "curvature": opts["curvature"],
            "mc_samples": opts["mc_samples"], "warm_start": opts["warm_start"], "seed": settings.seed,
            **solver_config(opts, settings)}


def compute(ck, session: AnalysisSession, cfg: dict[str, Any], carry: dict[str, Any]) -> dict[str, Any]:
    from ..errors import SpecError

    obj = session.objective(ck)
    data = session.data(ck)
    k = cfg["k"] or data.n_classes or 10
    if k >= obj.n_params:
        raise SpecError(f"{ck.path}: --k {k} must be below the parameter count {obj.n_params}")
    from ._trainer import learning_rate

    eta, eta_source = learning_rate(ck, cfg["eta"])  # --eta, the optimizer state, the hyper-parameters, else 0.1
    eta, eta_source = (eta, eta_source) if eta is not None else (0.1, "default 0.1")
    prev = None
    if "update" in cfg["vectors"] and carry.get("prev_path"):
        prev = previous_weights(session, session.load(carry["prev_path"]), obj)
    out = warm_started(ck, cfg, carry, lambda warm: compute_alignment(obj, cfg, k, eta, prev, warm, carry))
    out["eta_source"] = str(eta_source).replace("--lr", "--step-size")
    return out


def previous_weights(session: AnalysisSession, ck, obj) -> Any:
    """The flat weights of checkpoint ``ck`` laid out as ``obj``'s (under ``--shard-model``: this rank's shard,
    :mod:`sam_probe.core.sharded_states`, without building a second sharded model)."""
    if not hasattr(obj, "shard_group"):
        return session.objective(ck).flat_params()
    from ..core.sharded_states import shard_vector

    params = session.matched(ck, session.build_model(ck)).params
    return shard_vector(params, obj.space.names, dtype=obj.dtype, device=obj.device, world=obj.world, rank=obj.rank)


def compute_alignment(obj, cfg: dict[str, Any], k: int, eta: float, prev_params=None, warm=None,
                      carry: dict[str, Any] | None = None) -> dict[str, Any]:
    """Certified top-k eigenvectors of the chosen curvature, then
    :func:`~sam_probe.core.alignment.alignment` (pure; the second-order predictions use the Hessian)."""
    from ..core import inner

    with inner.over(obj):  # --shard-model: eigenvectors and gradients are shards (core/inner.py)
        return _compute_alignment(obj, cfg, k, eta, prev_params, warm, carry)


def _compute_alignment(obj, cfg: dict[str, Any], k: int, eta: float, prev_params=None, warm=None,
                       carry: dict[str, Any] | None = None) -> dict[str, Any]:
    from ..core.alignment import alignment
    from ..core.lanczos import top_eigen
    from ..core.operators import curvature_operator

    op = curvature_operator(obj, cfg.get("curvature", "hessian"), mc_samples=cfg.get("mc_samples"), tol=cfg["tol"],
                            seed=cfg["seed"])
    eig = top_eigen(op, k, tol=cfg["tol"], max_hvp=cfg["max_hvp"], seed=cfg["seed"], warm=warm,
                    where=basis_where(cfg))
    if carry is not None:
        carry["warm"] = eig.eigenvectors
    res = alignment(obj, eig.eigenvectors, eig.eigenvalues, eta=eta, vectors=cfg["vectors"],
                    batch_size=cfg["minibatch_size"], seed=cfg["seed"], rho=cfg["rho"], variant=cfg["variant"],
                    prev_params=prev_params, eta_grid=cfg["eta_grid"], curvature=op.name)
    out = res.to_dict()
    out["warm_start"] = eig.warm_start
    out.update(residuals=list(eig.residuals), converged=list(eig.converged), n_hvp=eig.n_hvp, n_params=obj.n_params)
    if not eig.all_converged:
        bad = [i + 1 for i, c in enumerate(eig.converged) if not c]
        out["warnings"] = [f"eigenpairs {bad} not converged to --tol {cfg['tol']:g}: the subspace (and chi) is "
                           "approximate; raise --max-hvp"] + list(eig.warnings)
    return out
