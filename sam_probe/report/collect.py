"""Reading a results store for ``report``: every unit once, with its attributes, skipped files named.

Each result comes back as its JSON form with the unit's stored attributes under
:data:`settings.META` (config, specs, versions, command, host, sha256), so
tables and figures can name the settings they show.  A unit stored twice (the
same checkpoints, analysis and settings) is shown once, the newest.
"""
from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import store
from ..pipeline import jsonable, without_packed
from . import figures, settings
from .settings import META


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
        name = meta.get("analysis")
        if not name:
            skip(unit, "no 'analysis' attribute (not written by sam-probe)")
            continue
        if only and name not in only:
            continue
        coll.units += 1
        r = tidy_steps(jsonable(without_packed(result)))
        r[META] = {**jsonable(meta), "unit": unit}
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


# ----------------------------------------------------------------- training events from the checkpoints
MAX_HPARAM_FILE = 256 * 2**20  # a checkpoint read only for its hyper-parameters is at most this large


def _checkpoint_of(r: dict[str, Any]) -> tuple[str, str] | None:
    """``(path, sha256)`` of one checkpoint of a result (the last of a whole-run result)."""
    m = settings.meta(r)
    paths, shas = m.get("checkpoint"), m.get("sha256")
    if isinstance(paths, str) and paths.startswith("["):
        try:
            paths, shas = json.loads(paths), json.loads(shas) if isinstance(shas, str) else shas
        except ValueError:
            return None
    if isinstance(paths, list) and isinstance(shas, list) and paths and len(paths) == len(shas):
        return str(paths[-1]), str(shas[-1])
    if isinstance(paths, str) and isinstance(shas, str):
        return paths, shas
    return None


def attach_hparams(coll: Collection) -> int:
    """Give results whose run stores no training hyper-parameters those of one of its checkpoints.

    Until every result stores its checkpoints' ``source.hparams``, the late-SAM
    switch step is read from a checkpoint still at its stored path, with the safe
    loader, only if its sha256 matches the stored one and it is at most
    :data:`MAX_HPARAM_FILE` bytes; one checkpoint per run.  Returns how many runs
    got them.
    """
    from . import events

    by_run: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for name, rs in coll.analyses.items():
        if name == "interpolate":
            continue
        for r in rs:
            by_run[figures.run_key(r)].append(r)
    done = 0
    for run, rs in by_run.items():
        if any(events.hparams(r) for r in rs):
            continue
        hp = _read_hparams([c for c in (_checkpoint_of(r) for r in rs) if c is not None])
        if hp:
            for r in rs:
                r[META]["hparams"] = hp
            done += 1
    return done


def _read_hparams(candidates: list[tuple[str, str]]) -> dict[str, Any]:
    from ..errors import SamProbeError
    from ..loading.checkpoints import file_sha256, load_checkpoint

    for path, sha in dict.fromkeys(candidates):
        try:
            if not os.path.isfile(path) or os.path.getsize(path) > MAX_HPARAM_FILE or file_sha256(path) != sha:
                continue
            hp = load_checkpoint(path).hparams
        except (SamProbeError, OSError, ValueError, RuntimeError):
            continue
        return {k: v for k, v in hp.items() if isinstance(v, (int, float, str, bool)) or v is None}
    return {}
