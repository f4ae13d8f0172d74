"""``interpolate``: the loss along the straight line between two checkpoints (same valley or a ridge?)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .base import PAIR, Analysis, Option

if TYPE_CHECKING:
    from ..pipeline.protocol import AnalysisSession

ANALYSIS = Analysis(
    name="interpolate", version=2, order=60, target=PAIR, shardable=True,
    summary="Loss and accuracy along w(a) = (1-a) w_A + a w_B (buffers too) and the barrier above the chord.",
    definitions=(
        ("w(a)", "(1-a) w_A + a w_B for every alpha of the grid (always holding 0 and 1); BatchNorm buffers too"),
        ("barrier", "max over a in [0, 1] of L(w(a)) - ((1-a) L(w_A) + a L(w_B)); 0 = no ridge between A and B"),
    ),
    json="{alphas, loss, accuracy, barrier}",
    options=(
        Option("points", 29, ("--points",), "Number of alphas (0 and 1 are always added)."),
        Option("range", "-0.2,1.2", ("--range",), "LO,HI of alpha."),
    ),
    schema={
        "a": "checkpoint A", "b": "checkpoint B", "step_a": "A's step", "step_b": "B's step",
        "alphas": "grid of alpha", "loss": "L(w(alpha))", "accuracy": "accuracy at w(alpha)",
        "barrier": "height above the chord", "barrier_alpha": "where", "loss_a": "L(w_A)", "loss_b": "L(w_B)",
    },
)


def parse_range(text: str) -> tuple[float, float]:
    from ..errors import SpecError

    try:
        lo, hi = (float(x) for x in str(text).split(","))
    except ValueError:
        raise SpecError(f"--range {text}: give LO,HI, e.g. -0.2,1.2") from None
    if not lo < hi:
        raise SpecError(f"--range {text}: LO must be below HI")
    return lo, hi


def configure(opts: dict[str, Any], settings: Any) -> dict[str, Any]:
    from ..errors import SpecError

    lo, hi = parse_range(opts["range"])
    if opts["points"] < 2:
        raise SpecError("--points must be >= 2")
    return {"points": opts["points"], "range": [lo, hi]}


def execute(session: AnalysisSession, targets: list[Path], cfg: dict[str, Any]):
    from ..errors import SpecError
    from ..loading.runs import run_label

    if len(targets) != 2:
        raise SpecError(f"interpolate takes two checkpoint files A B, got {len(targets)}")
    from ..loading.sources import is_checkpoint

    a, b = (Path(t) for t in targets)
    for p in (a, b):
        if not is_checkpoint(p):  # a file, or a folder checkpoint (Hugging Face, ...)
            raise SpecError(f"{p}: give two checkpoint files")

    def run():
        files = [(p, session.load(p).step) for p in (a, b)]
        return [session.over_files(ANALYSIS, run_label(a), f"{a.stem}--{b.stem}", files, cfg, compute,
                                   origin=f"{a} -> {b}")]

    return session.guarded(f"{a} -> {b}", run)


def compute(cks, session: AnalysisSession, cfg: dict[str, Any]) -> dict[str, Any]:
    from ..core.paths import interpolate as core_interpolate

    ca, cb = cks
    obj = session.objective(ca)
    model = session.build_model(ca)
    ma, mb = session.matched(ca, model), session.matched(cb, model)
    lo, hi = cfg["range"]
    sa, sb = {**ma.params, **ma.buffers}, {**mb.params, **mb.buffers}
    if getattr(obj, "shard_group", None) is not None:  # --shard-model: each point one sharded evaluation
        from ..core.sharded import ShardedPath

        path = ShardedPath(obj)  # type: ignore[arg-type]
        res = core_interpolate(path, path.local(sa), path.local(sb), points=cfg["points"], lo=lo,  # type: ignore[arg-type]
                               hi=hi)
    else:
        res = core_interpolate(obj, sa, sb, points=cfg["points"], lo=lo, hi=hi)
    return {"a": str(ca.path), "b": str(cb.path), "step_a": ca.step, "step_b": cb.step, **res.to_dict()}
