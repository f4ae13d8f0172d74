"""Reading one checkpoint *file* of either format, from its content, verified in one pass.

- torch zip archives (``.pt/.pth/.ckpt/.bin``) and legacy torch pickles, read by
  :mod:`.safe_pickle` (restricted unpickler, inert placeholders); TorchScript
  archives are refused with advice;
- safetensors, read by :mod:`.safetensors_file` (header checked against the data).

Every file is hostile input: it is opened without blocking (FIFOs, devices and
sockets are refused), memory-mapped once, and unpickled only by the restricted
loader.  A zip archive's metadata members are verified before unpickling; its
tensor records' CRCs, the file's sha256 and the non-finite scan of the weights
are then one streaming pass (:mod:`.verify`).  The file sources of
:mod:`.sources` and the folder sources that hold such files all read through here.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from .archive import TorchZip
from .files import MappedFile, RefusedFile, display, map_file, read_head
from .safe_pickle import load_mapped
from .safetensors_file import load_safetensors
from .state import Checkpoint, from_object
from .verify import mapped_regions, tensor_counts, verified


def sniff(head: bytes) -> str:
    """``torch-zip``, ``safetensors``, ``torch-legacy`` or ``unknown`` from a file's first 16 bytes."""
    if head[:4] == b"PK\x03\x04":
        return "torch-zip"
    if len(head) >= 9:  # before the pickle test: a header length of 640 starts with 0x80 0x02 too
        (n,) = struct.unpack("<Q", head[:8])
        if 2 <= n < 100 * 2**20 and head[8:9] == b"{":
            return "safetensors"
    if len(head) >= 9 and head[0] == 0x80 and head[1] in (2, 3, 4, 5):
        return "torch-legacy"
    return "unknown"


def refused(path: str | Path, exc: RefusedFile) -> CheckpointError:
    """The one-line error for a refused file; ``--trust-checkpoint`` is offered only for the user's own objects."""
    if exc.kind == "foreign":
        return CheckpointError(f"{display(path)}: cannot be read safely: {exc}; if you wrote this file yourself, "
                               "pass --trust-checkpoint")
    return CheckpointError(f"{display(path)}: {exc}")


def detect_format(path: str | Path) -> str:
    """``torch-zip``, ``truncated-zip``, ``torchscript``, ``torch-legacy``, ``safetensors`` or ``unknown``."""
    try:
        fmt = sniff(read_head(path, 16))
        if fmt != "torch-zip":
            return fmt
        try:
            return "torchscript" if TorchZip(map_file(path), verify=False).torchscript else "torch-zip"
        except RefusedFile:
            return "truncated-zip"
    except RefusedFile as exc:
        raise refused(path, exc) from None


@dataclass
class Read:
    """One file read: its format, the object it holds, placeholder globals, safetensors metadata, and the
    mapping with the tensor records whose CRCs the verification pass still has to check."""

    format: str
    obj: Any
    placeholders: list[str]
    meta: dict[str, str]
    mapped: MappedFile
    records: list[Any]


def read_file(path: str | Path, *, trust: bool = False) -> Read:
    """Read one checkpoint file (module docstring); raise a one-line :class:`CheckpointError`."""
    try:
        mf = map_file(path)
        fmt = sniff(bytes(mf.data[:16]))
        if fmt == "unknown":
            raise RefusedFile("not a checkpoint (neither a torch file nor safetensors)", "unsupported")
        if fmt == "safetensors":
            state, meta = load_safetensors(mf)
            return Read(fmt, state, [], meta, mf, [])
        arc = TorchZip(mf, verify=True if trust else "metadata") if fmt == "torch-zip" else None
        obj, placeholders = load_mapped(mf, archive=arc, trust=trust)
        return Read(fmt, obj, placeholders, {}, mf, arc.unverified if arc is not None else [])
    except RefusedFile as exc:
        raise refused(path, exc) from None


def read_object(path: str | Path, *, trust: bool = False) -> tuple[str, Any, list[str], dict[str, str]]:
    """``(format, loaded object, placeholder globals, safetensors metadata)``, the file fully verified."""
    r = read_file(path, trust=trust)
    finish(path, r, {})
    return r.format, r.obj, r.placeholders, r.meta


def finish(path: str | Path, r: Read, state: dict[str, Any]) -> tuple[str, dict[str, int]]:
    """The verification pass over a read file: ``(sha256, non-finite entries per tensor of state)``."""
    try:
        sha, counts = verified(r.mapped, r.records, mapped_regions(r.mapped, list(state.values())))
        return sha, tensor_counts(r.mapped, state, counts)
    except RefusedFile as exc:
        raise refused(path, exc) from None


def load_file(path: str | Path, *, key: str | None = None, trust: bool = False, source: str = "") -> Checkpoint:
    """One checkpoint file as a :class:`Checkpoint`, verified, hashed and scanned in one pass."""
    r = read_file(path, trust=trust)
    ck = from_object(path, r.format, r.obj, r.placeholders, r.meta, key=key, trust=trust, source=source)
    ck.digest, ck.scanned = finish(path, r, ck.state)
    return ck
