"""What a checkpoint *source* is: one file format or folder layout sam-probe reads, declared once.

A source is one module of :mod:`sam_probe.loading.sources` that defines
``SOURCE = Source(...)``; the registry (the package) finds it by itself, run
discovery asks it about every path, and the help texts and the README table are
generated from its ``name`` and ``summary``.  Three kinds:

- ``file``: a checkpoint file recognised from its first 16 bytes (``sniff``); a
  run directory contributes its files whose suffix is in ``suffixes``;
- ``folder``: a directory that is one checkpoint (``claims(dir)``, cheap: names
  and small files only), read as a whole;
- ``run``: a directory of checkpoints of other sources in step order
  (``members(dir, is_folder_checkpoint)``, ``None`` when it is not one).

``load(path, key=, trust=)`` returns a :class:`~sam_probe.loading.state.Checkpoint`
whose ``digest`` (the sha256 keying stored results) and non-finite scan come
from the same pass that verified the bytes; ``digest(path)`` gives the same
sha256 without loading (remembered per file, so a checkpoint is read once).
``files(path)`` lists the regular files a checkpoint consists of.  ``load_lazy``
(optional, same arguments) returns one whose state holds meta tensors and whose
``lazy`` reads rows of them on demand (``--shard-model``: each rank reads its rows).  Every byte
of every file is hostile input: a source reads pickles only through the
bounded, inert loader (:mod:`..safe_pickle`), opens only regular files inside
its folder, and raises a one-line :class:`~sam_probe.errors.CheckpointError`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

FILE, FOLDER, RUN = "file", "folder", "run"


@dataclass(frozen=True)
class Source:
    name: str
    kind: str
    summary: str  # one line: what it reads (help texts and the README table)
    load: Callable[..., Any] | None = None  # (path, *, key, trust) -> Checkpoint (file and folder sources)
    digest: Callable[[Path], str] | None = None  # path -> sha256 (file and folder sources)
    files: Callable[[Path], list[Path]] | None = None  # path -> the regular files it reads
    sniff: Callable[[bytes], bool] | None = None  # file sources: first 16 bytes -> whether it is theirs
    suffixes: tuple[str, ...] = ()  # file sources: names a run directory contributes
    claims: Callable[[Path], bool] | None = None  # folder sources: whether a directory is one of theirs
    members: Callable[..., list[Path] | None] | None = None  # run sources: (dir, is_folder_checkpoint) -> in step order
    order: int = 50  # asked in this order (lower first)
    step: str = ""  # where its step comes from (README table)
    load_lazy: Callable[..., Any] | None = None  # like load, meta tensors + a row reader (Checkpoint.lazy)

    def __post_init__(self) -> None:
        need = {FILE: ("load", "digest", "sniff"), FOLDER: ("load", "digest", "claims"), RUN: ("members",)}
        missing = [n for n in need.get(self.kind, ("kind",)) if getattr(self, n, None) is None]
        if missing:
            raise TypeError(f"checkpoint source {self.name!r} ({self.kind}) lacks {', '.join(missing)}")
