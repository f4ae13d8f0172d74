"""``distance``: how far each checkpoint of a run is from a reference, and the escape rate."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .base import RUNS, Analysis, Option

if TYPE_CHECKING:
    from ..pipeline.protocol import AnalysisSession

BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")

ANALYSIS = Analysis(
    name="distance", version=2, order=50, target=RUNS, gradients=False,
    summary="Distance ||w_t - w_ref|| (global, per tensor, relative), escape rate with exponential vs power-law "
            "fits, same-step distance to another run, share of the displacement in the reference's top-k "
            "eigenspace.",
    definitions=(
        ("distance", "||w_t - w_ref|| over the model's parameters (BatchNorm statistics excluded)"),
        ("relative", "distance / ||w_ref||"),
        ("escape rate", "least-squares slope of log distance per step over the first --escape-window "
                        "checkpoints after the reference (> 0: moving away)"),
        ("escape fit", "over the same points: log d = a + r tau (exponential) and log d = a + p log tau (power "
                       "law), tau = steps since the reference, each with R^2 and RMS; 'better' = larger R^2"),
        ("same step", "--same-step RUN: ||w_t - w'_t|| to RUN's checkpoint of the same step (e.g. the SGD "
                      "continuation from the same reference)"),
        ("top-k share", "--eigen-k K: ||V_k'(w_t - w_ref)||^2 / ||w_t - w_ref||^2 with V_k the certified top-K "
                        "Hessian eigenvectors at the reference; chance K/P"),
    ),
    json="{distance, relative, per_tensor, escape_rate, escape_fit{exponential, power, better}, same_step, "
         "top_k_share, steps} ({runs: [...]} for several runs)",
    options=(
        Option("ref", None, ("--ref",), "Reference: a STEP of the run or a checkpoint PATH (default: the first "
               "checkpoint).", annotation=str),
        Option("escape_window", 5, ("--escape-window",), "Checkpoints after the reference used for the escape rate.",
               hidden_flags=("--k",)),
        Option("same_step", None, ("--same-step",), "Another run: distance to its checkpoint of the same step.",
               annotation=str),
        Option("eigen_k", None, ("--eigen-k",), "Share of each displacement in the top-K Hessian eigenspace of the "
               "reference (needs the model and data).", annotation=int),
        Option("eigen_tol", 1e-3, ("--eigen-tol",), "Residual tolerance of --eigen-k's eigenvectors."),
    ),
    schema={
        "run": "run directory", "paths": "checkpoint files", "steps": "steps", "distance": "||w_t - w_ref||",
        "relative": "distance / ||w_ref||", "per_tensor": "distance per parameter tensor",
        "escape_rate": "slope of log distance per step", "escape_steps": "steps used for the escape rate",
        "escape_by": "step (the rate is per step) or index (per checkpoint, where steps are unknown)",
        "ref_step": "the reference's step", "ref_norm": "||w_ref||", "n_params": "parameters compared",
        "escape_fit": "{n, exponential{rate, r2, rms}, power{exponent, r2, rms}, better}",
        "same_step": "{run, steps, distance} to --same-step RUN (null without it)",
        "top_k_share": "{k, share, chance, eigenvalues, residuals} (null without --eigen-k)",
    },
)


def parse_ref(ref: str | None) -> tuple[str, Any]:
    """``--ref``: None (first checkpoint), a step number, or a checkpoint path."""
    from ..errors import SpecError

    if ref is None:
        return "index", 0
    try:
        return "step", int(ref)
    except ValueError:
        path = Path(ref)
        if not path.exists():
            raise SpecError(f"--ref {ref}: neither a step nor an existing checkpoint file") from None
        return "path", path


def configure(opts: dict[str, Any], settings: Any) -> dict[str, Any]:
    from ..loading.checkpoints import file_sha256

    from ..errors import SpecError

    kind, value = parse_ref(opts["ref"])
    cfg = {"ref": opts["ref"], "k": opts["escape_window"], "ref_sha": file_sha256(value) if kind == "path" else None}
    if opts.get("same_step"):
        if not Path(opts["same_step"]).exists():
            raise SpecError(f"--same-step {opts['same_step']}: no such run directory or checkpoint")
        from ..loading.runs import discover

        cfg["same_step"] = str(opts["same_step"])
        cfg["same_step_shas"] = [file_sha256(f) for f in discover(opts["same_step"], settings.glob) if f.is_file()]
    if opts.get("eigen_k") is not None:
        if opts["eigen_k"] < 1:
            raise SpecError("--eigen-k must be >= 1")
        cfg.update(eigen_k=int(opts["eigen_k"]), eigen_tol=float(opts["eigen_tol"]), seed=settings.seed)
        if getattr(settings, "dtype", None) in ("bfloat16", "float16"):  # what half-precision products certify
            from ..core.precision import check_tol

            check_tol(cfg["eigen_tol"], settings.dtype, option="eigen_tol")
    return cfg


def parameters_of(session: AnalysisSession, ck) -> dict[str, Any]:
    """The model's parameters in ``ck`` (matched against the model when one is known; otherwise
    every floating tensor except BatchNorm statistics)."""
    import torch

    from ..errors import SpecError

    try:
        return session.matched(ck, session.build_model(ck)).params
    except SpecError:
        return {n: t for n, t in ck.state.items()
                if torch.is_floating_point(t) and not n.endswith(BUFFER_SUFFIXES)}


def compute(cks, session: AnalysisSession, cfg: dict[str, Any]) -> dict[str, Any]:
    from ..core.paths import distance as core_distance
    from ..errors import SpecError

    kind, value = parse_ref(cfg["ref"])
    states = [parameters_of(session, c) for c in cks]
    steps = [c.step for c in cks]
    ref_step = None
    if kind == "step":
        if value not in steps:
            raise SpecError(f"--ref {value}: not a step of this run (steps: {steps})")
        target: Any = steps.index(value)
    elif kind == "path":
        ck = session.load(value)
        target, ref_step = parameters_of(session, ck), ck.step
    else:
        target = 0
    try:
        res = core_distance(states, target, steps=steps, ref_step=ref_step, k=cfg["k"])
    except KeyError as exc:
        raise SpecError(f"--ref: the checkpoints do not hold the reference's tensors ({exc})") from None
    out = res.to_dict()
    if out.get("ref_step") is not None and float(out["ref_step"]).is_integer():
        out["ref_step"] = int(out["ref_step"])
    out["n_params"] = sum(int(t.numel()) for t in states[0].values())
    out["same_step"] = same_step_of(session, cfg, states, steps) if cfg.get("same_step") else None
    out["top_k_share"] = None
    if cfg.get("eigen_k"):
        ref_ck = session.load(value) if kind == "path" else cks[target if isinstance(target, int) else 0]
        ref_state = target if isinstance(target, dict) else states[target]
        out["top_k_share"] = top_k_share(session, ref_ck, ref_state, states, cfg)
    return {"run": str(Path(cks[0].path).parent), "paths": [str(c.path) for c in cks], **out}


def same_step_of(session, cfg: dict[str, Any], states, steps) -> dict[str, Any]:
    """``||w_t - w'_t||`` to the checkpoints of ``--same-step RUN`` at the same steps."""
    from ..core.paths import same_step_distance
    from ..errors import SpecError

    other = Path(cfg["same_step"])
    files, _failed = session.ordered(other)
    cks = [session.load(f) for f, _ in files]
    if not cks:
        raise SpecError(f"--same-step {other}: no readable checkpoints")
    try:
        d = same_step_distance(states, steps, [parameters_of(session, c) for c in cks], [c.step for c in cks])
    except KeyError as exc:
        raise SpecError(f"--same-step {other}: {exc.args[0]}") from None
    return {"run": str(other), "steps": [int(s) if float(s).is_integer() else s for s in d["steps"]],
            "distance": d["distance"]}


