"""``--loss`` specs: a registered loss name or a user function ``pkg.module:fn`` / ``file.py:fn``.

The function is called per chunk as ``fn(outputs, targets)`` (or ``fn(outputs,
targets, batch)`` when it takes three arguments) and returns one loss per sample
(``[B]``) or ``(per-token losses, mask)``; see :mod:`sam_probe.core.losses`.
"""
from __future__ import annotations

from typing import Any, Callable

from ..core.names import LOSSES
from ..errors import SpecError, suggest
from .models import import_factory, is_factory_spec


def resolve_loss(spec: str | None) -> tuple[str | None, Callable[..., Any] | None]:
    """``(name, None)`` for a built-in loss (or ``None``), ``(spec, fn)`` for a user function."""
    if spec is None or spec in LOSSES:
        return spec, None
    if is_factory_spec(spec):
        return spec, import_factory(spec, "loss")
    raise SpecError(f"unknown loss{suggest(spec, LOSSES)}; use {', '.join(LOSSES)}, pkg.module:fn or "
                    "path/to/file.py:fn", option="loss", value=spec)
