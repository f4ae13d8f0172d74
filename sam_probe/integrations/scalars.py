"""The scalar results of a stored unit, derived from its analysis's declared schema: what trackers log.

For each key of ``analysis.schema`` (the JSON contract) that is not bookkeeping (path, steps, source, solver,
sample count, seconds, run): numbers as they are (``loss``, ``sam_sharpness``, ``trace``), nested dicts
as dotted names (``fractions.A``, ``sam_edge.lambda_edge``), lists of numbers one scalar per entry
named like :func:`sam_probe.load_results`'s columns (``eigenvalues`` -> ``eigenvalue_1 .. eigenvalue_k``).
Booleans, strings, ``null`` and non-finite numbers are not scalars; lists of dicts (per-layer tables)
and lists longer than :data:`MAX_LIST` are left out.

Every scalar is logged at a step: a checkpoint's unit at its ``step``.  A run's unit (``subspace``,
``distance``, ``overlap``) logs each list as long as its ``steps`` (nested ones too) one entry per step
under the list's own name (``distance``, ``per_tensor.fc1.weight`` at each step), its other scalars at
the run's last step; a pair's unit (``interpolate``) at ``step_b``.  Tags read ``RUN/ANALYSIS/NAME``.
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
            base = name if "." in name else singular(name)  # eigenvalues -> eigenvalue_1..k (as load_results)
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
    rest: dict[str, Any] = {}
    if analysis.target == CHECKPOINTS:
        step = _step(result.get("step"))
        return [(step, prefix + k, v) for k, v in scalars(result, keys).items()]
    if analysis.target == PAIR:
        step = _step(result.get("step_b"))
        return [(step, prefix + k, v) for k, v in scalars(result, keys).items()]
    given = result.get("steps")
    steps = [_step(s) for s in given] if isinstance(given, list) else []
    last = steps[-1] if steps else 0
    for k in keys:
        if k in BOOKKEEPING:
            continue
        series, left = _along(k, result[k], len(steps)) if len(steps) > 1 else ([], result[k])
        out += [(s, prefix + name, x) for name, xs in series for s, x in zip(steps, xs) if x is not None]
        if left is not None:
            rest[k] = left
    out += [(last, prefix + k, v) for k, v in scalars(rest).items()]
    return sorted(out, key=lambda p: p[0])


def _along(name: str, v: Any, n: int) -> tuple[list[tuple[str, list[float | None]]], Any]:
    """``(series, rest)`` of a run's field: its lists of ``n`` numbers (one per step; nested ones under dotted
    names) and what is left of it (``None`` when nothing)."""
    if isinstance(v, dict):
        series: list[tuple[str, list[float | None]]] = []
        rest = {}
        for k, x in v.items():
            s, left = _along(f"{name}.{k}", x, n)
            series += s
            if left is not None:
                rest[k] = left
        return series, (rest or None)
    xs = _numbers(v, gaps=True, limit=None)
    if xs is not None and len(xs) == n:
        return [(name, xs)], None
    return [], v


def all_points(analysis: Any, results: list[dict[str, Any]]) -> list[tuple[int, str, float]]:
    """:func:`points` of every result of a command (each names its ``run``), in step order."""
    out = [p for r in results for p in points(analysis, r)]
    return sorted(out, key=lambda p: p[0])
