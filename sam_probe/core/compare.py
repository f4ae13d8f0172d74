"""Comparing runs fairly (docs/metrics.md, "Run comparisons"): at matched training loss, over the
last checkpoints, and across seeds.

A run is a sequence of checkpoints ``(step_i, loss_i, {metric: value_i})`` in step order.

- **Matched training loss** ``L*`` (default: the largest of the runs' lowest losses, the
  level every run reaches): each run's metric at the first checkpoint ``i`` with
  ``loss_i <= L*``, linearly interpolated in ``log loss`` between checkpoints ``i-1`` and ``i``
  (``v = v_{i-1} + f (v_i - v_{i-1})``, ``f = (log L_{i-1} - log L*) / (log L_{i-1} - log L_i)``;
  the step is interpolated alike).  A run that never reaches ``L*`` has no value there.
- **Last K**: the mean of the metric over each run's last ``K`` checkpoints.
- **Seeds**: runs whose names differ only by a seed suffix (``-s0``, ``_seed1``, ``.s2``,
  ``seed=3``; :func:`seed_group`) form a group; a group's value is the mean over its runs
  with the standard deviation (ddof 1; None for one run) and ``n``.
- **Ratio** of two groups' means ``B/A - 1`` (a change) with the spread of the per-seed
  ratios when both groups pair up by seed.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

SEED_SUFFIX = re.compile(r"(?:[-_.](?:seed|s)|seed)[-_=]?(\d+)$", re.IGNORECASE)

Run = Sequence[tuple[float, float, Mapping[str, float | None]]]


def seed_group(name: str) -> tuple[str, int | None]:
    """``("sgd", 2)`` for ``"sgd-s2"``/``"sgd_seed2"``; ``(name, None)`` without a seed suffix."""
    m = SEED_SUFFIX.search(name)
    if not m or m.start() == 0:
        return name, None
    return name[:m.start()], int(m.group(1))


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def at_loss(run: Run, metric: str, level: float) -> tuple[float | None, float | None]:
    """``(value, step)`` of ``metric`` where the run's loss first reaches ``level`` (module docstring)."""
    prev = None
    for step, loss, vals in run:
        v, lv = _num(vals.get(metric)), _num(loss)
        if lv is None:
            continue
        if lv <= level:
            if prev is None or v is None or prev[2] is None or prev[1] <= 0 or lv <= 0 or prev[1] == lv:
                return v, float(step)
            f = (math.log(prev[1]) - math.log(level)) / (math.log(prev[1]) - math.log(lv))
            return prev[2] + f * (v - prev[2]), prev[0] + f * (float(step) - prev[0])
        prev = (float(step), lv, v)
    return None, None


def last_k(run: Run, metric: str, k: int) -> float | None:
    """Mean of ``metric`` over the last ``k`` checkpoints that have it."""
    vals = [v for v in (_num(vals.get(metric)) for _, _, vals in run) if v is not None]
    return float(np.mean(vals[-k:])) if vals else None


def spread(values: Sequence[float | None]) -> dict[str, Any]:
    """``{mean, std (ddof 1, None for one value), n, values}`` over the values that exist."""
    v = [x for x in values if x is not None]
    return {"mean": float(np.mean(v)) if v else None, "std": float(np.std(v, ddof=1)) if len(v) > 1 else None,
            "n": len(v), "values": list(values)}


def matched_level(runs: Mapping[str, Run]) -> float | None:
    """The largest of the runs' lowest training losses (the level every run reaches)."""
    lows = [min(x for x in (_num(loss) for _, loss, _ in run) if x is not None) for run in runs.values()
            if any(_num(loss) is not None for _, loss, _ in run)]
    return max(lows) if lows else None


def compare(runs: Mapping[str, Run], metrics: Sequence[str], *, last: int = 3, level: float | None = None
            ) -> dict[str, Any]:
    """Per run and per seed group: every metric at the matched loss and over the last ``last`` checkpoints.

    Returns ``{level, last, runs: {run: {group, seed, at_loss: {metric: {value, step}}, last: {metric: v}}},
    groups: {group: {runs, at_loss: {metric: spread}, last: {metric: spread}}}}``."""
    lvl = matched_level(runs) if level is None else float(level)
    per_run: dict[str, Any] = {}
    for name, run in runs.items():
        g, seed = seed_group(name)
        row: dict[str, Any] = {"group": g, "seed": seed, "at_loss": {}, "last": {}}
        for m in metrics:
            v, s = at_loss(run, m, lvl) if lvl is not None else (None, None)
            row["at_loss"][m] = {"value": v, "step": s}
            row["last"][m] = last_k(run, m, last)
        per_run[name] = row
    groups: dict[str, Any] = {}
    for name, row in per_run.items():
        groups.setdefault(row["group"], {"runs": []})["runs"].append(name)
    for grp in groups.values():
        grp["at_loss"] = {m: spread([per_run[r]["at_loss"][m]["value"] for r in grp["runs"]]) for m in metrics}
        grp["last"] = {m: spread([per_run[r]["last"][m] for r in grp["runs"]]) for m in metrics}
    return {"level": lvl, "last": last, "metrics": list(metrics), "runs": per_run, "groups": groups}


def change(result: dict[str, Any], base: str, other: str, metric: str, where: str = "at_loss") -> dict[str, Any]:
    """``other/base - 1`` of the group means, and the spread of per-seed ratios where seeds pair up."""
    gb, go = result["groups"][base], result["groups"][other]
    mb, mo = gb[where][metric]["mean"], go[where][metric]["mean"]
    out: dict[str, Any] = {"change": None if not mb or mo is None else mo / mb - 1.0, "paired": None}

    def val(run: str) -> float | None:
        r = result["runs"][run]
        return r[where][metric]["value"] if where == "at_loss" else r[where][metric]

    seeds_b = {result["runs"][r]["seed"]: r for r in gb["runs"]}
    pairs = [(val(seeds_b[result["runs"][r]["seed"]]), val(r)) for r in go["runs"]
             if result["runs"][r]["seed"] is not None and result["runs"][r]["seed"] in seeds_b]
    ratios = [o / b - 1.0 for b, o in pairs if b and o is not None]
    if ratios:
        out["paired"] = spread(ratios)
    return out
