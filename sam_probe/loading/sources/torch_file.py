"""Source ``torch``: a file written by ``torch.save`` (zip archive since torch 1.6, or the legacy pickle format).

Read by sam-probe's restricted unpickler behind a bounded pre-scan (:mod:`...safe_pickle`):
objects the pickle names become inert placeholders, code-running globals refuse the
file; a zip archive's CRCs are verified in the same pass that hashes the file and
scans its weights (:mod:`...formats`, :mod:`...verify`).  Layouts (raw state dict,
Lightning, DDP / ``torch.compile`` prefixes, ``model``/``ema``/... keys) and steps
are found by :mod:`...state`.
"""
from __future__ import annotations

from pathlib import Path

from .base import FILE, Source


def _sniff(head: bytes) -> bool:
    from ..formats import sniff

    return sniff(head) in ("torch-zip", "torch-legacy")


def _load(path: Path, *, key: str | None = None, trust: bool = False):
    from ..formats import load_file

    return load_file(path, key=key, trust=trust, source=SOURCE.name)


def file_digest(path: Path) -> str:
    """sha256 of one checkpoint file (remembered per unchanged file)."""
    from ..formats import refused
    from ..files import RefusedFile
    from ..verify import file_sha256

    try:
        return file_sha256(path)
    except RefusedFile as exc:
        raise refused(path, exc) from None


SOURCE = Source(
    name="torch", kind=FILE, order=10,
    summary="torch.save file: zip archive or legacy pickle (.pt, .pth, .ckpt, .bin, .pkl, .tar), any layout",
    sniff=_sniff, load=_load, digest=file_digest, suffixes=(".pt", ".pth", ".ckpt", ".bin", ".pkl", ".tar"),
    step="step / global_step / iteration / epoch entry, else the file name",
)
