"""Source ``safetensors``: a ``.safetensors`` file (header checked to describe its data exactly).

Read by :mod:`...safetensors_file` (tensors are views of the memory-mapped file);
the step and hyper-parameters come from its ``__metadata__`` (``step``,
``hparams``/``model_spec`` as JSON text).  The format carries no checksum: the
one pass hashes the file and scans its weights for NaN/Inf.
"""
from __future__ import annotations

from pathlib import Path

from .base import FILE, Source
from .torch_file import file_digest


def _sniff(head: bytes) -> bool:
    from ..formats import sniff

    return sniff(head) == "safetensors"


def _load(path: Path, *, key: str | None = None, trust: bool = False):
    from ..formats import load_file

    return load_file(path, key=key, trust=trust, source=SOURCE.name)


SOURCE = Source(
    name="safetensors", kind=FILE, order=20,
    summary="safetensors file (.safetensors), step and hyper-parameters from its metadata",
    sniff=_sniff, load=_load, digest=file_digest, suffixes=(".safetensors",),
    step="metadata step / global_step, else the file name",
)
