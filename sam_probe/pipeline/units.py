"""The unit runner: every unit of an analysis, read back from the store or computed, then stored.

A unit is one checkpoint (``per_checkpoint``) or several checkpoint files
(``over_files``: a run, a pair).  It is reused (status ``reused``) when a
readable unit is stored under the same key, unless ``--force``.  A failure in
one unit is recorded (:func:`~sam_probe.pipeline.outcome.failure`) and the
others still run; a write failure keeps the computed result and is reported once.
"""
from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import store
from ..errors import CheckpointError, SamProbeError
from ..loading.checkpoints import file_sha256
from ..loading.runs import discover, run_label
from ..results import from_store
from ..store_keys import unit_key, unit_meta, unit_path
from .outcome import FAILED, OK, REUSED, UnitOutcome, failure, guarded
from .protocol import CheckpointCompute, FilesCompute

if TYPE_CHECKING:
    from ..analyses.base import Analysis
    from ..loading.checkpoints import Checkpoint
    from .session import Session

KEEP_LOADED_BYTES = 256 * 2**20  # tensors of a run kept from ordering it to computing it


def ordered(session: Session, target: str | Path) -> tuple[list[tuple[Path, int | None]], list[UnitOutcome]]:
    """Checkpoint files of ``target`` sorted by step (position when a file has none), and those that
    failed to load; small runs stay loaded until their unit is computed (read once, not twice)."""
    files = discover(target, session.settings.glob)
    good: list[tuple[Path, int | None, int]] = []
    failed: list[UnitOutcome] = []
    kept = 0
    for pos, f in enumerate(files):
        try:
            ck = session.load(f)
            good.append((f, ck.step, pos))
            size = sum(t.numel() * t.element_size() for t in ck.state.values())
            if kept + size <= KEEP_LOADED_BYTES:
                session.loaded[str(f)] = ck
                kept += size
            del ck
        except SamProbeError as exc:
            failed.append(UnitOutcome(str(f), None, FAILED, error=str(exc), details=getattr(exc, "rows", None)))
    good.sort(key=lambda t: (t[1] is None, t[1] if t[1] is not None else t[2], t[2]))
    return [(f, s if s is not None else pos) for f, s, pos in good], failed


def _checkpoint(session: Session, path: Path, step: int | None) -> Checkpoint:
    ck = session.loaded.pop(str(path), None) or session.load(path)
    ck.step = step
    return ck


def _light(session: Session, path: Path, step: int | None) -> Checkpoint:
    """The checkpoint at ``path`` without its tensors (what it says about itself: format, layout, step,
    hyper-parameters): a ``streamed`` analysis reads them itself (``session.load``), one checkpoint at a time."""
    import dataclasses

    ck = _checkpoint(session, path, step)
    return dataclasses.replace(ck, state={}, scanned=None)


def per_checkpoint(session: Session, analysis: Analysis, target: str | Path, config: dict[str, Any],
                   compute: CheckpointCompute) -> list[UnitOutcome]:
    """``compute(ck, session, config, carry)`` on every checkpoint of ``target`` in step order.

    ``carry`` passes from one checkpoint to the next: ``index``, ``prev_path``, and whatever
    ``compute`` leaves in it (e.g. the previous eigenvectors for a warm start).
    """
    files, outcomes = ordered(session, target)
    label = run_label(target)
    carry: dict[str, Any] = {}
    for i, (path, step) in enumerate(files):
        session.progress(f"{analysis.name} {path.name}", i, len(files))
        carry["index"] = i
        carry["prev_path"] = str(files[i - 1][0]) if i else None
        outcomes.append(done(session, one_checkpoint(session, analysis, label, path, step, config, compute, carry)))
    session.progress(analysis.name, len(files), len(files))
    outcomes.sort(key=lambda o: (o.step is None, o.step if o.step is not None else 0, o.path))
    return outcomes


def one_checkpoint(session: Session, analysis: Analysis, label: str, path: Path, step: int | None,
                   config: dict[str, Any], compute: CheckpointCompute, carry: dict[str, Any]) -> UnitOutcome:
    try:
        sha = file_sha256(path)
        unit = unit_path(session.settings.out, analysis.name, label, path.stem,
                         unit_key(analysis, config, session.settings, [sha]))
        stored = stored_result(session, unit)
        if stored is not None:
            session.loaded.pop(str(path), None)
            carry.pop("warm", None)  # nothing computed here to start the next solve from
            return UnitOutcome(str(path), step, REUSED, result=stored or None, stored_at=str(unit))
        ck = _checkpoint(session, path, step)
        t0 = time.perf_counter()
        result = compute(ck, session, config, carry)
        seconds = time.perf_counter() - t0
    except Exception as exc:  # noqa: BLE001 - every unit ends in an outcome; blame says whose error it was
        carry.pop("warm", None)
        return failure(path, step, exc)
    result = {"path": str(path), "step": step, "source": session.source(ck), **_size(session), **result,
              "seconds": seconds}
    outcome = UnitOutcome(str(path), step, OK, result=result, seconds=seconds)
    write(session, unit, result, meta(session, analysis, config, [str(path)], [sha], step, ck, seconds), outcome)
    return outcome


def whole_run(session: Session, analysis: Analysis, target: str | Path, config: dict[str, Any],
              compute: FilesCompute, name: str = "run") -> tuple[UnitOutcome, list[UnitOutcome]]:
    """``compute(checkpoints, session, config)`` once over all good checkpoints of ``target``."""
    files, failed = ordered(session, target)
    if not files:
        raise CheckpointError(f"{target}: no readable checkpoints")
    return over_files(session, analysis, run_label(target), name, files, config, compute, origin=str(target)), failed


