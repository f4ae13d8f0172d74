"""Writing a file atomically: readers see the old file or the new one, never half of one.

:func:`atomic_write` hands out a temporary name in the target's folder (so the
final rename never crosses a file system), with the permissions ``open()``
would give (:func:`file_mode`; ``mkstemp`` alone gives 0600); when the block
ends it flushes the file to disk (``fsync``), renames it over the target and
syncs the folder; when the block raises, the temporary file is removed and
the target is untouched.  Every file sam-probe writes (store units, merged
files, checkpoints, figures, HTML pages) goes through it.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def file_mode() -> int:
    """``0666`` less the process umask: what ``open()`` gives a new file (0644 under the usual umask)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_write(target: str | Path, *, suffix: str = ".tmp", fsync: bool = True) -> Iterator[str]:
    """``with atomic_write(path) as tmp: <write tmp>``: ``path`` replaced by ``tmp`` when the block
    succeeds (creating missing folders); nothing changed when it raises.  ``fsync=False`` for files
    that are cheap to remake (figures): the rename stays atomic, durability after a crash is not promised."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent)
    os.close(fd)
    try:
        os.chmod(tmp, file_mode())
        yield tmp
        if fsync:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, target)
        if fsync:
            _sync_folder(target.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _sync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (some file systems refuse: then it is as durable as they allow)."""
    try:
        dfd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover
        return
    try:
        os.fsync(dfd)
    except OSError:  # pragma: no cover - e.g. some network file systems
        pass
    finally:
        os.close(dfd)
