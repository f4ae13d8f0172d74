"""Opening a file the user named, as hostile input: never blocking, never read twice.

A FIFO, a socket, ``/dev/zero`` or a block device passed as a checkpoint is refused
from ``fstat`` of a descriptor opened with ``O_NONBLOCK`` (opening a FIFO for
reading would otherwise wait for a writer).  Regular files are memory-mapped
copy-on-write: format checks, CRC verification and the tensors themselves all
use the one mapping, so a large file is paged in once and never copied.  File
names are passed to ``os.open`` as given, so names that are not UTF-8 (valid on
Linux, seen by Python as surrogate escapes) load like any other.
"""
from __future__ import annotations

import mmap
import os
import stat
from dataclasses import dataclass

# why a file was refused: 'unsafe' (constructs sam-probe never executes), 'limit' (exceeds a work or size
# bound), 'corrupt' (damaged or inconsistent), 'unsupported' (a valid feature sam-probe does not read),
# 'foreign' (objects of the user's own classes that cannot be rebuilt without running their code)
KINDS = ("unsafe", "limit", "corrupt", "unsupported", "foreign")


def printable(text: str) -> str:
    """``text`` on one line with control characters escaped (names from a file cannot drive a terminal)."""
    text = " ".join(str(text).split())
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class RefusedFile(Exception):
    """A file sam-probe will not load; ``str(exc)`` is a one-line reason without the path."""

    def __init__(self, reason: str, kind: str = "corrupt"):
        assert kind in KINDS, kind
        super().__init__(printable(reason))
        self.kind = kind


_NOT_REGULAR = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory"))


def _require_regular(st: os.stat_result) -> None:
    if stat.S_ISREG(st.st_mode):
        return
    what = next((name for test, name in _NOT_REGULAR if test(st.st_mode)), "not a regular file")
    if what == "a directory":
        raise RefusedFile("is a directory; give a checkpoint file", "unsupported")
    raise RefusedFile(f"is {what}, not a regular file; give a checkpoint file", "unsupported")


def open_regular(path: str | os.PathLike) -> tuple[int, os.stat_result]:
    """``(descriptor, stat)`` of a regular file, opened read-only without ever blocking.

    The type is checked before opening (a socket cannot be opened at all) and
    again on the open descriptor (the path may have changed in between).
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        _require_regular(os.stat(path))
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise RefusedFile("no such file") from None
    except IsADirectoryError:
        raise RefusedFile("is a directory; give a checkpoint file", "unsupported") from None
    except OSError as exc:
        raise RefusedFile(f"cannot be opened ({exc.strerror or exc})", "unsupported") from None
    st = os.fstat(fd)
    try:
        _require_regular(st)
    except RefusedFile:
        os.close(fd)
        raise
    if flags & getattr(os, "O_NONBLOCK", 0):
        os.set_blocking(fd, True)
    return fd, st


def identity(st: os.stat_result) -> tuple[int, int, int, int, int]:
    """What identifies a file's bytes between two reads: device, inode, size, mtime and ctime (the last cannot
    be set back by the file's owner, so a rewrite in place always changes it)."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


@dataclass
class MappedFile:
    """A regular file mapped copy-on-write (``MAP_PRIVATE``): writes never reach the file."""

    path: str
    size: int
    data: mmap.mmap
    identity: tuple[int, int, int, int, int] = (0, 0, 0, 0, 0)

    def __len__(self) -> int:
        return self.size


_SPECIAL = "is a special file whose size the system does not report (e.g. under /proc), not a checkpoint"


def map_file(path: str | os.PathLike) -> MappedFile:
    """Map ``path`` (a regular, non-empty file) or raise :class:`RefusedFile`."""
    fd, st = open_regular(path)
    try:
        if st.st_size == 0:
            if os.read(fd, 1):  # /proc/self/environ & co: regular, size 0, yet readable
                raise RefusedFile(_SPECIAL, "unsupported")
            raise RefusedFile("empty file (0 bytes); the save was probably interrupted")
        try:
            data = mmap.mmap(fd, st.st_size, access=mmap.ACCESS_COPY)
        except (OSError, ValueError) as exc:
            raise RefusedFile(f"cannot be memory-mapped ({exc})", "unsupported") from None
    finally:
        os.close(fd)
    return MappedFile(os.fspath(path), st.st_size, data, identity(st))


def read_head(path: str | os.PathLike, n: int = 16) -> bytes:
    """The first ``n`` bytes of a regular file."""
    fd, st = open_regular(path)
    try:
        head = os.read(fd, n)
    finally:
        os.close(fd)
    if head and st.st_size == 0:
        raise RefusedFile(_SPECIAL, "unsupported")
    return head


def display(path: str | os.PathLike) -> str:
    """``path`` as text that can always be printed (undecodable bytes shown as ``\\xff``)."""
    text = os.fspath(path)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace") \
        if any("\udc80" <= c <= "\udcff" for c in text) else text



MAX_JSON = 64 * 2**20  # bytes of a JSON side file (config, shard index, trainer state) sam-probe reads


def read_json(path: str | os.PathLike, what: str, limit: int = MAX_JSON) -> dict:
    """A JSON object from a regular file of at most ``limit`` bytes, or a one-line ``CheckpointError``
    (a FIFO or device named like a side file is refused, never read; deep nesting is an error, not a crash)."""
    import json

    from ..errors import CheckpointError

    where = display(path)
    try:
        fd, st = open_regular(path)
    except RefusedFile as exc:
        raise CheckpointError(f"{where}: {what} {str(exc).split(';')[0]}; it must be a regular JSON file") from None
    try:
        if st.st_size > limit:
            raise CheckpointError(f"{where}: {what} is {st.st_size / 2**20:.0f} MiB, over the {limit // 2**20} MiB "
                                  "limit")
        with os.fdopen(fd, "rb") as f:
            fd = -1
            obj = json.loads(f.read(limit + 1))
    except CheckpointError:
        raise
    except (OSError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{where}: unreadable {what} ({type(exc).__name__}); re-save it") from None
    finally:
        if fd >= 0:
            os.close(fd)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{where}: {what} is not a JSON object")
    return obj
