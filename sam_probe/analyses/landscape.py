"""``landscape``: the loss on a 2-D grid around each checkpoint, ``L(w + a d1 + b d2)`` (Li et al. 2018).

``--directions`` picks ``d1, d2`` (:mod:`sam_probe.core.landscape` defines them exactly):

* ``filter-normalized`` (default): Gaussian directions with each filter -- one output row of a
  weight of two or more dimensions -- rescaled to the norm of the weights' filter; biases and
  BatchNorm/LayerNorm parameters (one-dimensional tensors) are zeroed, as Li et al. do
  (``--bias-bn per-tensor`` normalises them as one filter per tensor instead);
* ``random``: Gaussian directions rescaled as a whole to ``||d|| = ||w||``;
* ``top-eigen``: the top-2 Hessian eigenvectors (unit length) from the certified Lanczos solver,
  as in PyHessian's workflow; ``a`` and ``b`` are then distances in weight space.

The grid is ``--grid`` evenly spaced values of ``--range LO,HI`` on both axes.  Gaussian
directions come from a CPU generator seeded by ``--seed`` (the same landscape on any device);
the eigen solve starts from the same seed.  Every point is evaluated through
``functional_call`` with a perturbed parameter dict: the weights, ``.grad`` and BatchNorm
statistics are never touched (buffers stay those of ``w``).

Memory: the weights, the two directions and one perturbed copy re-filled for every point (four
parameter-sized copies) plus one forward pass of a chunk; ``top-eigen`` runs its eigen solve
first, with the solver's own memory, and keeps only the two vectors.  Cost: ``grid^2`` loss
evaluations over the whole data selection (441 at the default ``--grid 21``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Annotated, Any, TypedDict

from .base import CHECKPOINTS, Analysis, Option, json_of, schema_of

if TYPE_CHECKING:
    from ..core.objective import Objective
    from ..loading.checkpoints import Checkpoint
    from ..pipeline.protocol import AnalysisSession

DIRECTIONS = ("filter-normalized", "random", "top-eigen")  # the first is the default
BIAS_BN = ("zero", "per-tensor")
MAX_GRID = 201


class Result(TypedDict, total=False):
    """What ``compute`` returns (plus the unit's ``path``, ``step``, ``source``, ``n_samples``, ``seconds``)."""

    directions: Annotated[str, "filter-normalized, random or top-eigen"]
    alphas: Annotated[list[float], "the grid coordinates, the same on both axes"]
    loss: Annotated[list[list[float]], "loss[i][j] = L(w + alphas[i] d1 + alphas[j] d2)"]
    accuracy: Annotated[list[list[float]] | None, "accuracy at the same points (null where undefined)"]
    loss_center: Annotated[float, "L(w)"]
    loss_min: Annotated[float, "the lowest loss on the grid"]
    min_at: Annotated[list[float], "[a, b] of the lowest loss"]
    loss_max: Annotated[float, "the highest finite loss on the grid"]
    param_norm: Annotated[float, "||w||"]
    direction_norms: Annotated[list[float], "[||d1||, ||d2||]"]
    cosine: Annotated[float | None, "cos(d1, d2) (0 for eigenvectors; near 0 for Gaussian directions)"]
    eigenvalues: Annotated[list[float] | None, "top-eigen: [lambda1, lambda2] of the Hessian (null otherwise)"]
    residuals: Annotated[list[float] | None, "top-eigen: their relative residuals ||Hv - lambda v|| / |lambda|"]
    n_hvp: Annotated[int | None, "top-eigen: Hessian-vector products of the eigen solve"]
    n_params: Annotated[int, "parameters P"]
    warnings: Annotated[list[str], "why a number is not certified (an eigenpair above --tol)"]


@dataclass(frozen=True)
class Config:
    """The options that key a stored unit (with :attr:`Analysis.version`)."""

    directions: str
    grid: int
    range: tuple[float, float]
    seed: int
    bias_bn: str | None = None  # filter-normalized only
    tol: float | None = None  # top-eigen only
    max_hvp: int | None = None  # top-eigen only


ANALYSIS = Analysis(
    name="landscape", version=2, order=65, target=CHECKPOINTS,
    summary="2-D loss landscape L(w + a d1 + b d2) around each checkpoint along filter-normalized, random or "
            "top-2 Hessian eigenvector directions (contour and surface figures).",
    definitions=(
        ("filter-normalized", "Gaussian d with each filter (output row of a weight) scaled to ||w_filter||; "
                              "biases/norm layers zeroed (Li et al. 2018)"),
        ("random", "Gaussian d scaled as a whole to ||d|| = ||w||"),
        ("top-eigen", "the top-2 Hessian eigenvectors v1, v2 (unit length: a, b are distances)"),
        ("seed", "--seed draws the Gaussian directions (CPU generator) and starts the eigen solve"),
    ),
    json=json_of(Result, CHECKPOINTS),
    options=(
        Option("directions", "filter-normalized", ("--directions",), "Directions d1, d2: filter-normalized "
               "(Li et al.), random (scaled to ||w||) or top-eigen (top-2 Hessian eigenvectors).",
               choices=DIRECTIONS),
        Option("grid", 21, ("--grid",), "Points per axis (grid x grid loss evaluations)."),
        Option("range", "-1,1", ("--range",), "LO,HI of both coordinates a and b."),
        Option("bias_bn", "zero", ("--bias-bn",), "filter-normalized: one-dimensional tensors (biases, norm "
               "layers) are zeroed (Li et al.) or normalised per tensor.", choices=BIAS_BN),
        Option("tol", 1e-3, ("--tol",), "top-eigen: relative residual both eigenpairs must reach."),
        Option("max_hvp", None, ("--max-hvp",), "top-eigen: HVP budget of the eigen solve.", annotation=int),
    ),
    schema=schema_of(Result),
)


def configure(opts: dict[str, Any], settings: Any) -> dict[str, Any]:
    from ..errors import SpecError
    from .base import check_options
    from .interpolate import parse_range

    check_options(ANALYSIS, opts)
    grid = int(opts["grid"])
    if not 3 <= grid <= MAX_GRID:
        raise SpecError(f"--grid {grid}: give 3 to {MAX_GRID} points per axis")
    lo, hi = parse_range(opts["range"])
    kind = opts["directions"]
    eig = kind == "top-eigen"
    if eig and opts.get("max_hvp") is not None and opts["max_hvp"] < 2:
        raise SpecError("--max-hvp must be >= 2")
    cfg = Config(directions=kind, grid=grid, range=(lo, hi), seed=int(getattr(settings, "seed", 0) or 0),
                 bias_bn=opts["bias_bn"] if kind == "filter-normalized" else None,
                 tol=float(opts["tol"]) if eig else None, max_hvp=opts.get("max_hvp") if eig else None)
    out = asdict(cfg)
    out["range"] = [lo, hi]
    return out


def compute(ck: Checkpoint, session: AnalysisSession, cfg: dict[str, Any], carry: dict[str, Any]) -> Result:
    Config(**cfg)  # the stored config is this analysis's own
    return landscape(session.objective(ck), cfg)


def landscape(obj: Objective, cfg: dict[str, Any]) -> Result:
    """The loss surface of ``obj`` for a config of :func:`configure` (weights unchanged)."""
    import torch

    from ..core import landscape as core

    w = obj.params
    out: dict[str, Any] = {"eigenvalues": None, "residuals": None, "n_hvp": None}
    if cfg["directions"] == "top-eigen":
        d1, d2 = eigen_directions(obj, cfg, out)
    else:
        d1, d2 = core.random_directions(w, cfg["directions"], cfg["seed"], cfg.get("bias_bn") or "zero")
    alphas = core.grid(cfg["range"][0], cfg["range"][1], cfg["grid"])
    with torch.no_grad():
        loss, acc = core.surface(obj.evaluate, w, d1, d2, alphas)
    center = obj.loss()
    lo, at = core.lowest(loss, alphas)
    finite = [v for row in loss for v in row if v == v and abs(v) != float("inf")]
    has_acc = any(a is not None for row in acc for a in row)
    return Result(directions=cfg["directions"], alphas=alphas, loss=loss,
                  accuracy=[[float(a) if a is not None else float("nan") for a in row] for row in acc]
                  if has_acc else None,
                  loss_center=float(center), loss_min=lo, min_at=at, loss_max=max(finite) if finite else float("nan"),
                  param_norm=core.global_norm(w), direction_norms=[core.global_norm(d1), core.global_norm(d2)],
                  cosine=core.cosine(d1, d2), n_params=int(obj.n_params), **out)  # type: ignore[typeddict-item]


def eigen_directions(obj: Objective, cfg: dict[str, Any], out: dict[str, Any]) -> tuple[Any, Any]:
    """The top-2 Hessian eigenvectors as parameter dicts (unit length); eigenvalues, residuals, the
    HVP count and any warning go into ``out``.  Only the two vectors outlive the solve."""
    from ..core.lanczos import top_eigen
    from ..errors import SpecError

    if obj.n_params < 3:
        raise SpecError(f"--directions top-eigen needs at least 3 parameters, the model has {obj.n_params}")
    eig = top_eigen(obj, 2, tol=cfg["tol"], max_hvp=cfg["max_hvp"], seed=cfg["seed"])
    V = eig.eigenvectors[:, :2].to(dtype=obj.dtype)
    out.update(eigenvalues=[float(x) for x in eig.eigenvalues[:2]],
               residuals=[float(x) for x in eig.residuals[:2]], n_hvp=int(eig.n_hvp))
    if not all(eig.converged[:2]):
        out["warnings"] = [f"top-2 eigenpairs not converged to --tol {cfg['tol']:g}: the directions are "
                           "approximate eigenvectors; raise --max-hvp"] + list(eig.warnings)
    return obj.space.unflatten(V[:, 0].contiguous()), obj.space.unflatten(V[:, 1].contiguous())