def top_k_share(session, ref_ck, ref_state, states, cfg: dict[str, Any]) -> dict[str, Any]:
    """Certified top-K Hessian eigenvectors at the reference, and each displacement's share in them."""
    import torch

    from ..core.lanczos import top_eigen
    from ..core.paths import subspace_share
    from ..errors import SpecError

    obj = session.objective(ref_ck)
    k = cfg["eigen_k"]
    if k >= obj.n_params:
        raise SpecError(f"--eigen-k {k} must be below the parameter count {obj.n_params}")
    eig = top_eigen(obj, k, tol=cfg["eigen_tol"], seed=cfg["seed"])
    names = obj.space.names
    missing = [n for n in names if n not in ref_state]
    if missing:
        raise SpecError(f"--eigen-k: the checkpoints lack the model's parameters {missing[:3]}")
    w0 = obj.space.flatten({n: ref_state[n].to(obj.device, torch.float64) for n in names})
    V = eig.eigenvectors.to(torch.float64)
    V, _ = torch.linalg.qr(V)
    disp = [obj.space.flatten({n: s[n].to(obj.device, torch.float64) for n in names}) - w0 for s in states]
    out = {"k": k, "share": subspace_share(V, disp), "chance": k / obj.n_params,
           "eigenvalues": list(eig.eigenvalues), "residuals": list(eig.residuals), "ref_step": ref_ck.step}
    if not eig.all_converged:
        out["warning"] = f"eigenpairs not converged to --eigen-tol {cfg['eigen_tol']:g}: the subspace is approximate"
    return out
