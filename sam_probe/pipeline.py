"""Running an analysis over the checkpoints of a run: load, match, compute, store.

This layer ties loading, the pure core and the store together; it knows
nothing about terminals (progress is reported through a callback).  A failure
in one checkpoint is recorded and the others still run; a unit already stored
under the same key is read back instead of recomputed unless ``force``.
"""
from __future__ import annotations

import copy
import inspect
import math
import os
import socket
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from . import __version__, store
from .analyses.base import Analysis
from .core.objective import Objective
from .errors import CheckpointError, SamProbeError, SpecError
from .loading.checkpoints import Checkpoint, file_sha256, load_checkpoint
from .loading.matching import Matched, match_state
from .loading.runs import discover, run_label
from .settings import DTYPES, Settings  # noqa: F401 - re-exported (Settings lived here)

@dataclass
class UnitOutcome:
    """What happened to one unit: ``ok``, ``skipped`` (already stored) or ``failed``.

    ``store_error`` is set when the unit was computed but could not be written
    (its result is still shown); ``trace`` holds the traceback of an unexpected
    failure (shown with ``--debug``).
    """

    path: str
    step: int | None
    status: str
    result: dict[str, Any] | None = None
    error: str | None = None
    details: list[tuple[str, str, str]] | None = None
    stored_at: str | None = None
    store_error: str | None = None
    seconds: float | None = None
    trace: str | None = None


Progress = Callable[[str, int, int], None]


def _noop(msg: str, done: int, total: int) -> None:
    return None


def guarded(target: Any, fn: Callable[[], list[UnitOutcome]]) -> list[UnitOutcome]:
    """``fn()``, or one failed outcome for ``target`` when it raises a user error."""
    try:
        return fn()
    except SamProbeError as exc:
        return [UnitOutcome(str(target), None, "failed", error=str(exc), details=getattr(exc, "rows", None))]


def failure(path: Any, step: int | None, exc: BaseException) -> UnitOutcome:
    """A failed outcome for ``exc``: user errors as they are; anything else from the model,
    the data or the numerics as one line that says where to look (traceback kept for --debug)."""
    if isinstance(exc, SamProbeError):
        return UnitOutcome(str(path), step, "failed", error=str(exc), details=getattr(exc, "rows", None))
    text = (str(exc).strip().splitlines() or [""])[0][:200]
    hint = ("check that --model/--model-arg fit --data and --loss" if isinstance(exc, (RuntimeError, TypeError, IndexError, KeyError))
            else "rerun with --debug for the traceback")
    return UnitOutcome(str(path), step, "failed", error=f"{path}: {type(exc).__name__}: {text} ({hint})",
                       trace=traceback.format_exc())


KEEP_LOADED_BYTES = 256 * 2**20  # tensors of a run kept from ordering it to computing it

COMPUTE_ERRORS = (RuntimeError, ValueError, TypeError, IndexError, KeyError, ArithmeticError, NotImplementedError,
                  AttributeError, AssertionError)


class ProcessCache:
    """What may be reused across the commands one process runs (``batch`` workers):
    data selections, built models and objectives, keyed by everything they depend on.
    Off by default: a single command needs none of it."""

    def __init__(self, enabled: bool = False, max_objectives: int = 2):
        self.enabled = enabled
        self.data: dict[str, Any] = {}
        self.models: dict[str, Any] = {}
        self.objectives: dict[str, Any] = {}
        self.max_objectives = max_objectives

    def clear(self) -> None:
        self.data.clear()
        self.models.clear()
        self.objectives.clear()


CACHE = ProcessCache()


