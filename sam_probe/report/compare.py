"""``report --compare``: stored sharpness results of several runs compared at matched training loss,
over the last K checkpoints, and across seeds (:mod:`sam_probe.core.compare`)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .tables import Table

METRICS = (("lambda_max", "λ_max"), ("trace", "trace"), ("sam_sharpness", "SAM sharpness"),
           ("worst_case_sharpness", "worst-case"), ("average_case_sharpness", "average-case"),
           ("accuracy", "accuracy"), ("eta_lambda_max", "η·λ_max"))


def _metrics_of(r: dict[str, Any]) -> dict[str, float | None]:
    ev = r.get("eigenvalues") or []
    out = {"lambda_max": ev[0] if ev and ev[0] is not None else None}
    for key, _ in METRICS[1:]:
        out[key] = r.get(key)
    return out


def runs_of(results: list[dict[str, Any]]) -> dict[str, list]:
    """``{run name: [(step, loss, metrics)]}`` in step order, from stored sharpness results."""
    from . import figures

    runs: dict[str, list] = {}
    for r in results:
        if r.get("step") is None or r.get("loss") is None:
            continue
        name = Path(figures.run_key(r)).name or figures.run_key(r)
        runs.setdefault(name, []).append((r["step"], r["loss"], _metrics_of(r)))
    return {k: sorted(v, key=lambda t: t[0]) for k, v in sorted(runs.items())}


def comparison(results: list[dict[str, Any]], last: int = 3, level: float | None = None) -> dict[str, Any]:
    from ..core.compare import compare

    runs = runs_of(results)
    present = [m for m, _ in METRICS if any(v[2].get(m) is not None for run in runs.values() for v in run)]
    return compare(runs, present, last=last, level=level)


def _cell(s: dict[str, Any]) -> str | None:
    if s["mean"] is None:
        return None
    return f"{s['mean']:.4g}" + (f" ± {s['std']:.2g}" if s["std"] is not None else "") + f" (n={s['n']})"


def tables_of(cmp: dict[str, Any]) -> list[Table]:
    names = dict(METRICS)
    ms = cmp["metrics"]
    level = cmp["level"]
    rows = []
    for g, grp in cmp["groups"].items():
        rows.append([g, len(grp["runs"])] + [_cell(grp["at_loss"][m]) for m in ms] + [_cell(grp["last"][m]) for m in ms])
    cols = ["runs (seeds grouped)", "n"] + [f"{names[m]} at loss {level:.3g}" if level is not None else names[m]
                                             for m in ms] + [f"{names[m]}, last {cmp['last']}" for m in ms]
    notes = ["matched loss: the largest of the runs' lowest training losses (every run reaches it); values "
             "interpolated in log loss between checkpoints; ± = std over seeds (ddof 1)"]
    per = [[name, r["group"], r["seed"]] + [r["at_loss"][m]["step"] for m in ms[:1]]
           + [r["at_loss"][m]["value"] for m in ms] for name, r in cmp["runs"].items()]
    return [Table("run comparison (sharpness results)", cols, rows, notes),
            Table("per run at the matched loss", ["run", "group", "seed", "step reached"] + [names[m] for m in ms], per)]
