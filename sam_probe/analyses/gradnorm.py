"""``gradnorm``: the full-batch gradient norm ||g|| = ||grad L(w)|| of every checkpoint, per tensor and module.

``g`` is the exact mean gradient of the loss over the whole data selection
(:meth:`~sam_probe.core.objective.Objective.grad_flat`: one reverse pass per
chunk, summed, divided by the term count).  Per parameter tensor ``t``:
``||g_t||``; per module ``m`` (the tensor names up to their last dot):
``||g_m|| = sqrt(sum_{t in m} ||g_t||^2)``, so the squared norms of the tensors
(and of the modules) add up to ``||g||^2``.  Memory: at most three parameter-sized
vectors, inside the gradient pass (a chunk's per-tensor gradients, their flat copy and the
running sum); the norms add nothing.  The weights are only read.

This module is the worked example of adding an analysis: its result and config
are typed (:class:`Result`, :class:`Config`) and the declared ``schema`` and
JSON line are derived from :class:`Result`.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Annotated, Any, TypedDict

from .base import CHECKPOINTS, Analysis, Option, json_of, schema_of

if TYPE_CHECKING:
    from ..core.objective import Objective
    from ..loading.checkpoints import Checkpoint
    from ..pipeline.protocol import AnalysisSession

GROUPINGS = ("tensor", "module")


class Part(TypedDict):
    """The gradient of one parameter tensor (or module)."""

    name: str  # tensor name (``fc1.weight``) or module name (``fc1``; ``(model)`` for top-level tensors)
    norm: float  # ||g_t||
    n_params: int  # its parameter count


class Result(TypedDict, total=False):
    """What ``compute`` returns (plus the unit's ``path``, ``step``, ``source``, ``n_samples``, ``seconds``)."""

    loss: Annotated[float, "mean loss L(w) over the selection"]
    accuracy: Annotated[float | None, "fraction correct (null where undefined)"]
    grad_norm: Annotated[float, "||g||, the full-batch gradient's 2-norm"]
    grad_max_abs: Annotated[float, "max_i |g_i|"]
    param_norm: Annotated[float, "||w||"]
    relative: Annotated[float | None, "||g|| / ||w|| (null where ||w|| = 0)"]
    n_params: Annotated[int, "parameters P"]
    per_tensor: Annotated[list[Part], "[{name, norm, n_params}] per parameter tensor, in the model's order"]
    per_module: Annotated[list[Part], "[{name, norm, n_params}] per module (tensor names up to the last dot)"]


@dataclass(frozen=True)
class Config:
    """The options that key a stored unit (with :attr:`Analysis.version`): none change the numbers yet,
    the data selection, loss and dtype are keyed by the session's settings."""


ANALYSIS = Analysis(
    name="gradnorm", version=1, order=15, target=CHECKPOINTS, shardable=True,
    summary="Full-batch gradient norm ||g|| per checkpoint, per parameter tensor and per module, with the loss.",
    definitions=(
        ("g", "grad L(w): the exact mean gradient of the loss over the whole data selection"),
        ("||g_t||", "2-norm of g restricted to tensor t; per module m: sqrt(sum over m's tensors of ||g_t||^2)"),
        ("relative", "||g|| / ||w||"),
    ),
    json=json_of(Result, CHECKPOINTS),
    options=(
        Option("per_layer", None, ("--per-layer",), "Show the gradient norm of every parameter tensor "
               "(--per-layer module: of every module); both are always stored.", annotation=str,
               choices=GROUPINGS, flag_value="tensor", view=True),
    ),
    schema=schema_of(Result),
)


def configure(opts: dict[str, Any], settings: Any) -> dict[str, Any]:
    from .base import check_options

    check_options(ANALYSIS, opts)
    return asdict(Config())


def compute(ck: Checkpoint, session: AnalysisSession, cfg: dict[str, Any], carry: dict[str, Any]) -> Result:
    Config(**cfg)  # the stored config is this analysis's own
    return gradient_norms(session.objective(ck))


def gradient_norms(obj: Objective) -> Result:
    """``||grad L(w)||`` of ``obj`` in total, per tensor and per module, and ``L(w)`` (weights unchanged).

    Norms are accumulated in float64 slice by slice: nothing beyond the gradient itself is allocated.
    A model-sharded objective (``--shard-model``): ``g`` and ``w`` are this rank's shards; the squared
    norms of every tensor's shards (float64) are summed over the ranks and ``max |g_i|`` is the maximum
    over them, so every rank returns the whole model's numbers."""
    import torch

    from ..core import inner

    group = getattr(obj, "shard_group", None)
    if group is not None:
        with inner.sharded(group):
            return _sharded_norms(obj)
    loss, acc = obj.evaluate()
    g = obj.grad_flat()

    def norm(t: torch.Tensor) -> float:
        return float(torch.linalg.vector_norm(t, dtype=torch.float64)) if t.numel() else 0.0

    tensors = [Part(name=n, norm=norm(g[s]), n_params=int(s.stop - s.start)) for n, s in obj.space.slices().items()]
    gn = norm(g)
    wn = sum(norm(obj.params[n]) ** 2 for n in obj.space.names) ** 0.5
    top = max(float(g.max()), -float(g.min())) if g.numel() else 0.0
    return Result(loss=float(loss), accuracy=acc, grad_norm=gn, grad_max_abs=top, param_norm=wn,
                  relative=gn / wn if wn > 0 else None, n_params=int(g.numel()), per_tensor=tensors,
                  per_module=by_module(tensors))


def _sharded_norms(obj: Any) -> Result:
    """:func:`gradient_norms` of a :class:`~sam_probe.core.sharded.ShardedObjective` (inside its group)."""
    import torch

    from ..core import inner

    loss, acc = obj.evaluate()
    g = obj.grad_flat()
    w = obj.flat_params()
    sl = list(obj.space.slices().values())
    sq = torch.zeros(2, len(sl), dtype=torch.float64, device=g.device)  # [||g_t||², ||w_t||²] of the shards
    for j, s in enumerate(sl):
        if s.stop > s.start:
            sq[0, j] = torch.linalg.vector_norm(g[s], dtype=torch.float64).square()
            sq[1, j] = torch.linalg.vector_norm(w[s], dtype=torch.float64).square()
    del w
    top = torch.zeros(1, dtype=torch.float64, device=g.device)
    if g.numel():
        top[0] = max(float(g.max()), -float(g.min()))
    sq, top = inner.allsum(sq).cpu(), inner.allmax(top).cpu()
    n = [math.prod(shape) for shape in obj.space.shapes]
    tensors = [Part(name=name, norm=float(sq[0, j].sqrt()), n_params=int(n[j])) for j, name in enumerate(obj.space.names)]
    gn, wn = float(sq[0].sum().sqrt()), float(sq[1].sum().sqrt())
    return Result(loss=float(loss), accuracy=acc, grad_norm=gn, grad_max_abs=float(top[0]), param_norm=wn,
                  relative=gn / wn if wn > 0 else None, n_params=int(obj.n_params), per_tensor=tensors,
                  per_module=by_module(tensors))


def module_of(name: str) -> str:
    """``fc1.weight`` -> ``fc1``; a top-level tensor belongs to ``(model)``."""
    return name.rsplit(".", 1)[0] if "." in name else "(model)"


def by_module(tensors: list[Part]) -> list[Part]:
    """Per-tensor norms combined per module: sqrt of the sum of squares, in first-seen order."""
    sq: dict[str, list[float]] = {}
    for t in tensors:
        acc = sq.setdefault(module_of(t["name"]), [0.0, 0])
        acc[0] += t["norm"] ** 2
        acc[1] += t["n_params"]
    return [Part(name=m, norm=s ** 0.5, n_params=int(n)) for m, (s, n) in sq.items()]
