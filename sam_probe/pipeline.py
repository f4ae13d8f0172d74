"""Running an analysis over the checkpoints of a run: load, match, compute, store.

This layer ties loading, the pure core and the store together; it knows
nothing about terminals (progress is reported through a callback).  A failure
in one checkpoint is recorded and the others still run; a unit already stored
under the same key is read back instead of recomputed unless ``force``.
"""
from __future__ import annotations

import inspect
import math
import os
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from . import __version__, store
from .core.objective import Objective
from .errors import CheckpointError, SamProbeError, SpecError
from .loading.checkpoints import Checkpoint, file_sha256, load_checkpoint
from .loading.matching import Matched, match_state
from .loading.runs import discover, run_label

DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class Settings:
    """Options shared by every analysis command (model, data, numerics, output)."""

    model: str | None = None
    model_args: dict[str, Any] = field(default_factory=dict)
    data: str | None = None
    data_args: dict[str, Any] = field(default_factory=dict)
    split: str = "train"
    max_samples: int | None = None
    batch_size: int | None = None
    loss: str | None = None
    device: str = "auto"
    dtype: str = "float32"
    bn_mode: str = "eval"
    seed: int = 0
    out: Path = Path("sam_probe_results")
    force: bool = False
    glob: str | None = None
    key: str | None = None
    trust_checkpoint: bool = False
    allow_nonfinite: bool = False
    store: bool = True
    max_memory: str | None = None  # e.g. "2GB": chunk and vector-block sizes from this budget (core/memory.py)
    distributed: bool = False  # data parallel over a torch.distributed group (also when torchrun set WORLD_SIZE)
    hvp: str = "rev-rev"  # Hessian-vector products: rev-rev (double backward) or fwd-rev (jvp over grad)

    def torch_dtype(self) -> torch.dtype:
        if self.dtype not in DTYPES:
            raise SpecError(f"--dtype {self.dtype}: choose float32 or float64")
        return DTYPES[self.dtype]

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            dev = torch.device(self.device)
        except RuntimeError:
            raise SpecError(f"--device {self.device}: use auto, cpu, cuda or cuda:N") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise SpecError(f"--device {self.device}: CUDA is not available here; use --device cpu")
        return dev

    def data_identity(self) -> dict[str, Any]:
        return {"data": self.data, "data_args": self.data_args, "split": self.split,
                "max_samples": self.max_samples, "seed": self.seed}


@dataclass
class UnitOutcome:
    """What happened to one unit: ``ok``, ``skipped`` (already stored) or ``failed``."""

    path: str
    step: int | None
    status: str
    result: dict[str, Any] | None = None
    error: str | None = None
    details: list[tuple[str, str, str]] | None = None
    stored_at: str | None = None


Progress = Callable[[str, int, int], None]


def _noop(msg: str, done: int, total: int) -> None:
    return None


