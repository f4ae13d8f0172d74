"""The scalar results of a stored unit, derived from its analysis's declared schema: what trackers log.

For each key of ``analysis.schema`` (the JSON contract) that is not bookkeeping (path, steps, source, solver,
sample count, seconds, run): numbers as they are (``loss``, ``sam_sharpness``, ``trace``), nested dicts
as dotted names (``fractions.A``, ``sam_edge.lambda_edge``), lists of numbers one scalar per entry
named like :func:`sam_probe.load_results`'s columns (``eigenvalues`` -> ``eigenvalue_1 .. eigenvalue_k``).
Booleans, strings, ``null`` and non-finite numbers are not scalars; lists of dicts (per-layer tables)
and lists longer than :data:`MAX_LIST` are left out.

Every scalar is logged at a step: a checkpoint's unit at its ``step``.  A run's unit (``subspace``,
``distance``, ``overlap``) logs a list as long as its ``steps`` one entry per step under the field's
singular name (``overlap`` at each step), its other scalars at the run's last step; a pair's unit
(``interpolate``) at ``step_b``.  Tags read ``RUN/ANALYSIS/NAME``.
"""
from __future__ import annotations

import math
from typing import Any

MAX_LIST = 32  # entries of a list logged one scalar each; longer lists (density grids) are left out
BOOKKEEPING = frozenset({"solver", "path", "paths", "step", "steps", "source", "sources", "n_samples", "seconds", "run",
                         "run_dir", "warnings", "a", "b", "step_a", "step_b", "codes", "ire_flat", "eigenvectors"})


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _numbers(v: Any, gaps: bool = False, limit: int | None = MAX_LIST) -> list[float | None] | None:
    """``v`` as a list of finite numbers, or ``None`` when it is not one (bools and strings are not;
    ``null`` entries only with ``gaps``, as ``None``)."""
    if not isinstance(v, (list, tuple)) or not v or (limit is not None and len(v) > limit):
        return None
    if any(isinstance(x, bool) or not (x is None or isinstance(x, (int, float))) for x in v):
        return None
    out = [_number(x) for x in v]
    return out if gaps or all(x is not None for x in out) else None


def scalars(result: dict[str, Any], keys: Any = None, skip: frozenset[str] = BOOKKEEPING) -> dict[str, float]:
    """``{name: value}`` of ``result``'s scalars (module docstring), over ``keys`` (default: all)."""
    from ..frames import singular

    out: dict[str, float] = {}
    stack = [(k, result[k]) for k in (keys if keys is not None else result) if k in result and k not in skip]
    stack.reverse()
    while stack:
        name, v = stack.pop()
        if isinstance(v, dict):
            stack += reversed([(f"{name}.{k}", x) for k, x in v.items()])
        elif isinstance(v, (list, tuple)):
            xs = _numbers(v)
            if xs is None:
                continue
            head, _, leaf = name.rpartition(".")
            base = f"{head}.{singular(leaf)}" if head else singular(leaf)
            if base in out or any(f"{base}_{i}" in out for i in range(1, len(xs) + 1)):
                base = name
            out.update({f"{base}_{i}": x for i, x in enumerate(xs, 1) if x is not None})
        else:
            x = _number(v)
            if x is not None:
                out[name] = x
    return out


def _step(v: Any) -> int:
    try:
        return int(v)
    except (TypeError, ValueError):
        return 0


def points(analysis: Any, result: dict[str, Any], run: str | None = None) -> list[tuple[int, str, float]]:
    """``(step, tag, value)`` of one result of ``analysis`` (an :class:`~sam_probe.analyses.base.Analysis`),
    tags ``RUN/ANALYSIS/NAME`` (module docstring), in step order."""
    from ..analyses.base import CHECKPOINTS, PAIR

    label = run or str(result.get("run") or "run")
    prefix = f"{label}/{analysis.name}/"
    keys = [k for k in analysis.schema if k in result]
    out: list[tuple[int, str, float]] = []
    if analysis.target == CHECKPOINTS:
        step = _step(result.get("step"))
        return [(step, prefix + k, v) for k, v in scalars(result, keys).items()]
    if analysis.target == PAIR:
        step = _step(result.get("step_b"))
        return [(step, prefix + k, v) for k, v in scalars(result, keys).items()]
    given = result.get("steps")
    steps = [_step(s) for s in given] if isinstance(given, list) else []
    last = steps[-1] if steps else 0
    from ..frames import singular

    along: set[str] = set()
    for k in keys:
        xs = _numbers(result[k], gaps=True, limit=None) if k not in BOOKKEEPING and len(steps) > 1 else None
        if xs is not None and len(xs) == len(steps):  # one value per step of the run (null: none there)
            along.add(k)
            out += [(s, prefix + singular(k), x) for s, x in zip(steps, xs) if x is not None]
    out += [(last, prefix + k, v) for k, v in scalars(result, [k for k in keys if k not in along]).items()]
    return sorted(out, key=lambda p: p[0])


def all_points(analysis: Any, results: list[dict[str, Any]]) -> list[tuple[int, str, float]]:
    """:func:`points` of every result of a command (each names its ``run``), in step order."""
    out = [p for r in results for p in points(analysis, r)]
    return sorted(out, key=lambda p: p[0])
