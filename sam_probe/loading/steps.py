"""A checkpoint's step: an integer in ``[0, 2^63)`` (what the store keeps as int64), from content or name.

A value that does not fit (``2**70``, ``-1``, ``"1e9"``, a 300-digit name) is not
a step: the next source of the step is used (the file name, else the position
in the run).  Torch-free: run discovery orders files by the step in their names.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from .plaindata import plain

MAX_STEP = 2**63 - 1
_NAME_STEP_RES = (
    re.compile(r"(?:^|[^a-z])step[=_-]?(\d+)", re.IGNORECASE),
    re.compile(r"(?:^|[^a-z])(?:iter|iteration|it)[=_-]?(\d+)", re.IGNORECASE),
    re.compile(r"(\d+)(?!.*\d)"),
)


def as_step(v: Any) -> int | None:
    """``v`` as a step: an integer (or integral float, or decimal digits) in ``[0, 2^63)``, else ``None``."""
    if isinstance(v, str):
        return int(v) if v.isascii() and v.isdigit() and len(v) <= 19 and int(v) <= MAX_STEP else None
    v = plain(v)
    if isinstance(v, bool):
        return None
    if isinstance(v, float) and v.is_integer() and abs(v) < 2.0**63:
        v = int(v)
    if isinstance(v, int) and 0 <= v <= MAX_STEP:
        return v
    return None


def step_from_name(path: str | Path) -> int | None:
    """The step written in a file name (``step_000172.pt``, ``epoch=3-step=1200.ckpt``, ``ckpt_172.pth``)."""
    stem = Path(path).name
    for ext in (".safetensors", ".ckpt", ".pth", ".pt", ".bin"):
        if stem.endswith(ext):
            stem = stem[: -len(ext)]
    for rx in _NAME_STEP_RES:
        m = rx.search(stem)
        if m:
            return as_step(m.group(1))
    return None
