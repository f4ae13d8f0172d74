"""The registry of checkpoint sources: every module of this package that defines ``SOURCE``.

Adding a source (a new file format or folder layout) is one module here plus its
tests: define ``SOURCE = Source(...)`` (:mod:`.base`); the registry imports the
module, run discovery (:func:`discover`) and loading (:func:`load`, :func:`digest`)
ask it about every path, and the README table and help texts come from
:func:`table` / :func:`help_text`.  Source modules import nothing heavy at
import time (``--help`` lists them without importing torch).

Dispatch: a directory is offered to the folder sources (``claims``), then to the
run sources (``members``); a directory none of them claims is a run of files.
A file is offered to the file sources by its first 16 bytes.
"""
from __future__ import annotations

import fnmatch
import importlib
import pkgutil
from pathlib import Path

from ...errors import CheckpointError
from ..files import RefusedFile, display, read_head
from .base import FILE, FOLDER, RUN, Source

__all__ = ["FILE", "FOLDER", "RUN", "Source", "checkpoint_files", "digest", "discover", "get", "help_text", "is_checkpoint", "load",
           "markdown_table", "of", "registry", "table"]

_REGISTRY: list[tuple[Source, ...]] = []


def registry() -> tuple[Source, ...]:
    """Every registered source, in the order they are asked."""
    if not _REGISTRY:
        found: dict[str, Source] = {}
        for info in pkgutil.iter_modules(__path__):
            if info.name == "base" or info.name.startswith("_"):
                continue
            module = importlib.import_module(f"{__name__}.{info.name}")
            src = getattr(module, "SOURCE", None)
            if not isinstance(src, Source):
                raise TypeError(f"{module.__name__} defines no SOURCE = Source(...)")
            if src.name in found:
                raise TypeError(f"two checkpoint sources are named {src.name!r}")
            found[src.name] = src
        _REGISTRY.append(tuple(sorted(found.values(), key=lambda s: (s.order, s.name))))
    return _REGISTRY[0]


def get(name: str) -> Source:
    for s in registry():
        if s.name == name:
            return s
    raise KeyError(name)


def _kind(kind: str) -> list[Source]:
    return [s for s in registry() if s.kind == kind]


def suffixes() -> tuple[str, ...]:
    """Suffixes of the files a run directory contributes (union over the file sources)."""
    return tuple(dict.fromkeys(x for s in _kind(FILE) for x in s.suffixes))


def _folder(path: Path) -> Source | None:
    return next((s for s in _kind(FOLDER) if s.claims(path)), None)  # type: ignore[misc]


def of(path: str | Path) -> Source:
    """The source that reads ``path``; a one-line :class:`CheckpointError` when none does."""
    p = Path(path)
    if p.is_dir():
        src = _folder(p)
        if src is None:
            kinds = "; ".join(f"{s.summary}" for s in _kind(FOLDER))
            raise CheckpointError(f"{display(p)}: is a directory that is not a checkpoint sam-probe reads ({kinds}); "
                                  "give a checkpoint file or such a folder")
        return src
    try:
        head = read_head(p, 16)
    except RefusedFile as exc:
        from ..formats import refused

        raise refused(p, exc) from None
    src = next((s for s in _kind(FILE) if s.sniff(head)), None)  # type: ignore[misc]
    if src is None:
        if not head:
            raise CheckpointError(f"{display(p)}: empty file (0 bytes); the save was probably interrupted")
        names = " or ".join(s.name for s in _kind(FILE))
        raise CheckpointError(f"{display(p)}: not a checkpoint (not a {names} file)")
    return src


def is_checkpoint(path: str | Path) -> bool:
    """A regular file, or a directory that a folder source claims (one checkpoint, not a run)."""
    p = Path(path)
    return p.is_file() or (p.is_dir() and _folder(p) is not None)


def load(path: str | Path, *, key: str | None = None, trust: bool = False, lazy: bool = False):
    """Read the checkpoint at ``path`` through its source (a :class:`~sam_probe.loading.state.Checkpoint`);
    ``lazy``: through its lazy loader where it has one (meta tensors read by rows on demand)."""
    src = of(path)
    fn = src.load_lazy if lazy and src.load_lazy is not None else src.load
    return fn(Path(path), key=key, trust=trust)  # type: ignore[misc]


def digest(path: str | Path) -> str:
    """The sha256 identifying a checkpoint's bytes (keys stored results); remembered per unchanged file."""
    return of(path).digest(Path(path))  # type: ignore[misc]


def checkpoint_files(path: str | Path) -> list[Path]:
    """The regular files one checkpoint consists of ([path] for a file)."""
    p = Path(path)
    src = _folder(p) if p.is_dir() else None
    return src.files(p) if src is not None and src.files is not None else [p]


def discover(target: str | Path, glob: str | None = None) -> list[Path]:
    """The checkpoints named by ``target`` (a file, a folder checkpoint, a run of folders, or a directory of
    checkpoint files), in step order for runs of folders and in name order (by the step in the name) for files.

    In a directory of files every file with a checkpoint suffix is taken (not recursing), or those matching
    ``glob``; the caller orders them by step once loaded.  Entries that are not regular files (a FIFO named
    ``x.pt``) are kept, so that loading reports them instead of skipping them silently; nothing is opened here.
    """
    from ..steps import step_from_name

    p = Path(target)
    if not p.exists():
        raise CheckpointError(f"{display(p)}: no such file or directory")
    if not p.is_dir():  # a file, or a FIFO/device/socket that loading refuses with its own message
        return [p]
    if _folder(p) is not None:
        return [p]
    for src in _kind(RUN):
        members = src.members(p, lambda d: _folder(d) is not None)  # type: ignore[misc]
        if members:
            return members
    files = [f for f in sorted(p.iterdir()) if not f.is_dir()]
    if glob:
        files = [f for f in files if fnmatch.fnmatch(f.name, glob)]
    else:
        files = [f for f in files if f.suffix.lower() in suffixes()]
    if not files:
        what = f"matching {glob!r} " if glob else ""
        raise CheckpointError(f"{display(p)}: no checkpoint files {what}in this directory (use --glob PATTERN to "
                              "choose them)")
    named = [(step_from_name(f), f.name, f) for f in files]
    named.sort(key=lambda t: (t[0] is None, t[0] if t[0] is not None else 0, t[1]))
    return [f for _, _, f in named]


def table() -> list[tuple[str, str, str, str]]:
    """``(name, kind, what it reads, where its step comes from)`` for every source (README, help)."""
    return [(s.name, s.kind, s.summary, s.step) for s in registry()]


def markdown_table() -> str:
    """The README's table of sources (regenerate with ``python -m sam_probe.loading.sources``)."""
    rows = ["| source | kind | what it reads | step from |", "|---|---|---|---|"]
    rows += [f"| `{name}` | {kind} | {summary} | {step or '-'} |" for name, kind, summary, step in table()]
    return "\n".join(rows)


def help_text() -> str:
    """One line for a CHECKPOINT argument's help: every source by name."""
    return "A checkpoint file or folder, or a run directory of them; sources: " + ", ".join(
        s.name for s in registry()) + " (see README, 'Checkpoints it reads')."
