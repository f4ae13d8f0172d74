"""``sam-probe distance RUN`` and ``sam-probe interpolate A B``: escape and same-valley checks."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
import typer

from ..errors import SpecError
from ..loading.checkpoints import file_sha256
from ..loading.runs import run_label
from ..pipeline import UnitOutcome
from ..report import distance as distance_view
from ..report import interpolate as interpolate_view
from .options import Common, analysis_options
from .output import finish
from .runner import finish_whole_runs, guarded, open_session, session_with_progress, whole_runs

BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


def parameters_of(session, ck) -> dict[str, torch.Tensor]:
    """The model's parameters in ``ck`` (matched against the model when one is known; otherwise
    every floating tensor except BatchNorm statistics)."""
    try:
        return session.matched(ck, session.build_model(ck)).params
    except SpecError:
        return {n: t for n, t in ck.state.items()
                if torch.is_floating_point(t) and not n.endswith(BUFFER_SUFFIXES)}


def parse_ref(ref: str | None) -> tuple[str, Any]:
    """``--ref``: None (first checkpoint), a step number, or a checkpoint path."""
    if ref is None:
        return "index", 0
    try:
        return "step", int(ref)
    except ValueError:
        path = Path(ref)
        if not path.exists():
            raise SpecError(f"--ref {ref}: neither a step nor an existing checkpoint file") from None
        return "path", path


def distance(
    runs: list[Path] = typer.Argument(..., help="Run directories."),
    ref: Optional[str] = typer.Option(None, "--ref", help="Reference: a STEP of the run or a checkpoint PATH (default: the first checkpoint)."),
    k: int = typer.Option(5, "--k", help="Checkpoints after the reference used for the escape rate."),
    *,
    common: Common,
) -> None:
    """Distance ||w_t - w_ref|| (global, per tensor, relative) and escape rate (slope of log distance per step).

    JSON: the distance object for one run; {"runs": [...]} for several.
    """
    from ..core.paths import distance as core_distance

    kind, value = parse_ref(ref)
    ref_state = ref_step = None
    if kind == "path":
        session = open_session(common)
        ck = session.load(value)
        ref_state, ref_step = parameters_of(session, ck), ck.step
    cfg = {"ref": ref, "k": k, "ref_sha": file_sha256(value) if kind == "path" else None}

    def compute(cks, session) -> dict[str, Any]:
        states = [parameters_of(session, c) for c in cks]
        steps = [c.step for c in cks]
        if kind == "step":
            if value not in steps:
                raise SpecError(f"--ref {value}: not a step of this run (steps: {steps})")
            target: Any = steps.index(value)
        else:
            target = 0 if kind == "index" else ref_state
        try:
            res = core_distance(states, target, steps=steps, ref_step=ref_step, k=k)
        except KeyError as exc:
            raise SpecError(f"--ref: the checkpoints do not hold the reference's tensors ({exc})") from None
        return {"run": str(Path(cks[0].path).parent), "paths": [str(c.path) for c in cks], **res.to_dict()}

    finish_whole_runs(common, runs, whole_runs(common, runs, "distance", cfg, compute, name="distance"), distance_view)


def parse_range(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(x) for x in text.split(","))
    except ValueError:
        raise SpecError(f"--range {text}: give LO,HI, e.g. -0.2,1.2") from None
    if not lo < hi:
        raise SpecError(f"--range {text}: LO must be below HI")
    return lo, hi


def interpolate(
    a: Path = typer.Argument(..., help="Checkpoint A (alpha = 0)."),
    b: Path = typer.Argument(..., help="Checkpoint B (alpha = 1)."),
    points: int = typer.Option(41, "--points", help="Number of alphas."),
    range_: str = typer.Option("-0.2,1.2", "--range", help="LO,HI of alpha."),
    *,
    common: Common,
) -> None:
    """Loss and accuracy along w(a) = (1-a) w_A + a w_B (buffers too) and the barrier above the chord."""
    from ..core.paths import interpolate as core_interpolate

    lo, hi = parse_range(range_)
    if points < 2:
        raise SpecError("--points must be >= 2")
    for p in (a, b):
        from ..loading.hf import is_folder_checkpoint
        if not (p.is_file() or is_folder_checkpoint(p)):  # a file, or a Hugging Face folder checkpoint
            raise SpecError(f"{p}: give two checkpoint files")
    cfg = {"points": points, "range": [lo, hi]}

    def compute(cks, session) -> dict[str, Any]:
        ca, cb = cks
        obj = session.objective(ca)
        model = session.build_model(ca)
        ma, mb = session.matched(ca, model), session.matched(cb, model)
        res = core_interpolate(obj, {**ma.params, **ma.buffers}, {**mb.params, **mb.buffers}, points=points, lo=lo, hi=hi)
        return {"a": str(ca.path), "b": str(cb.path), "step_a": ca.step, "step_b": cb.step, **res.to_dict()}

    def run(session) -> list[UnitOutcome]:
        files = [(p, session.load(p).step) for p in (a, b)]
        return [session.over_files("interpolate", run_label(a), f"{a.stem}--{b.stem}", files, cfg, compute,
                                   origin=f"{a} -> {b}")]

    with session_with_progress(common) as session:
        outcomes = guarded(f"{a} -> {b}", lambda: run(session))
    results = [o.result for o in outcomes if o.result is not None]
    payload = results[0] if results else {}
    finish(common, outcomes, payload, show=lambda: interpolate_view.show(results),
           plot=lambda d: interpolate_view.plot(results, d))


def register(app: typer.Typer) -> None:
    app.command("distance")(analysis_options(distance))
    app.command("interpolate")(analysis_options(interpolate))
