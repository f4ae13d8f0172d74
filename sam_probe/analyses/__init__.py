"""The analysis registry: every module here that declares ``ANALYSIS`` is an analysis.

Adding an analysis means adding one module (its declaration, ``configure`` and
``compute``) and its tests; the command line, ``batch``, ``report`` and the
Python API pick it up from :func:`all_analyses`.
"""
from __future__ import annotations

import functools
import importlib
import pkgutil

from .base import CHECKPOINTS, PAIR, RUNS, Analysis, Option  # noqa: F401 - the public names


@functools.lru_cache(maxsize=1)
def _registry() -> dict[str, Analysis]:
    found: list[Analysis] = []
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_") or info.name == "base":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        decl = getattr(module, "ANALYSIS", None)
        if isinstance(decl, Analysis):
            found.append(decl)
    found.sort(key=lambda a: (a.order, a.name))
    return {a.name: a for a in found}


def all_analyses() -> list[Analysis]:
    """Every declared analysis, in listing order."""
    return list(_registry().values())


def names() -> tuple[str, ...]:
    return tuple(_registry())


def get(name: str) -> Analysis:
    """The analysis called ``name`` (a :class:`~sam_probe.errors.SpecError` naming the choices otherwise)."""
    reg = _registry()
    if name not in reg:
        from ..errors import SpecError, suggest

        raise SpecError(f"unknown analysis {name!r}{suggest(str(name), reg)}; choose one of {', '.join(reg)}")
    return reg[name]