def _plain_value(v: Any) -> bool:
    """A keyword argument a checkpoint may pass to a built-in factory: numbers, strings, bools,
    None, or flat lists of those."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return True
    return isinstance(v, list) and len(v) <= 1024 and all(x is None or isinstance(x, (bool, int, float, str)) for x in v)


class Session:
    """Shared state of one command: settings, the cached data selection and models."""

    def __init__(self, settings: Settings, command: list[str] | None = None, progress: Progress | None = None,
                 on_unit: Callable[[UnitOutcome], None] | None = None, warn: Callable[[str], None] | None = None):
        self.settings = settings
        self._warn = warn
        self.notes: list[str] = []  # warnings about the whole command, each once
        self.command = command if command is not None else list(sys.argv)
        self.progress = progress or _noop
        self.on_unit = on_unit
        self._data: dict[str, Any] = {}
        self._prefix: dict[str, str] = {}
        self._layout: dict[str, str] = {}
        self._loaded: dict[str, Checkpoint] = {}  # checkpoints read while ordering a run, used once
        self.used_data: dict[str, Any] | None = None  # the data spec and size the last objective used
        self.device = settings.torch_device()
        self.dtype = settings.torch_dtype()
        from . import distributed as _dist
        if settings.distributed or _dist.launched():  # every rank shards each Objective; rank 0 writes
            self.device = _dist.rank_device(self.device)
            _dist.init(self.device)
        self._memory_plans: dict = {}
        self.store_failed: str | None = None  # the first write error: later units are not attempted

    def note(self, message: str) -> None:
        """A one-line fact about the command's settings, said once (rank 0 only)."""
        if message not in self.notes:
            self.notes.append(message)
            if self._warn is not None and _is_main():
                self._warn(message)

    # ------------------------------------------------------------ inputs
    def load(self, path: str | Path) -> Checkpoint:
        s = self.settings
        ck = load_checkpoint(path, key=s.key, trust=s.trust_checkpoint)
        bad = ck.nonfinite()
        if bad and not s.allow_nonfinite:
            names = ", ".join(f"{n} ({c})" for n, c in list(bad.items())[:4])
            more = f" and {len(bad) - 4} more" if len(bad) > 4 else ""
            raise CheckpointError(f"{path}: non-finite weights in {names}{more}; pass --allow-nonfinite to continue anyway")
        return ck

    def ordered(self, target: str | Path) -> tuple[list[tuple[Path, int | None]], list[UnitOutcome]]:
        """Checkpoint files of ``target`` sorted by step, and those that failed to load."""
        files = discover(target, self.settings.glob)
        good: list[tuple[Path, int | None, int]] = []
        failed: list[UnitOutcome] = []
        kept = 0
        for pos, f in enumerate(files):
            try:
                ck = self.load(f)
                good.append((f, ck.step, pos))
                size = sum(t.numel() * t.element_size() for t in ck.state.values())
                if kept + size <= KEEP_LOADED_BYTES:  # small runs are read once, not twice
                    self._loaded[str(f)] = ck
                    kept += size
                del ck
            except SamProbeError as exc:
                failed.append(UnitOutcome(str(f), None, "failed", error=str(exc), details=getattr(exc, "rows", None)))
        good.sort(key=lambda t: (t[1] is None, t[1] if t[1] is not None else t[2], t[2]))
        return [(f, s if s is not None else pos) for f, s, pos in good], failed

    # -------------------------------------------------------- trust boundary
    def model_spec(self, ck: Checkpoint) -> tuple[str, dict[str, Any]]:
        """The model name and keyword arguments: the user's ``--model``, or what the checkpoint
        names — which may only be a built-in zoo name (or one the user allowed with
        ``--allow-model``), with plain keyword arguments."""
        from .loading.models import is_builtin_model

        s = self.settings
        saved = ck.model_spec or {}
        if s.model:
            name = s.model
            args = dict(saved.get("args") or {}) if s.model == saved.get("name") else {}
        else:
            name = saved.get("name")
            if not name:
                from .loading.hf import config_path  # a weight file with config.json beside it
                name = "hf" if config_path(ck.path) is not None else None
            if not name:
                from .loading.models import ZOO
                raise SpecError(
                    f"{ck.path}: the checkpoint does not name its model; pass --model (zoo: {', '.join(sorted(ZOO))}, "
                    "hf, or pkg.module:factory / file.py:factory)")
            name = str(name)
            if not is_builtin_model(name) and name not in s.allow_models:
                raise CheckpointError(
                    f"{ck.path}: the checkpoint names its model {name!r}, which is not a built-in model; sam-probe "
                    f"never imports or calls code named inside a checkpoint: if you trust that code, pass "
                    f"--model {name} yourself")
            args = saved.get("args") or {}
            if not isinstance(args, dict):
                raise CheckpointError(f"{ck.path}: the saved model arguments are not key=value pairs; pass --model-arg")
            args = dict(args)
        if not s.model:
            bad = [k for k, v in args.items() if not isinstance(k, str) or not _plain_value(v)]
            if bad:
                raise CheckpointError(f"{ck.path}: saved model argument {str(bad[0])[:40]!r} is not a plain value; "
                                      "pass the model's arguments with --model-arg")
        args.update(s.model_args)
        return name, args

    def build_model(self, ck: Checkpoint) -> nn.Module:
        """The model of ``ck`` (seeded init, then the checkpoint's weights are matched on top).

        Saved hyper-parameters fill the factory's named arguments the user left open
        (plain values only; never through ``**kwargs``)."""
        from .loading.bounded_build import Budget
        from .loading.models import build_model, factory_for

        name, args = self.model_spec(ck)
        from .loading import hf
        if hf.is_hf_spec(name):  # Hugging Face: the config.json beside the weights (loading/hf.py)
            torch.manual_seed(self.settings.seed)
            return hf.build_model(ck.path, name, args, budget=Budget.of(ck.state))
        strict = not self.settings.model  # the checkpoint chose the factory
        factory = factory_for(name)
        try:
            accepted = inspect.signature(factory).parameters
        except (TypeError, ValueError):
            accepted = {}
        for k, v in ck.hparams.items():
            if k in accepted and k not in args and _plain_value(v) and accepted[k].kind not in (
                    inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL):
                args[k] = v
        key = repr((name, sorted(args.items(), key=lambda kv: kv[0]), self.settings.seed))
        if CACHE.enabled and key in CACHE.models:
            return copy.deepcopy(CACHE.models[key])
        torch.manual_seed(self.settings.seed)
        model = build_model(name, args, strict=strict, budget=Budget.of(ck.state))
        if CACHE.enabled:
            CACHE.models[key] = copy.deepcopy(model)
        return model

    def data_spec(self, ck: Checkpoint | None) -> tuple[str, dict[str, Any]]:
        """``--data`` and ``--data-arg``, or the built-in data the checkpoint's hyper-parameters name
        (never a file or a factory: those the user passes)."""
        from .loading.data import is_builtin_data

        s = self.settings
        if s.data:
            return s.data, dict(s.data_args)
        named = ck.hparams.get("data") if ck is not None else None
        if not named:
            raise SpecError("no --data given and the checkpoint does not name its data; pass --data (e.g. digits)")
        if not isinstance(named, str) or not is_builtin_data(named):
            raise CheckpointError(f"{ck.path}: the checkpoint names its data {str(named)[:80]!r}, which is not built-in "
                                  "data; sam-probe never reads files or runs code named inside a checkpoint: pass "
                                  "--data yourself")
        saved = ck.hparams.get("data_args") if not s.data_args else None
        args = dict(s.data_args)
        if isinstance(saved, dict) and all(isinstance(k, str) and _plain_value(v) for k, v in saved.items()):
            args = dict(saved)
        return named, args

    def data(self, ck: Checkpoint | None = None):
        """The data selection (loaded once per session, or once per process in ``batch``)."""
        from .loading.data import load_data

        s = self.settings
        spec, args = self.data_spec(ck)
        key = repr((spec, sorted(args.items()), s.split, s.max_samples, s.seed))
        pool = CACHE.data if CACHE.enabled else self._data
        if key not in pool:
            pool[key] = load_data(spec, split=s.split, max_samples=s.max_samples, seed=s.seed, options=args,
                                  named_by=None if s.data or ck is None else ck.path)
        self.used_data = {"data": spec, "data_args": args, "n_samples": len(pool[key])}
        return pool[key]

    def loss_name(self, ck: Checkpoint, data, model: nn.Module | None = None) -> str | None:
        """``--loss``, else a built-in loss the checkpoint names, else ``lm`` for causal language
        models, else the data's default."""
        from .core.objective import is_causal_lm
        from .loading.models import is_factory_spec

        s = self.settings
        if s.loss:
            return s.loss
        saved = ck.hparams.get("loss")
        if isinstance(saved, str) and saved:
            if is_factory_spec(saved) or saved.endswith(".py"):
                raise CheckpointError(f"{ck.path}: the checkpoint names its loss {saved[:80]!r}; sam-probe never "
                                      "imports code named inside a checkpoint: pass --loss yourself")
            return saved
        if model is not None and is_causal_lm(model):
            return "lm"
        return (data.meta or {}).get("loss")

    def matched(self, ck: Checkpoint, model: nn.Module) -> Matched:
        m = match_state(model, ck.state, ck.stripped_prefixes)
        self._prefix[ck.path] = m.prefix
        self._layout[ck.path] = m.layout
        return m

    def source(self, ck: Checkpoint) -> dict[str, Any]:
        """Where a result's weights came from: format, layout (prefixes stripped or inferred), step source,
        and the checkpoint's scalar training hyper-parameters (optimizer, lr, rho, switch_step, ...)."""
        hparams = {str(k)[:64]: (v[:200] if isinstance(v, str) else v) for k, v in list(ck.hparams.items())[:64]
                   if v is None or isinstance(v, (bool, int, float, str))}
        prefix = self._layout.get(ck.path) or " + ".join(ck.stripped_prefixes) or None
        return {"format": ck.format, "layout": ck.layout, "prefix": prefix or None,
                "step_source": ck.step_source, "hparams": hparams}

    def objective(self, ck: Checkpoint, model: nn.Module | None = None, data=None) -> Objective:
        """The loss of checkpoint ``ck`` over the session's data as an :class:`Objective`."""
        from .loading.losses import resolve_loss

        s = self.settings
        key = None
        if CACHE.enabled and model is None and data is None:
            key = repr((ck.path, _file_identity(ck.path), s.key, s.model, sorted(s.model_args.items()),
                        self.data_spec(ck), s.split, s.max_samples, s.seed, s.loss, s.dtype, s.bn_mode,
                        s.batch_size, s.max_memory, s.hvp, str(self.device)))
            if key in CACHE.objectives:
                obj, self.used_data = CACHE.objectives[key]
                obj.n_grad = obj.n_hvp = 0
                return obj
        model = model or self.build_model(ck)
        data = data or self.data(ck)
        if s.bn_mode == "train" and s.batch_size and s.batch_size < len(data) and any(
                isinstance(mod, nn.modules.batchnorm._BatchNorm) for mod in model.modules()):
            self.note(f"--bn-mode train with --batch-size {s.batch_size}: each chunk of {s.batch_size} samples is a "
                      "BatchNorm batch, so results depend on --batch-size (drop it for one batch of all "
                      f"{len(data)} samples)")
        m = self.matched(ck, model)
        model.to(self.device)
        from .loading.data import check_token_ids, unused_fields

        check_token_ids(data, model)
        if unused := unused_fields(data, model):
            self.note(f"data fields {', '.join(unused[:8])} are not arguments of {type(model).__name__}.forward, "
                      "which takes **kwargs and may ignore them")
        try:
            name, fn = resolve_loss(self.loss_name(ck, data, model))
        except SpecError as exc:
            if s.loss or not ck.hparams.get("loss"):
                raise
            raise SpecError(f"{ck.path}: the loss the checkpoint names cannot be used ({exc}); pass --loss "
                            "yourself") from None
        chunk = s.batch_size or (data.chunk_hint or STREAM_CHUNK if data.streamed else None)
        try:
            obj = Objective(model, data.batches(), None, fn or name, loss_name=name if fn else None,
                            params=m.params, buffers=m.buffers, bn_mode=s.bn_mode, chunk_size=chunk,
                            dtype=self.dtype, device=self.device, hvp_method=s.hvp)
            obj.check_inputs()
            if s.max_memory:
                from .core.memory import fit_memory
                obj = fit_memory(obj, s.max_memory, s.batch_size, self._memory_plans)
        except SamProbeError:
            raise
        except (RuntimeError, TypeError, ValueError, IndexError, KeyError, AttributeError) as exc:
            raise SpecError(f"{ck.path}: the model does not accept the data ({_first_line(exc)}){_hint(exc, data)}; "
                            "check --model/--model-arg against --data") from None
        for n in obj.notes:
            self.note(n)
        if key is not None:
            while len(CACHE.objectives) >= CACHE.max_objectives:
                CACHE.objectives.pop(next(iter(CACHE.objectives)))
            CACHE.objectives[key] = (obj, self.used_data)
        return obj

    # ------------------------------------------------------------ store
    def unit_meta(self, analysis: Analysis, config: dict[str, Any], paths: list[str], shas: list[str],
                  step: int | None, model_spec: Any, seconds: float) -> dict[str, Any]:
        s = self.settings
        return {
            "sam_probe_version": __version__, "torch_version": torch.__version__,
            "analysis": analysis.name, "analysis_version": analysis.version, "command": list(self.command),
            "config": config,
            "checkpoint": paths[0] if len(paths) == 1 else paths, "sha256": shas[0] if len(shas) == 1 else shas,
            "step": step if step is not None else -1, "model_spec": model_spec,
            "data_spec": {**self.settings.data_identity(), **(self.used_data or {})}, "seed": s.seed, "device": str(self.device),
            "dtype": s.dtype, "bn_mode": s.bn_mode, "wall_time": seconds, "host": socket.gethostname(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "pid": os.getpid(),
            "world_size": _world_size(),
        }

    def _key(self, analysis: Analysis, config: dict[str, Any], shas: list[str]) -> str:
        s = self.settings
        ident = {"model": s.model, "model_args": s.model_args, "loss": s.loss, "dtype": s.dtype,
                 "bn_mode": s.bn_mode, "key": s.key, **s.data_identity()}
        keyed = {k: v for k, v in config.items() if k not in analysis.unkeyed}
        return store.config_key(analysis.name, analysis.version, keyed, ident, shas)

    def _stored_result(self, unit: Path) -> dict[str, Any] | None:
        if self.settings.store and not self.settings.force and _stored(unit):
            try:
                return from_store(store.read_unit(unit)[0]) if store.exists(unit) else {}
            except (OSError, KeyError, ValueError, TypeError, RecursionError):
                return None  # unreadable or refused (store.UnsafeResults): recompute and overwrite
        return None

    def _write(self, unit: Path, result: dict[str, Any], meta: dict[str, Any], outcome: UnitOutcome) -> None:
        """Store a computed unit; a write failure keeps the result and is reported, once per command."""
        if not (self.settings.store and _is_main()):
            return
        if self.store_failed:
            outcome.store_error = self.store_failed
            return
        try:
            outcome.stored_at = str(store.write_unit(unit, result, meta))
        except store.UnstorableResult as exc:  # this unit's values only: later units are still stored
            outcome.store_error = store.describe_write_error(unit, self.settings.out, exc)
        except Exception as exc:  # noqa: BLE001 - h5py raises RuntimeError for some failed writes; keep the result
            self.store_failed = store.describe_write_error(unit, self.settings.out, exc)
            outcome.store_error = self.store_failed

    def _size(self) -> dict[str, Any]:
        """``n_samples`` of the data the unit used (when it used data)."""
        return {"n_samples": self.used_data["n_samples"]} if self.used_data else {}

    def _done(self, outcome: UnitOutcome) -> UnitOutcome:
        if self.on_unit is not None:
            self.on_unit(outcome)
        return outcome

    # ------------------------------------------------------------ drivers
    def per_checkpoint(self, analysis: Analysis, target: str | Path, config: dict[str, Any],
                       compute: Callable[..., dict[str, Any]]) -> list[UnitOutcome]:
        """Run ``compute(ckpt, session, config, carry)`` on every checkpoint of ``target``.

        ``carry`` is a dict passed from one checkpoint to the next (in step order):
        ``index``, ``prev_path``, and whatever ``compute`` leaves in it (e.g. the
        previous eigenvectors for a warm start).
        """
        ordered, outcomes = self.ordered(target)
        label = run_label(target)
        carry: dict[str, Any] = {}
        for i, (path, step) in enumerate(ordered):
            self.progress(f"{analysis.name} {path.name}", i, len(ordered))
            carry["index"] = i
            carry["prev_path"] = str(ordered[i - 1][0]) if i else None
            outcomes.append(self._done(self._one(analysis, label, path, step, config, compute, carry)))
        self.progress(analysis.name, len(ordered), len(ordered))
        outcomes.sort(key=lambda o: (o.step is None, o.step if o.step is not None else 0, o.path))
        return outcomes

    def _one(self, analysis, label, path, step, config, compute, carry) -> UnitOutcome:
        try:
            sha = file_sha256(path)
            unit = store.unit_path(self.settings.out, analysis.name, label, path.stem, self._key(analysis, config, [sha]))
            stored = self._stored_result(unit)
            if stored is not None:
                self._loaded.pop(str(path), None)
                carry.pop("warm", None)  # nothing computed here to start the next solve from
                return UnitOutcome(str(path), step, "skipped", result=stored or None, stored_at=str(unit))
            ck = self._loaded.pop(str(path), None) or self.load(path)
            ck.step = step
            if analysis.gradients:
                _warm_up()
            t0 = time.perf_counter()
            result = compute(ck, self, config, carry)
            seconds = time.perf_counter() - t0
        except KeyboardInterrupt:
            raise
        except (SamProbeError, *COMPUTE_ERRORS) as exc:
            carry.pop("warm", None)
            return failure(path, step, exc)
        result = {"path": str(path), "step": step, "source": self.source(ck), **self._size(), **result,
                  "seconds": seconds}
        outcome = UnitOutcome(str(path), step, "ok", result=result, seconds=seconds)
        meta = self.unit_meta(analysis, config, [str(path)], [sha], step, self.model_spec_or_none(ck), seconds)
        self._write(unit, result, meta, outcome)
        return outcome

    def model_spec_or_none(self, ck: Checkpoint) -> Any:
        try:
            name, args = self.model_spec(ck)
            return {"name": name, "args": args}
        except SamProbeError:
            return None

    def whole_run(self, analysis: Analysis, target: str | Path, config: dict[str, Any],
                  compute: Callable[..., dict[str, Any]], name: str = "run") -> tuple[UnitOutcome, list[UnitOutcome]]:
        """Run ``compute(checkpoints, session, config)`` once over all good checkpoints of ``target``."""
        ordered, failed = self.ordered(target)
        if not ordered:
            raise CheckpointError(f"{target}: no readable checkpoints")
        return self.over_files(analysis, run_label(target), name, ordered, config, compute, origin=str(target)), failed

    def over_files(self, analysis: Analysis, label: str, name: str, files: list[tuple[Path, int | None]],
                   config: dict[str, Any], compute: Callable[..., dict[str, Any]], origin: str) -> UnitOutcome:
        """One unit computed from several checkpoint files (keyed by all their sha256)."""
        shas = [file_sha256(p) for p, _ in files]
        unit = store.unit_path(self.settings.out, analysis.name, label, name, self._key(analysis, config, shas))
        stored = self._stored_result(unit)
        if stored is not None:
            for p, _ in files:
                self._loaded.pop(str(p), None)
            return self._done(UnitOutcome(origin, None, "skipped", result=stored or None, stored_at=str(unit)))
        self.progress(f"{analysis.name} {label}", 0, 1)
        try:
            cks = []
            for p, step in files:
                ck = self._loaded.pop(str(p), None) or self.load(p)
                ck.step = step
                cks.append(ck)
            if analysis.gradients:
                _warm_up()
            t0 = time.perf_counter()
            result = compute(cks, self, config)
        except KeyboardInterrupt:
            raise
        except (SamProbeError, *COMPUTE_ERRORS) as exc:
            return self._done(failure(origin, None, exc))
        seconds = time.perf_counter() - t0
        result = {**self._size(), **result, "sources": [self.source(c) for c in cks], "seconds": seconds}
        outcome = UnitOutcome(origin, None, "ok", result=result, seconds=seconds)
        meta = self.unit_meta(analysis, config, [str(p) for p, _ in files], shas, None,
                              self.model_spec_or_none(cks[0]), seconds)
        self._write(unit, result, meta, outcome)
        self.progress(f"{analysis.name} {label}", 1, 1)
        return self._done(outcome)


def run_analysis(session: Session, analysis: Analysis, targets: list[Path], cfg: dict[str, Any]) -> list[UnitOutcome]:
    """Every unit of ``analysis`` over ``targets`` (read back from the store or computed); a target
    that cannot be read is one failed outcome."""
    from .analyses.base import CHECKPOINTS

    impl = analysis.impl
    if hasattr(impl, "execute"):
        return impl.execute(session, targets, cfg)
    outcomes: list[UnitOutcome] = []
    for target in targets:
        if analysis.target == CHECKPOINTS:
            outcomes += guarded(target, lambda t=target: session.per_checkpoint(analysis, t, cfg, impl.compute))
        else:
            def one(t: Path) -> list[UnitOutcome]:
                unit, failed = session.whole_run(analysis, t, cfg, impl.compute, name=analysis.name)
                return failed + [unit]

            outcomes += guarded(target, lambda t=target: one(t))
    return outcomes


def _file_identity(path: str | Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


_WARMED: list[bool] = []


def _warm_up() -> None:
    """Import what the first ``torch.func`` transform would otherwise import (``torch._dynamo``,
    ~1 s) once per process, before the first unit's clock starts; analyses that take no
    gradients (``distance``) never pay it."""
    if _WARMED:
        return
    _WARMED.append(True)
    import torch.func  # noqa: F401

    w = torch.zeros(2, requires_grad=False)
    torch.func.grad(lambda p: (p * p).sum())(w)
    torch.func.vmap(lambda p: p * 2)(torch.zeros(2, 2))


STREAM_CHUNK = 64  # chunk of streamed data without --batch-size or a DataLoader's batch_size


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:160]}" if text else type(exc).__name__


