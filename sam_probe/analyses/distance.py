"""``distance``: how far each checkpoint of a run is from a reference, and the escape rate."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .base import RUNS, Analysis, Option

if TYPE_CHECKING:
    from ..pipeline.protocol import AnalysisSession

BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")

ANALYSIS = Analysis(
    name="distance", version=3, order=50, target=RUNS, shardable=True, streamed=True,
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


def full(session: AnalysisSession, light) -> Any:
    """Checkpoint ``light`` (given without its tensors: the analysis is ``streamed``) read with them."""
    ck = session.load(light.path)
    ck.step = light.step
    return ck


def compute(cks, session: AnalysisSession, cfg: dict[str, Any]) -> dict[str, Any]:
    """Streamed: the reference is read first and kept (as float64 tensors; a shard of them under
    ``--shard-model``), then every checkpoint is read, measured (and projected for ``--eigen-k``) and
    dropped in turn; ``--same-step`` pairs are read two at a time after the reference is gone.  At most
    the reference and one other checkpoint are held at once."""
    import contextlib

    from ..core import inner
    from ..core.paths import distance_streamed
    from ..errors import SpecError

    kind, value = parse_ref(cfg["ref"])
    steps = [c.step for c in cks]
    ref_step = None
    if kind == "step":
        if value not in steps:
            raise SpecError(f"--ref {value}: not a step of this run (steps: {steps})")
        ref_ck = full(session, cks[steps.index(value)])
        ref_x: Any = float(value)
    elif kind == "path":
        ref_ck = session.load(value)
        ref_step = ref_ck.step
        ref_x = None if ref_step is None else float(ref_step)
    else:
        ref_ck = full(session, cks[0])
        ref_x = float(steps[0])
    sharded = bool(getattr(session.settings, "shard_model", False))
    ref_state = parameters_of(session, ref_ck)
    n_params = sum(int(t.numel()) for t in ref_state.values())
    share = None
    if cfg.get("eigen_k"):
        share = TopKShare(session, ref_ck, ref_state, cfg, sharded)
    del ref_ck

    def states():  # one checkpoint read at a time, dropped when the next is asked for
        for c in cks:
            yield parameters_of(session, full(session, c))

    with inner.sharded() if sharded else contextlib.nullcontext():
        try:
            res = distance_streamed(states(), ref_state, [float(s) for s in steps], ref_x, k=cfg["k"],
                                    each=share.add if share is not None else None)
        except KeyError as exc:
            raise SpecError(f"--ref: the checkpoints do not hold the reference's tensors ({exc})") from None
        del ref_state
        out = res.to_dict()
        if out.get("ref_step") is not None and float(out["ref_step"]).is_integer():
            out["ref_step"] = int(out["ref_step"])
        out["n_params"] = n_params
        out["top_k_share"] = share.result() if share is not None else None
        del share
        out["same_step"] = same_step_of(session, cfg, cks, steps) if cfg.get("same_step") else None
    return {"run": str(Path(cks[0].path).parent), "paths": [str(c.path) for c in cks], **out}


def same_step_of(session, cfg: dict[str, Any], cks, steps) -> dict[str, Any]:
    """``||w_t - w'_t||`` to the checkpoints of ``--same-step RUN`` at the same steps (two checkpoints held at
    a time: this run's and the other's)."""
    from ..core.paths import pair_distance
    from ..errors import SpecError

    other = Path(cfg["same_step"])
    files, _failed = session.ordered(other)
    kept = getattr(session, "loaded", {})
    for f, _ in files:  # read again below, one at a time (ordering may have kept small runs loaded)
        kept.pop(str(f), None)
    if not files:
        raise SpecError(f"--same-step {other}: no readable checkpoints")
    pos = {float(s): f for f, s in files}
    out_steps, dist = [], []
    for c, s in zip(cks, steps):
        f = pos.get(float(s))
        if f is None:
            continue
        a = parameters_of(session, full(session, c))
        b = parameters_of(session, session.load(f))
        try:
            dist.append(pair_distance(a, b))
        except KeyError as exc:
            raise SpecError(f"--same-step {other}: {exc.args[0]}") from None
        del a, b
        out_steps.append(float(s))
    return {"run": str(other), "steps": [int(s) if float(s).is_integer() else s for s in out_steps],
            "distance": dist}


class TopKShare:
    """Certified top-K Hessian eigenvectors at the reference, and each displacement's share in them,
    one displacement at a time (:meth:`add`).  Under ``--shard-model`` the eigenvectors, the reference
    and each displacement are shards and the shares come from all-reduced products."""

    def __init__(self, session, ref_ck, ref_state, cfg: dict[str, Any], sharded: bool = False):
        from ..core.lanczos import top_eigen
        from ..errors import SpecError

        obj = session.objective(ref_ck)
        k = cfg["eigen_k"]
        if k >= obj.n_params:
            raise SpecError(f"--eigen-k {k} must be below the parameter count {obj.n_params}")
        names = obj.space.names
        missing = [n for n in names if n not in ref_state]
        if missing:
            raise SpecError(f"--eigen-k: the checkpoints lack the model's parameters {missing[:3]}")
        if sharded:
            from ..core.operators import curvature_operator

            eig = top_eigen(curvature_operator(obj, "hessian"), k, tol=cfg["eigen_tol"], seed=cfg["seed"])
        else:
            eig = top_eigen(obj, k, tol=cfg["eigen_tol"], seed=cfg["seed"])
        self.obj, self.k, self.names, self.sharded = obj, k, names, sharded
        self.eig, self.cfg, self.ref_step = eig, cfg, ref_ck.step
        self.V, self.w0 = share_basis(eig.eigenvectors, ref_state, names, obj, sharded)
        self.share: list[float | None] = []

    def add(self, state) -> None:
        self.share.append(displacement_share(self.V, self.w0, state, self.names, self.obj, self.sharded))

    def result(self) -> dict[str, Any]:
        eig = self.eig
        out = {"k": self.k, "share": self.share, "chance": self.k / self.obj.n_params,
               "eigenvalues": list(eig.eigenvalues), "residuals": list(eig.residuals), "ref_step": self.ref_step}
        if not eig.all_converged:
            out["warning"] = (f"eigenpairs not converged to --eigen-tol {self.cfg['eigen_tol']:g}: the subspace is "
                              "approximate")
        return out


def flat_of(state, names, obj, sharded: bool) -> Any:
    """``state``'s tensors ``names`` as one float64 vector in the objective's layout (a shard when sharded)."""
    import torch

    if sharded:
        from ..core.sharded_states import shard_vector

        return shard_vector(state, names, dtype=torch.float64, device=obj.device, world=obj.world, rank=obj.rank)
    return obj.space.flatten({n: state[n].to(obj.device, torch.float64) for n in names})


def share_basis(V, ref_state, names, obj, sharded: bool) -> tuple[Any, Any]:
    """``(basis, w_ref)``: one process, ``V`` orthonormalised by QR; sharded, ``(V, L⁻¹)`` with
    ``VᵀV = L Lᵀ`` (all-reduced), so that ``‖Q ᵀδ‖ = ‖L⁻¹ Vᵀδ‖`` needs no parameter-sized product
    beyond ``Vᵀδ``."""
    import torch

    from ..core import inner

    V = V.to(torch.float64)
    if sharded:
        with inner.over(obj):
            L = torch.linalg.cholesky(inner.gram(V, V))
        basis: Any = (V, torch.linalg.inv(L))
    else:
        basis, _ = torch.linalg.qr(V)
    return basis, flat_of(ref_state, names, obj, sharded)


def displacement_share(basis, w0, state, names, obj, sharded: bool) -> float | None:
    """``‖V_kᵀ δ‖² / ‖δ‖²`` of ``δ = w - w_ref`` (None for ``δ = 0``), for one state."""
    from ..core import inner
    from ..core.paths import subspace_share

    missing = [n for n in names if n not in state]
    if missing:
        from ..errors import SpecError

        raise SpecError(f"--eigen-k: the checkpoints lack the model's parameters {missing[:3]}")
    d = flat_of(state, names, obj, sharded) - w0
    if not sharded:
        return subspace_share(basis, [d])[0]
    V, Linv = basis
    with inner.over(obj):
        n2 = inner.dot(d, d)
        c = Linv @ inner.gram(V, d)
    return None if n2 == 0 else float(c.pow(2).sum()) / n2
