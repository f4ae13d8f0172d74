"""One command's state behind the :class:`~sam_probe.pipeline.protocol.AnalysisSession` protocol.

The session holds what a command shares between its units (settings, device,
loaded checkpoints, the data selection, notes, the first store error) and
forwards each request to the module that owns the concept: choices to
:mod:`.boundary`, building to :mod:`.build`, running units to :mod:`.units`.
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointError, SamProbeError, opt, render
from ..settings import Settings
from . import boundary, build, units
from .outcome import Progress, UnitOutcome, failed, guarded, no_progress
from .protocol import CheckpointCompute, FilesCompute

if TYPE_CHECKING:
    from torch import nn

    from ..analyses.base import Analysis
    from ..core.objective import Objective
    from ..loading.checkpoints import Checkpoint
    from ..loading.data import DataSelection
    from ..loading.matching import Matched


class Session:
    """Shared state of one command: settings, the cached data selection and models (see module docstring)."""

    def __init__(self, settings: Settings, command: list[str] | None = None, progress: Progress | None = None,
                 on_unit: Callable[[UnitOutcome], None] | None = None, warn: Callable[[str], None] | None = None):
        from .. import distributed

        self.settings = settings
        self._warn = warn
        self.notes: list[str] = []  # warnings about the whole command, each once
        self.command = command if command is not None else list(sys.argv)
        self.progress: Progress = progress or no_progress
        self.on_unit = on_unit
        self.data_pool: dict[str, Any] = {}  # data selections of this command (without the process cache)
        self.layouts: dict[str, str] = {}  # checkpoint path -> the prefixes matching stripped
        self.loaded: dict[str, Checkpoint] = {}  # checkpoints read while ordering a run, used once
        self.used_data: dict[str, Any] | None = None  # the data spec and size the last objective used
        self.memory_plans: dict[Any, Any] = {}
        self.shard_plan: dict[str, Any] | None = None  # --shard-model: what one rank holds (stored with units)
        self.store_failed: str | None = None  # the first write error: later units are not attempted
        self.device = settings.torch_device()
        self.dtype = settings.torch_dtype()
        if settings.distributed or settings.shard_model or distributed.launched():  # every rank shards each Objective; rank 0 writes
            self.device = distributed.rank_device(self.device)
            distributed.init(self.device)

    def note(self, message: str) -> None:
        """A one-line fact about the command's settings, said once (rank 0 only)."""
        from .. import distributed

        message = render(message)
        if message not in self.notes:
            self.notes.append(message)
            if self._warn is not None and distributed.is_main():
                self._warn(message)

    # ------------------------------------------------------------ inputs
    def load(self, path: str | Path) -> Checkpoint:
        """The checkpoint at ``path`` (safe loading; non-finite weights refused unless allowed).
        With ``--shard-model`` a source that can (a DCP folder) reads it lazily: meta tensors whose rows each
        rank reads when it fills its shards, scanned then (:func:`.build.sharded_objective`)."""
        from ..loading.checkpoints import load_checkpoint

        s = self.settings
        ck = load_checkpoint(path, key=s.key, trust=s.trust_checkpoint, lazy=s.shard_model)
        self.refuse_nonfinite(path, ck.nonfinite())
        return ck

    def refuse_nonfinite(self, path: str | Path, bad: dict[str, int]) -> None:
        """The one-line refusal of non-finite weights (``{name: count}``), unless ``--allow-nonfinite``."""
        if bad and not self.settings.allow_nonfinite:
            names = ", ".join(f"{n} ({c})" for n, c in list(bad.items())[:4])
            more = f" and {len(bad) - 4} more" if len(bad) > 4 else ""
            raise CheckpointError(f"{path}: non-finite weights in {names}{more}; pass {opt('allow_nonfinite')} to "
                                  "continue anyway")

    def model_spec(self, ck: Checkpoint) -> tuple[str, dict[str, Any]]:
        """The model name and keyword arguments (:func:`~sam_probe.pipeline.boundary.resolve_model`)."""
        from ..loading.hf import config_path

        from ..loading import peft

        if peft.is_adapter(ck):  # a LoRA adapter: the base model's spec, with the adapter's settings
            return peft.model_spec(self, ck)
        saved = ck.model_spec or {}
        hf_config = not self.settings.model and not saved.get("name") and config_path(ck.path) is not None
        return boundary.resolve_model(self.settings, saved, ck.path, hf_config)

    def model_spec_or_none(self, ck: Checkpoint) -> dict[str, Any] | None:
        try:
            name, args = self.model_spec(ck)
            return {"name": name, "args": args}
        except SamProbeError:
            return None

    def data_spec(self, ck: Checkpoint | None) -> tuple[str, dict[str, Any]]:
        """The data spec and arguments (:func:`~sam_probe.pipeline.boundary.resolve_data`)."""
        return boundary.resolve_data(self.settings, ck.hparams if ck is not None else None,
                                     ck.path if ck is not None else None)

    def loss_name(self, ck: Checkpoint, data: DataSelection, model: nn.Module | None = None) -> str | None:
        """The loss spec (:func:`~sam_probe.pipeline.boundary.resolve_loss`)."""
        from ..core.objective import is_causal_lm

        return boundary.resolve_loss(self.settings, ck.hparams, ck.path,
                                     causal_lm=model is not None and is_causal_lm(model),
                                     data_default=(data.meta or {}).get("loss"))

    def build_model(self, ck: Checkpoint) -> nn.Module:
        return build.build_model(self, ck)

    def data(self, ck: Checkpoint | None = None) -> DataSelection:
        return build.select_data(self, ck)

    def matched(self, ck: Checkpoint, model: nn.Module) -> Matched:
        """``ck``'s tensors matched to ``model``'s parameters and buffers."""
        from ..loading import peft
        from ..loading.matching import match_state

        if peft.is_adapter(ck) and self.settings.merge_adapter:  # the base's tensors with the adapter merged in
            return peft.merged(self, ck, model)
        m = match_state(model, ck.state, ck.stripped_prefixes)
        self.layouts[ck.path] = m.layout
        return m

    def objective(self, ck: Checkpoint, model: nn.Module | None = None, data: DataSelection | None = None) -> Objective:
        """The loss of checkpoint ``ck`` over the session's data as an :class:`Objective`."""
        return build.build_objective(self, ck, model, data)

    def source(self, ck: Checkpoint) -> dict[str, Any]:
        """Where a result's weights came from: format, layout (prefixes stripped or inferred), step source,
        and the checkpoint's scalar training hyper-parameters (optimizer, lr, rho, switch_step, ...)."""
        hparams = {str(k)[:64]: (v[:200] if isinstance(v, str) else v) for k, v in list(ck.hparams.items())[:64]
                   if v is None or isinstance(v, (bool, int, float, str))}
        prefix = self.layouts.get(ck.path) or " + ".join(ck.stripped_prefixes) or None
        return {"format": ck.format, "layout": ck.layout, "prefix": prefix or None,
                "step_source": ck.step_source, "hparams": hparams}

    # ------------------------------------------------------------ units
    def per_checkpoint(self, analysis: Analysis, target: str | Path, config: dict[str, Any],
                       compute: CheckpointCompute) -> list[UnitOutcome]:
        return units.per_checkpoint(self, analysis, target, config, compute)

    def whole_run(self, analysis: Analysis, target: str | Path, config: dict[str, Any],
                  compute: FilesCompute, name: str = "run") -> tuple[UnitOutcome, list[UnitOutcome]]:
        return units.whole_run(self, analysis, target, config, compute, name)

    def over_files(self, analysis: Analysis, label: str, name: str, files: list[tuple[Path, int | None]],
                   config: dict[str, Any], compute: FilesCompute, origin: str) -> UnitOutcome:
        return units.over_files(self, analysis, label, name, files, config, compute, origin)

    def ordered(self, target: str | Path) -> tuple[list[tuple[Path, int | None]], list[UnitOutcome]]:
        return units.ordered(self, target)

    @staticmethod
    def guarded(target: Any, fn: Callable[[], list[UnitOutcome]]) -> list[UnitOutcome]:
        return guarded(target, fn)

    @staticmethod
    def failed(target: Any, error: str | SamProbeError, step: int | None = None) -> UnitOutcome:
        return failed(target, error, step)


if TYPE_CHECKING:
    from .protocol import AnalysisSession

    def _implements(session: Session) -> AnalysisSession:  # mypy checks Session against the protocol
        return session
