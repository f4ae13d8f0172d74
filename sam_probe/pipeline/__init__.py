"""Running analyses over the checkpoints of a run: load, match, compute, store.

This layer ties loading, the pure core and the store together; it knows
nothing about terminals (progress is reported through a callback).  One concept
per module:

- :mod:`.boundary`: the trust boundary (what a checkpoint may choose: model, data, loss);
- :mod:`.build`: models, data selections and objectives, and the per-process cache;
- :mod:`.units`: the unit runner (reuse, compute, store; one failure never stops the others);
- :mod:`.outcome` / :mod:`.blame`: what happened to a unit, and whose error it was;
- :mod:`.session`: :class:`Session`, one command's state, implementing
  :class:`~.protocol.AnalysisSession`, the protocol analyses use.

Unit keys and attributes live beside the store (:mod:`sam_probe.store_keys`);
JSON conversion is torch-free (:mod:`sam_probe.results`).  The names below are
imported lazily: ``import sam_probe.pipeline`` loads no torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Session": ".session", "AnalysisSession": ".protocol",
    "UnitOutcome": ".outcome", "failure": ".outcome", "failed": ".outcome", "guarded": ".outcome",
    "run_analysis": ".units", "CACHE": ".build", "ProcessCache": ".build",
    "Settings": "..settings", "DTYPES": "..settings",
    "jsonable": "..results", "from_store": "..results", "without_packed": "..results", "PACKED_KEYS": "..results",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sam_probe.pipeline' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
