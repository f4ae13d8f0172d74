"""``distance``: how far each checkpoint of a run is from a reference, and the escape rate."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .base import RUNS, Analysis, Option

if TYPE_CHECKING:
    from ..pipeline.protocol import AnalysisSession

BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")

ANALYSIS = Analysis(
    name="distance", version=1, order=50, target=RUNS, gradients=False,
    summary="Distance ||w_t - w_ref|| (global, per tensor, relative) and escape rate.",
    definitions=(
        ("distance", "||w_t - w_ref|| over the model's parameters (BatchNorm statistics excluded)"),
        ("relative", "distance / ||w_ref||"),
        ("escape rate", "least-squares slope of log distance per step over the first --escape-window "
                        "checkpoints after the reference (> 0: moving away)"),
    ),
    json="{distance, relative, per_tensor, escape_rate, steps} ({runs: [...]} for several runs)",
    options=(
        Option("ref", None, ("--ref",), "Reference: a STEP of the run or a checkpoint PATH (default: the first "
               "checkpoint).", annotation=str),
        Option("escape_window", 5, ("--escape-window",), "Checkpoints after the reference used for the escape rate.",
               hidden_flags=("--k",)),
    ),
    schema={
        "run": "run directory", "paths": "checkpoint files", "steps": "steps", "distance": "||w_t - w_ref||",
        "relative": "distance / ||w_ref||", "per_tensor": "distance per parameter tensor",
        "escape_rate": "slope of log distance per step", "escape_steps": "steps used for the escape rate",
        "ref_step": "the reference's step", "ref_norm": "||w_ref||", "n_params": "parameters compared",
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

    kind, value = parse_ref(opts["ref"])
    return {"ref": opts["ref"], "k": opts["escape_window"], "ref_sha": file_sha256(value) if kind == "path" else None}


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
    return {"run": str(Path(cks[0].path).parent), "paths": [str(c.path) for c in cks], **out}
