"""What an analysis may ask of the command running it: the :class:`AnalysisSession` protocol.

Analyses (``sam_probe/analyses/*.py``) receive a session and use only this:
loading checkpoints, the data selection, models and objectives built under the
trust rules, and the unit runner for analyses that make their own units
(``execute``).  :class:`~sam_probe.pipeline.session.Session` implements it; a
test double only needs these methods.  Torch-free at run time.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from torch import nn

    from ..analyses.base import Analysis
    from ..core.objective import Objective
    from ..errors import SamProbeError
    from ..loading.checkpoints import Checkpoint
    from ..loading.data import DataSelection
    from ..loading.matching import Matched
    from ..settings import Settings
    from .outcome import UnitOutcome

Config = dict[str, Any]  # what the analysis's configure() returned: keys the unit with the analysis version
Result = dict[str, Any]  # the unit's result (the analysis's JSON contract)
CheckpointCompute = Callable[["Checkpoint", "AnalysisSession", Config, dict[str, Any]], Result]
FilesCompute = Callable[[list["Checkpoint"], "AnalysisSession", Config], Result]


class AnalysisSession(Protocol):
    """The session an analysis's ``compute``/``execute`` receives."""

    settings: Settings

    def load(self, path: str | Path) -> Checkpoint:
        """The checkpoint at ``path`` (safe loading; non-finite weights refused unless allowed)."""
        ...

    def data(self, ck: Checkpoint | None = None) -> DataSelection:
        """The data selection: ``--data``, or the built-in data ``ck`` names (cached per command)."""
        ...

    def build_model(self, ck: Checkpoint) -> nn.Module:
        """A fresh, seeded model for ``ck`` (its weights not yet applied: see :meth:`matched`)."""
        ...

    def matched(self, ck: Checkpoint, model: nn.Module) -> Matched:
        """``ck``'s tensors as ``model``'s parameters and buffers (the model is not modified)."""
        ...

    def objective(self, ck: Checkpoint, model: nn.Module | None = None,
                  data: DataSelection | None = None) -> Objective:
        """The loss of ``ck`` over the data as an :class:`~sam_probe.core.objective.Objective`."""
        ...

    def per_checkpoint(self, analysis: Analysis, target: str | Path, config: Config,
                       compute: CheckpointCompute) -> list[UnitOutcome]:
        """``compute(ck, session, config, carry)`` as one unit per checkpoint of ``target``, in step order."""
        ...

    def over_files(self, analysis: Analysis, label: str, name: str, files: list[tuple[Path, int | None]],
                   config: Config, compute: FilesCompute, origin: str) -> UnitOutcome:
        """``compute(checkpoints, session, config)`` as one unit keyed by every file's sha256."""
        ...

    def ordered(self, target: str | Path) -> tuple[list[tuple[Path, int | None]], list[UnitOutcome]]:
        """The readable checkpoints of run ``target`` as ``(path, step)`` in step order, and a failed
        outcome for each file that could not be read."""
        ...

    def guarded(self, target: Any, fn: Callable[[], list[UnitOutcome]]) -> list[UnitOutcome]:
        """``fn()``, or one failed outcome for ``target`` when it raises a user error."""
        ...

    def failed(self, target: Any, error: str | SamProbeError, step: int | None = None) -> UnitOutcome:
        """One failed outcome for ``target`` with a one-line ``error``."""
        ...
