"""``sam-probe inspect CHECKPOINT``: what is inside, without a model."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from ..errors import SamProbeError
from ..loading import sources
from ..report import console
from ..settings import Settings
from .options import Common, Output
from .output import finish


def describe(path: Path, key: str | None, trust: bool) -> dict[str, Any]:
    from ..loading.checkpoints import load_checkpoint

    ck = load_checkpoint(path, key=key, trust=trust)
    tensors = [{"name": n, "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")} for n, t in ck.state.items()]
    nonfinite = ck.nonfinite()
    return {
        "path": str(path), "source": ck.source, "format": ck.format, "layout": ck.layout, "step": ck.step, "step_source": ck.step_source,
        "n_params": ck.n_params, "n_tensors": len(ck.state), "tensors": tensors,
        "nonfinite": sum(nonfinite.values()), "nonfinite_tensors": nonfinite,
        "extra_keys": ck.extra_keys, "has_optimizer_state": any("optim" in k for k in ck.extra_keys),
        "hparams": ck.hparams, "model_spec": ck.model_spec, "stripped_prefixes": ck.stripped_prefixes,
        "placeholders": ck.placeholders, "trusted": ck.trusted,
    }


def inspect(
    checkpoints: list[Path] = typer.Argument(..., help=sources.help_text(), metavar="CHECKPOINT..."),
    glob: Optional[str] = typer.Option(None, "--glob", help="In a run directory, only files matching this pattern.",
                                       metavar="PATTERN"),
    key: Optional[str] = typer.Option(None, "--key", help="Dotted key of the state dict inside the checkpoint.",
                                      metavar="A.B"),
    trust_checkpoint: bool = typer.Option(False, "--trust-checkpoint", help="DANGEROUS: fully unpickle (runs code)."),
    tensors: bool = typer.Option(False, "--tensors", help="List every tensor in the table view."),
    json: bool = typer.Option(False, "--json", help="Print only the JSON result on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Format, layout, step, tensors, parameter count, non-finite values and extra keys of checkpoints."""
    if trust_checkpoint:
        console.warn("--trust-checkpoint: fully unpickling; a malicious file can run code on this machine")
    from ..loading.runs import discover
    from ..pipeline.outcome import UnitOutcome, failure, guarded

    outcomes: list[UnitOutcome] = []
    for target in checkpoints:
        def one(t: Path = target) -> list[UnitOutcome]:
            done = []
            for path in discover(t, glob):
                try:
                    done.append(UnitOutcome(str(path), None, "ok", result=describe(path, key, trust_checkpoint)))
                except SamProbeError as exc:
                    done.append(failure(path, None, exc))
            return done

        outcomes += guarded(target, one)
    good = [o.result for o in outcomes if o.result]
    payload = {"checkpoints": good + [{"path": o.path, "error": o.error} for o in outcomes if o.status == "failed"]}

    def show() -> None:
        rows = [[Path(r["path"]).name, r["format"], r["layout"], r["step"], r["step_source"], r["n_params"],
                 r["n_tensors"], r["nonfinite"], ", ".join(r["extra_keys"]) or "-"] for r in good]
        console.out.print(console.table("checkpoints", ["file", "format", "layout", "step", "step from", "params",
                                                        "tensors", "non-finite", "extra keys"], rows))
        for r in good:
            if r["placeholders"]:
                console.out.print(console.safe(f"{Path(r['path']).name}: objects kept as inert placeholders (not "
                                               "loaded): " + ", ".join(r["placeholders"])), highlight=False)
            if tensors:
                console.out.print(console.table(Path(r["path"]).name, ["tensor", "shape", "dtype"],
                                                [[t["name"], "x".join(map(str, t["shape"])) or "scalar", t["dtype"]]
                                                 for t in r["tensors"]]))

    common = Common(Settings(store=False), Output(json=json, quiet=quiet, debug=debug))
    finish(common, outcomes, payload, show)
