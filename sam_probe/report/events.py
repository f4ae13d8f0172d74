"""Training events known from the checkpoints, marked on every figure over steps.

* the late-SAM switch: ``switch_step`` of a ``late-sam`` run's training
  hyper-parameters (stored with the result as ``source.hparams`` /
  ``sources[i].hparams``, or attached by ``report`` under ``_meta.hparams``);
* the anchor step of an overlap and the reference checkpoint of a distance
  (their own result keys, marked by those plots).
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from . import figures
from .unit_settings import meta, sources


def hparams(result: dict[str, Any]) -> dict[str, Any]:
    """Training hyper-parameters of the run a result came from (empty when unknown)."""
    for src in sources(result):
        hp = src.get("hparams")
        if isinstance(hp, dict) and hp:
            return hp
    hp = meta(result).get("hparams") or result.get("hparams")
    return hp if isinstance(hp, dict) else {}


def switch_step(result: dict[str, Any]) -> float | None:
    """The step at which a late-SAM run switched from SGD to SAM, if the checkpoints say so."""
    ev = result.get("events")
    if isinstance(ev, dict) and ev.get("switch_step") is not None:
        return float(ev["switch_step"])
    hp = hparams(result)
    if hp.get("switch_step") is not None and str(hp.get("optimizer", "late-sam")).startswith("late"):
        try:
            return float(hp["switch_step"])
        except (TypeError, ValueError):
            return None
    return None


def switch_marks(results: Iterable[dict[str, Any]]) -> list[tuple[float, str, Any]]:
    """``(step, label, run colour)`` of each run's late-SAM switch (one per run)."""
    marks: dict[str, tuple[float, str, Any]] = {}
    for r in results:
        key = figures.run_key(r)
        s = switch_step(r)
        if s is not None and key not in marks:
            marks[key] = (s, f"SAM from {s:g}", figures.color(key))
    return list(marks.values())