def _hint(exc: BaseException, data) -> str:
    """Why integer inputs may not fit: they are passed as they are (token ids), not cast to floats."""
    x, msg = (data.inputs if not data.streamed else None), str(exc)
    if isinstance(x, torch.Tensor) and not x.is_floating_point() and ("dtype" in msg.lower() or "Long" in msg):
        return "; integer inputs are passed as they are (token ids): store float inputs for other models"
    return ""


def _is_main() -> bool:
    """Rank 0 (or a single process): the one that writes store units."""
    from . import distributed
    return distributed.is_main()


def _world_size() -> int:
    from . import distributed
    return distributed.world_size() if distributed.active() else 1


def _stored(unit: Path) -> bool:
    """Whether ``unit`` is stored, as rank 0 sees it (every rank then skips or computes alike)."""
    from . import distributed
    return bool(distributed.broadcast_object(store.exists(unit)))


PACKED_KEYS = ("codes", "ire_flat", "eigenvectors")  # packed numpy arrays that analyses read back as they are


def without_packed(result: dict[str, Any]) -> dict[str, Any]:
    """A result without its packed arrays (they stay in the store; JSON and tables leave them out)."""
    return {k: v for k, v in result.items() if k not in PACKED_KEYS}


def from_store(result: dict[str, Any]) -> dict[str, Any]:
    """A stored result as the command computed it: plain lists and numbers (packed arrays kept)."""
    return {k: v if k in PACKED_KEYS else jsonable(v) for k, v in result.items()}


def jsonable(obj: Any) -> Any:
    """Plain JSON types (numpy/tensors to lists, NaN/Inf to None)."""
    import numpy as np

    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return jsonable(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "__dataclass_fields__"):
        return jsonable(asdict(obj))
    return obj