class Session:
    """Shared state of one command: settings, the cached data selection and models."""

    def __init__(self, settings: Settings, command: list[str] | None = None, progress: Progress | None = None,
                 quiet: bool = False):
        self.settings = settings
        self.command = command if command is not None else list(sys.argv)
        self.progress = progress or _noop
        self.quiet = quiet
        self._noted: set[str] = set()
        self._data: dict[str, Any] = {}
        self.device = settings.torch_device()
        self.dtype = settings.torch_dtype()
        from . import distributed as _dist
        if settings.distributed or _dist.launched():  # every rank shards each Objective; rank 0 writes
            self.device = _dist.rank_device(self.device)
            _dist.init(self.device)
        self._memory_plans: dict = {}

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
        for pos, f in enumerate(files):
            try:
                ck = self.load(f)
                good.append((f, ck.step, pos))
                del ck
            except SamProbeError as exc:
                failed.append(UnitOutcome(str(f), None, "failed", error=str(exc), details=getattr(exc, "rows", None)))
        good.sort(key=lambda t: (t[1] is None, t[1] if t[1] is not None else t[2], t[2]))
        return [(f, s if s is not None else pos) for f, s, pos in good], failed

    def model_spec(self, ck: Checkpoint) -> tuple[str, dict[str, Any]]:
        s = self.settings
        saved = ck.model_spec or {}
        name = s.model or saved.get("name")
        if not name:
            from .loading.hf import config_path  # a weight file with config.json beside it
            name = "hf" if config_path(ck.path) is not None else None
        if not name:
            from .loading.models import ZOO
            raise SpecError(
                f"{ck.path}: the checkpoint does not name its model; pass --model (zoo: {', '.join(sorted(ZOO))}, "
                "or pkg.module:factory / file.py:factory)")
        args = dict(saved.get("args") or {}) if (not s.model or s.model == saved.get("name")) else {}
        args.update(s.model_args)
        return name, args

    def build_model(self, ck: Checkpoint) -> nn.Module:
        from .loading.models import build_model, factory_for

        name, args = self.model_spec(ck)
        from .loading import hf
        if hf.is_hf_spec(name):  # Hugging Face: the config.json beside the weights (loading/hf.py)
            torch.manual_seed(self.settings.seed)
            return hf.build_model(ck.path, name, args, expected_numel=ck.n_params)
        try:
            factory = factory_for(name)
            accepted = inspect.signature(factory).parameters
            for k, v in ck.hparams.items():
                if k in accepted and k not in args and isinstance(v, (int, float, str, bool, list)):
                    args[k] = v
        except (SpecError, TypeError, ValueError):
            pass
        torch.manual_seed(self.settings.seed)
        return build_model(name, args)

    def data(self, ck: Checkpoint | None = None):
        """The data selection (loaded once per session)."""
        from .loading.data import load_data

        s = self.settings
        spec = s.data or ((ck.hparams.get("data") if ck else None) if ck and isinstance(ck.hparams.get("data"), str) else None)
        if not spec:
            raise SpecError("no --data given and the checkpoint does not name its data; pass --data (e.g. digits)")
        key = str(spec)
        if key not in self._data:
            self._data[key] = load_data(spec, split=s.split, max_samples=s.max_samples, seed=s.seed, options=s.data_args)
        return self._data[key]

    def matched(self, ck: Checkpoint, model: nn.Module) -> Matched:
        return match_state(model, ck.state, ck.stripped_prefixes)

    def note(self, message: str) -> None:
        """A one-line fact on stderr, once per session (not under --quiet, only on rank 0)."""
        if message in self._noted or self.quiet or not _is_main():
            return
        self._noted.add(message)
        sys.stderr.write(f"note: {message}\n")

    def objective(self, ck: Checkpoint, model: nn.Module | None = None, data=None) -> Objective:
        """The loss of checkpoint ``ck`` over the session's data as an :class:`Objective`."""
        from .core.objective import is_causal_lm
        from .loading.losses import resolve_loss

        s = self.settings
        model = model or self.build_model(ck)
        data = data or self.data(ck)
        m = self.matched(ck, model)
        model.to(self.device)
        saved = ck.hparams.get("loss") if isinstance(ck.hparams.get("loss"), str) else None
        loss = s.loss or saved or ("lm" if is_causal_lm(model) else None) or (data.meta or {}).get("loss")
        name, fn = resolve_loss(loss)
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
        return obj

    # ------------------------------------------------------------ store
    def unit_meta(self, analysis: str, config: dict[str, Any], paths: list[str], shas: list[str],
                  step: int | None, model_spec: Any, seconds: float) -> dict[str, Any]:
        s = self.settings
        return {
            "sam_probe_version": __version__, "torch_version": torch.__version__,
            "analysis": analysis, "command": list(self.command), "config": config,
            "checkpoint": paths[0] if len(paths) == 1 else paths, "sha256": shas[0] if len(shas) == 1 else shas,
            "step": step if step is not None else -1, "model_spec": model_spec,
            "data_spec": self.settings.data_identity(), "seed": s.seed, "device": str(self.device),
            "dtype": s.dtype, "bn_mode": s.bn_mode, "wall_time": seconds, "host": socket.gethostname(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "pid": os.getpid(),
            "world_size": _world_size(),
        }

    def _key(self, analysis: str, config: dict[str, Any], shas: list[str]) -> str:
        s = self.settings
        ident = {"model": s.model, "model_args": s.model_args, "loss": s.loss, "dtype": s.dtype,
                 "bn_mode": s.bn_mode, "key": s.key, **s.data_identity()}
        return store.config_key(analysis, config, ident, shas)

    # ------------------------------------------------------------ drivers
    def per_checkpoint(self, analysis: str, target: str | Path, config: dict[str, Any],
                       compute: Callable[[Checkpoint, "Session", dict[str, Any]], dict[str, Any]]) -> list[UnitOutcome]:
        """Run ``compute(ckpt, session, state)`` on every checkpoint of ``target``.

        ``state`` is a dict carried from one checkpoint to the next (in step
        order), e.g. the previous parameters.
        """
        ordered, outcomes = self.ordered(target)
        label = run_label(target)
        carry: dict[str, Any] = {}
        for i, (path, step) in enumerate(ordered):
            self.progress(f"{analysis} {path.name}", i, len(ordered))
            carry["index"] = i
            carry["prev_path"] = str(ordered[i - 1][0]) if i else None
            outcomes.append(self._one(analysis, label, path, step, config, compute, carry))
        self.progress(analysis, len(ordered), len(ordered))
        outcomes.sort(key=lambda o: (o.step is None, o.step if o.step is not None else 0, o.path))
        return outcomes

    def _one(self, analysis, label, path, step, config, compute, carry) -> UnitOutcome:
        try:
            sha = file_sha256(path)
            unit = store.unit_path(self.settings.out, analysis, label, path.stem, self._key(analysis, config, [sha]))
            if self.settings.store and not self.settings.force and _stored(unit):
                result = from_store(store.read_unit(unit)[0]) if store.exists(unit) else None
                return UnitOutcome(str(path), step, "skipped", result=result, stored_at=str(unit))
            ck = self.load(path)
            ck.step = step
            t0 = time.perf_counter()
            result = compute(ck, self, carry)
            seconds = time.perf_counter() - t0
            result = {"path": str(path), "step": step, **result, "seconds": seconds}
            where = None
            if self.settings.store and _is_main():
                meta = self.unit_meta(analysis, config, [str(path)], [sha], step, self.model_spec_or_none(ck), seconds)
                where = str(store.write_unit(unit, result, meta))
            return UnitOutcome(str(path), step, "ok", result=result, stored_at=where)
        except SamProbeError as exc:
            return UnitOutcome(str(path), step, "failed", error=str(exc), details=getattr(exc, "rows", None))

    def model_spec_or_none(self, ck: Checkpoint) -> Any:
        try:
            name, args = self.model_spec(ck)
            return {"name": name, "args": args}
        except SamProbeError:
            return None

    def whole_run(self, analysis: str, target: str | Path, config: dict[str, Any],
                  compute: Callable[[list[Checkpoint], "Session"], dict[str, Any]],
                  name: str = "run") -> tuple[UnitOutcome, list[UnitOutcome]]:
        """Run ``compute(checkpoints, session)`` once over all good checkpoints of ``target``."""
        ordered, failed = self.ordered(target)
        if not ordered:
            raise CheckpointError(f"{target}: no readable checkpoints")
        return self.over_files(analysis, run_label(target), name, ordered, config, compute, origin=str(target)), failed

    def over_files(self, analysis: str, label: str, name: str, files: list[tuple[Path, int | None]],
                   config: dict[str, Any], compute: Callable[[list[Checkpoint], "Session"], dict[str, Any]],
                   origin: str) -> UnitOutcome:
        """One unit computed from several checkpoint files (keyed by all their sha256)."""
        shas = [file_sha256(p) for p, _ in files]
        unit = store.unit_path(self.settings.out, analysis, label, name, self._key(analysis, config, shas))
        if self.settings.store and not self.settings.force and _stored(unit):
            result = from_store(store.read_unit(unit)[0]) if store.exists(unit) else None
            return UnitOutcome(origin, None, "skipped", result=result, stored_at=str(unit))
        try:
            cks = []
            for p, step in files:
                ck = self.load(p)
                ck.step = step
                cks.append(ck)
            t0 = time.perf_counter()
            result = compute(cks, self)
        except SamProbeError as exc:
            return UnitOutcome(origin, None, "failed", error=str(exc), details=getattr(exc, "rows", None))
        seconds = time.perf_counter() - t0
        result = {**result, "seconds": seconds}
        where = None
        if self.settings.store and _is_main():
            meta = self.unit_meta(analysis, config, [str(p) for p, _ in files], shas, None,
                                  self.model_spec_or_none(cks[0]), seconds)
            where = str(store.write_unit(unit, result, meta))
        return UnitOutcome(origin, None, "ok", result=result, stored_at=where)


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


PACKED_KEYS = ("codes", "ire_flat")  # packed numpy arrays that analyses read back as they are


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
