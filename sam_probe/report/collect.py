"""Reading a results store for ``report``: every unit once, with its attributes, skipped files named.

Each result comes back as its JSON form with the unit's stored attributes under
:data:`settings.META` (config, specs, versions, command, host, sha256), so
tables and figures can name the settings they show.  A unit stored twice (the
same checkpoints, analysis and settings) is shown once, the newest.

Results files are hostile input (:func:`sam_probe.store.iter_units` reads each
unit within its own budget).  Here a unit whose arrays, outside its packed ones,
hold more than ``MAX_SHOWN_VALUES`` values is skipped with the reason instead
of being expanded into Python lists (10-30x its bytes), and every string of a
result or its attributes has its C0/C1 control characters (terminal escapes,
OSC 8 links) replaced by ``?`` before any table, CSV, JSON or HTML sees it.
"""
from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import store
from ..results import jsonable, without_packed
from . import figures
from . import unit_settings as settings
from .unit_settings import META

MAX_SHOWN_VALUES = 1 << 21  # array values of one unit that report turns into lists (its packed arrays excepted)
_CONTROLS = {c: "?" for c in [*range(0, 9), *range(11, 32), *range(127, 160)]}


def shown_values(result: Any) -> int:
    """Array values a result holds outside its packed arrays (counted without recursion)."""
    import numpy as np

    n, stack = 0, [without_packed(result) if isinstance(result, dict) else result]
    while stack:
        x = stack.pop()
        if isinstance(x, np.ndarray):
            n += int(x.size)
        elif isinstance(x, dict):
            stack += x.values()
        elif isinstance(x, (list, tuple)):
            stack += x
    return n


def clean_text(obj: Any) -> Any:
    """``obj`` with C0/C1 control characters in every string and key replaced by ``?`` (tabs and newlines kept)."""
    if isinstance(obj, str):
        return obj.translate(_CONTROLS)
    if isinstance(obj, dict):
        return {clean_text(k): clean_text(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [clean_text(v) for v in obj]
    return obj


@dataclass
class Collection:
    analyses: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (unit file, reason)
    duplicates: list[str] = field(default_factory=list)  # unit files shown through a newer copy
    units: int = 0  # units read

    def versions(self, analysis: str) -> list[str]:
        """The distinct ``analysis_version`` attributes of one analysis' units (``unversioned`` where missing).

        Empty when no unit of the analysis stores a version (results written before versions existed).
        """
        vs = {settings.meta(r).get("analysis_version") for r in self.analyses.get(analysis, [])}
        if vs == {None}:
            return []
        return sorted("unversioned" if v is None else str(v) for v in vs)

    def run_keys(self) -> list[str]:
        keys = []
        for name, rs in self.analyses.items():
            for r in rs:
                if name == "interpolate":
                    keys += [str(Path(str(r.get("a"))).parent), str(Path(str(r.get("b"))).parent)]
                else:
                    keys.append(figures.run_key(r))
        return list(dict.fromkeys(keys))


def _sort_key(r: dict[str, Any]) -> tuple:
    step = r.get("step")
    return (settings.run_path(r) if "a" not in r else str(r.get("a")),
            step if isinstance(step, (int, float)) else -1, str(r.get("b", "")))


def tidy_steps(obj: Any, key: str = "") -> Any:
    """Integral float steps (``200.0``) back to ints in ``step``/``steps``/``ref_step``/``step_a``... keys."""
    if isinstance(obj, dict):
        return {k: tidy_steps(v, k) for k, v in obj.items()}
    if isinstance(obj, list):
        return [tidy_steps(v, key) for v in obj]
    if isinstance(obj, float) and "step" in key and obj.is_integer():
        return int(obj)
    return obj


def _identity(name: str, r: dict[str, Any]) -> str:
    m = settings.meta(r)
    return json.dumps([name, settings.group_key(r), m.get("sha256"), r.get("path") or r.get("run") or
                       [r.get("a"), r.get("b")]], sort_keys=True, default=str)


def collect(source: str | Path, only: Sequence[str] | None = None, order: Sequence[str] = (),
            on_skip: Callable[[str, str], None] | None = None) -> Collection:
    """Stored results grouped by analysis (in ``order``, then by name), each sorted by run and step."""
    coll = Collection()
    seen: dict[str, tuple[str, dict[str, Any], str]] = {}
    grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)

    def skip(name: str, why: str) -> None:
        coll.skipped.append((name, why))
        if on_skip is not None:
            on_skip(name, why)

    for unit, result, meta in store.iter_units(source, on_skip=skip):
        unit = clean_text(unit)
        name = meta.get("analysis")
        if not name:
            skip(unit, "no 'analysis' attribute (not written by sam-probe)")
            continue
        name = clean_text(str(name))
        if only and name not in only:
            continue
        values = shown_values(result)
        if values > MAX_SHOWN_VALUES:
            skip(unit, f"refused: its arrays hold {values:,} values outside its packed arrays, more than the "
                       f"{MAX_SHOWN_VALUES:,} a report shows per unit (a crafted file?)")
            continue
        coll.units += 1
        r = clean_text(tidy_steps(jsonable(without_packed(result))))
        r[META] = {**clean_text(jsonable(meta)), "unit": unit}
        ident = _identity(name, r)
        if ident in seen:
            old_unit, old, _ = seen[ident]
            newer = str(meta.get("created", "")) >= str(settings.meta(old).get("created", ""))
            coll.duplicates.append(old_unit if newer else unit)
            if not newer:
                continue
            grouped[name].remove(old)
        seen[ident] = (unit, r, name)
        grouped[name].append(r)
    for rs in grouped.values():
        rs.sort(key=_sort_key)
    rank = {n: i for i, n in enumerate(order)}
    coll.analyses = dict(sorted(grouped.items(), key=lambda kv: (rank.get(kv[0], len(rank)), kv[0])))
    return coll


def public(result: dict[str, Any]) -> dict[str, Any]:
    """A result as JSON/CSV show it: without the attached unit attributes."""
    return {k: v for k, v in result.items() if k != META}