def over_files(session: Session, analysis: Analysis, label: str, name: str, files: list[tuple[Path, int | None]],
               config: dict[str, Any], compute: FilesCompute, origin: str) -> UnitOutcome:
    """One unit computed from several checkpoint files (keyed by all their sha256)."""
    shas = [file_sha256(p) for p, _ in files]
    unit = unit_path(session.settings.out, analysis.name, label, name, unit_key(analysis, config, session.settings, shas))
    stored = stored_result(session, unit)
    if stored is not None:
        for p, _ in files:
            session.loaded.pop(str(p), None)
        return done(session, UnitOutcome(origin, None, REUSED, result=stored or None, stored_at=str(unit)))
    session.progress(f"{analysis.name} {label}", 0, 1)
    try:
        if analysis.streamed:  # the analysis reads each checkpoint's tensors itself, one at a time
            cks = [_light(session, p, step) for p, step in files]
        else:
            cks = [_checkpoint(session, p, step) for p, step in files]
        t0 = time.perf_counter()
        result = compute(cks, session, config)
    except Exception as exc:  # noqa: BLE001 - see one_checkpoint
        return done(session, failure(origin, None, exc))
    seconds = time.perf_counter() - t0
    result = {**_size(session), **result, "sources": [session.source(c) for c in cks], "seconds": seconds}
    outcome = UnitOutcome(origin, None, OK, result=result, seconds=seconds)
    write(session, unit, result, meta(session, analysis, config, [str(p) for p, _ in files], shas, None, cks[0],
                                      seconds), outcome)
    session.progress(f"{analysis.name} {label}", 1, 1)
    return done(session, outcome)


def run_analysis(session: Session, analysis: Analysis, targets: list[Path], cfg: dict[str, Any]) -> list[UnitOutcome]:
    """Every unit of ``analysis`` over ``targets`` (read back from the store or computed); a target
    that cannot be read is one failed outcome."""
    from ..analyses.base import CHECKPOINTS

    impl = analysis.impl
    if hasattr(impl, "execute"):
        return list(impl.execute(session, targets, cfg))

    def units_of(t: Path) -> list[UnitOutcome]:
        if analysis.target == CHECKPOINTS:
            return per_checkpoint(session, analysis, t, cfg, impl.compute)
        unit, failed = whole_run(session, analysis, t, cfg, impl.compute, name=analysis.name)
        return failed + [unit]

    outcomes: list[UnitOutcome] = []
    for target in targets:
        outcomes += guarded(target, functools.partial(units_of, target))
    return outcomes


# ------------------------------------------------------------------ the store
def stored_result(session: Session, unit: Path) -> dict[str, Any] | None:
    """The stored result of ``unit`` when it may be reused (``{}``: stored without a readable
    result), else ``None`` (not stored, ``--force``, ``--no-store``, or refused: recompute)."""
    s = session.settings
    if s.store and not s.force and _stored(unit):
        try:
            return from_store(store.read_unit(unit)[0]) if store.exists(unit) else {}
        except (OSError, KeyError, ValueError, TypeError, RecursionError):
            return None  # unreadable or refused (store.UnsafeResults): recompute and overwrite
    return None


def write(session: Session, unit: Path, result: dict[str, Any], attrs: dict[str, Any], outcome: UnitOutcome) -> None:
    """Store a computed unit (rank 0); a write failure keeps the result and is reported, once per command."""
    from .. import distributed

    if not (session.settings.store and distributed.is_main()):
        return
    if session.store_failed:
        outcome.store_error = session.store_failed
        return
    try:
        outcome.stored_at = str(store.write_unit(unit, result, attrs))
    except store.UnstorableResult as exc:  # this unit's values only: later units are still stored
        outcome.store_error = store.describe_write_error(unit, session.settings.out, exc)
    except Exception as exc:  # noqa: BLE001 - h5py raises RuntimeError for some failed writes; keep the result
        session.store_failed = store.describe_write_error(unit, session.settings.out, exc)
        outcome.store_error = session.store_failed


def meta(session: Session, analysis: Analysis, config: dict[str, Any], paths: list[str], shas: list[str],
         step: int | None, ck: Checkpoint, seconds: float) -> dict[str, Any]:
    """The stored attributes of a unit computed by ``session`` (:func:`~sam_probe.store_keys.unit_meta`)."""
    import torch

    from .. import distributed

    return unit_meta(analysis, config, session.settings, command=session.command, paths=paths, shas=shas,
                     step=step, model_spec=session.model_spec_or_none(ck), used_data=session.used_data,
                     device=str(session.device), torch_version=torch.__version__,
                     world_size=distributed.world_size() if distributed.active() else 1, seconds=seconds,
                     shard_plan=session.shard_plan if session.settings.shard_model else None)


def _size(session: Session) -> dict[str, Any]:
    """``n_samples`` of the data the unit used (when it used data), and with a half-precision model the
    precision it ran in (the per-product accuracy its residuals include; core/precision.py)."""
    if not session.used_data:
        return {}
    from ..core import precision

    half = {"precision": precision.info(session.dtype)} if precision.is_half(session.dtype) else {}
    return {"n_samples": session.used_data["n_samples"], **half}


def _stored(unit: Path) -> bool:
    """Whether ``unit`` is stored, as rank 0 sees it (every rank then skips or computes alike)."""
    from .. import distributed

    return bool(distributed.broadcast_object(store.exists(unit)))


def done(session: Session, outcome: UnitOutcome) -> UnitOutcome:
    if session.on_unit is not None:
        session.on_unit(outcome)
    return outcome
