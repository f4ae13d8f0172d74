"""HDF5 result store: one file per unit of work, written atomically.

A unit is (checkpoint or run) x analysis x configuration; its file is
``OUT/<analysis>/<run>/<name>-<key>.h5`` where ``key`` hashes the analysis
config, model/data specs and the checkpoints' sha256.  A unit is written to a
temporary name in the same folder, flushed, fsync'd, closed and renamed, so a
killed run never leaves a half-written result under a real name, and two
writers of the same unit only race to an atomic rename.

Results are nested dicts of JSON-like values and arrays:
dict -> group, list of dicts -> group of numbered groups, numbers/strings ->
attributes, arrays and numeric lists -> datasets.  h5py is used only here.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np

KIND = "__kind__"
META = "__meta__"
RESULT = "result"


def config_key(*parts: Any) -> str:
    """Short stable hash of JSON-able parts (12 hex digits)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def unit_path(out: str | Path, analysis: str, run: str, name: str, key: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_.=" else "_" for c in name)
    return Path(out) / analysis / run / f"{safe}-{key}.h5"


# ----------------------------------------------------------------- writing
def _to_array(value: Any) -> np.ndarray | None:
    if isinstance(value, np.ndarray):
        return value
    try:
        import torch
        if isinstance(value, torch.Tensor):
            return value.detach().cpu().numpy()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(value, (list, tuple)):
        if all(isinstance(v, str) for v in value) and value:
            return np.array([_text(v) for v in value], dtype=h5py.string_dtype())
        try:
            arr = np.array([np.nan if v is None else v for v in value] if value and not isinstance(value[0], (list, tuple)) else value, dtype=float)
        except (TypeError, ValueError):
            return None
        if value and all(isinstance(v, bool) for v in value):
            return arr.astype(bool)
        if value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return arr.astype(np.int64)
        return arr
    return None


def _text(v: str) -> str:
    """``v`` storable by HDF5: undecodable bytes of file names (lone surrogates) as ``\\xNN``."""
    try:
        v.encode("utf-8")
        return v
    except UnicodeEncodeError:
        return v.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _key(k: Any) -> str:
    """A dict key as an HDF5 name: ``/`` would nest groups and ``.`` alone is reserved, so
    ``%``, ``/`` and a leading ``.`` are percent-escaped (:func:`_unkey` undoes it)."""
    k = _text(str(k)).replace("%", "%25").replace("/", "%2F")
    return "%2E" + k[1:] if k.startswith(".") else (k or "%00")


def _unkey(k: str) -> str:
    if "%" not in k:
        return k
    return "" if k == "%00" else k.replace("%2E", ".", 1 if k.startswith("%2E") else 0).replace(
        "%2F", "/").replace("%25", "%")


def _plain(v: Any) -> Any:
    """Builtin scalar for subclasses h5py rejects (e.g. ``torch.__version__``); storable text."""
    if isinstance(v, np.generic):
        return v
    for t in (bool, int, float, str):
        if isinstance(v, t):
            return _text(str(v)) if t is str else t(v)
    return v


def _write(group: h5py.Group, data: dict[str, Any]) -> None:
    group.attrs[KIND] = "dict"
    for k, v in data.items():
        k = _key(k)
        if v is None:
            continue
        if isinstance(v, dict):
            _write(group.create_group(k), v)
        elif isinstance(v, (list, tuple)) and v and all(isinstance(x, dict) for x in v):
            g = group.create_group(k)
            g.attrs[KIND] = "list"
            g.attrs["length"] = len(v)
            for i, item in enumerate(v):
                _write(g.create_group(f"{i:06d}"), item)
        elif isinstance(v, (bool, int, float, str, np.generic)):
            group.attrs[k] = _plain(v)
        elif isinstance(v, (list, tuple)) and not v:
            group.create_dataset(k, data=np.zeros(0))
        else:
            arr = _to_array(v)
            if arr is None:
                group.attrs[k] = json.dumps(v, default=str)
                continue
            big = arr.size > 4096 and arr.dtype.kind in "biuf"
            group.create_dataset(k, data=arr, compression="gzip" if big else None, shuffle=big)


def file_mode() -> int:
    """``0666`` less the process umask: what ``open()`` would give (``mkstemp`` gives 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


STORE_CONSEQUENCE = ("the results above were computed but not stored: free space or pass another --out "
                     "(or --no-store)")


def describe_write_error(path: str | Path, out: str | Path, exc: Exception,
                         consequence: str = STORE_CONSEQUENCE) -> str:
    """One line naming where results could not be written and why (``exc``: an OSError, or the
    RuntimeError h5py raises when a write fails under it)."""
    import errno
    import shutil

    out = Path(out)
    code = getattr(exc, "errno", None)
    reason = getattr(exc, "strerror", None) or str(exc).splitlines()[0][:120]
    if code is None:  # h5py hides the errno: look at the disk
        try:
            if shutil.disk_usage(Path(path).parent).free < 2**20:
                code = errno.ENOSPC
        except OSError:
            pass
    if code == errno.ENOSPC:
        reason = "no space left on the device"
    elif code in (errno.EACCES, errno.EPERM, errno.EROFS):
        reason = "not writable" + (" (read-only file system)" if code == errno.EROFS else "")
    elif out.exists() and not out.is_dir():
        reason = "it is a file, not a directory"
    filename = getattr(exc, "filename", None)
    where = filename if isinstance(filename, str) else str(path)
    return f"cannot write {out} ({where}: {reason}); {consequence}"


def write_unit(path: str | Path, result: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Atomically write ``result`` with ``meta`` attributes to ``path`` (mode 0644 under the usual umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, file_mode())
    try:
        with h5py.File(tmp, "w") as f:
            for k, v in meta.items():
                if v is not None:
                    f.attrs[k] = _plain(v) if isinstance(v, (str, int, float, bool)) else json.dumps(v, default=str)
            _write(f.create_group(RESULT), result)
            f.flush()
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        try:
            dfd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:  # pragma: no cover - some filesystems refuse directory fsync
            pass
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


# ----------------------------------------------------------------- reading
def _attr(v: Any) -> Any:
    if isinstance(v, bytes):
        v = v.decode()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v


class UnsafeResults(ValueError):
    """A results file holds something a unit never does (links, external or virtual storage,
    reference or compound types, more data than its size can honestly hold, absurd nesting)."""


MAX_DEPTH = 32  # units nest dicts and lists a few levels deep
EXPANSION = 256  # datasets may declare at most this many times the file's size (compression bombs)
MIN_BUDGET = 256 << 20  # bytes any file may declare, however small (bit-packed codes of 1B+ parameters)
_PLAIN_KINDS = "biuf"


class ReadBudget:
    """Bytes the datasets of one file may still declare: ``max(MIN_BUDGET, EXPANSION × file size)``."""

    def __init__(self, f: h5py.File):
        try:
            size = os.path.getsize(f.filename)
        except OSError:
            size = 0
        self.left = max(MIN_BUDGET, EXPANSION * size)

    def take(self, item: h5py.Dataset) -> None:
        n = int(item.size) * max(int(item.dtype.itemsize), 1)
        self.left -= n
        if self.left < 0:
            raise UnsafeResults(f"{item.name}: declares {n:,} bytes, more than a file of this size can hold "
                                "(a compression bomb?)")


def hard_member(group: h5py.Group, k: str) -> Any:
    """``group[k]`` if it is a hard link (soft, external and user-defined links are refused)."""
    link = group.get(k, getlink=True)
    if link is None:
        raise KeyError(k)
    if not isinstance(link, h5py.HardLink):
        raise UnsafeResults(f"{group.name}/{k}: a {type(link).__name__} (units hold no links to other objects "
                            "or files)")
    return group[k]


def plain_dataset(item: h5py.Dataset, budget: ReadBudget) -> Any:
    """A dataset's values after the checks of :class:`UnsafeResults`: plain numbers and strings only."""
    if item.external or item.is_virtual:
        raise UnsafeResults(f"{item.name}: stored outside the file (external or virtual storage)")
    dt = item.dtype
    is_str = h5py.check_string_dtype(dt) is not None
    bad = (dt.fields is not None or h5py.check_dtype(ref=dt) is not None
           or (h5py.check_vlen_dtype(dt) is not None and not is_str) or not (is_str or dt.kind in _PLAIN_KINDS))
    if bad:
        raise UnsafeResults(f"{item.name}: a {dt} dataset (units hold plain numbers and strings)")
    budget.take(item)
    arr = item[()]
    if is_str or dt.kind in "OS":
        arr = np.array([a.decode(errors="replace") if isinstance(a, bytes) else str(a) for a in np.atleast_1d(arr)],
                       dtype=object)
    return arr


def _read(group: h5py.Group, budget: ReadBudget | None = None, depth: int = 0) -> Any:
    if depth > MAX_DEPTH:
        raise UnsafeResults(f"{group.name}: nested more than {MAX_DEPTH} levels deep")
    budget = budget or ReadBudget(group.file)
    if group.attrs.get(KIND) == "list":
        return [_read(hard_member(group, k), budget, depth + 1) for k in sorted(group.keys())]
    out: dict[str, Any] = {}
    for k, v in group.attrs.items():
        if k != KIND:
            out[_unkey(k)] = _attr(v)
    for k in group.keys():
        item = hard_member(group, k)
        if isinstance(item, h5py.Group):
            out[_unkey(k)] = _read(item, budget, depth + 1)
        else:
            out[_unkey(k)] = plain_dataset(item, budget)
    return out


def read_meta(f: h5py.File | h5py.Group) -> dict[str, Any]:
    meta = {}
    for k, v in f.attrs.items():
        v = _attr(v)
        if k in ("config", "model_spec", "data_spec", "command") and isinstance(v, str):
            try:
                v = json.loads(v)
            except ValueError:
                pass
        meta[k] = v
    return meta


def read_unit(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(result, meta)`` of one unit file; arrays come back as numpy arrays."""
    with h5py.File(path, "r") as f:
        return _read(hard_member(f, RESULT)), read_meta(f)


def exists(path: str | Path) -> bool:
    """Whether a complete unit is stored at ``path`` (a corrupt file does not count)."""
    p = Path(path)
    if not p.is_file():
        return False
    try:
        with h5py.File(p, "r") as f:
            return RESULT in f
    except OSError:
        return False


def skip_reason(path: str | Path, exc: BaseException) -> str:
    """Why ``path`` is not a readable unit, in words (for :func:`iter_units`'s ``on_skip``)."""
    if isinstance(exc, KeyError):
        try:
            with h5py.File(path, "r") as f:
                if any(isinstance(g, h5py.Group) for g in f.values()):
                    return "a merged results file or a foreign HDF5 file (no top-level 'result' group)"
        except OSError:
            pass
        return "not a sam-probe unit (no 'result' group)"
    if isinstance(exc, UnsafeResults):
        return f"refused: {str(exc)[:200]}"
    if isinstance(exc, RecursionError):
        return "refused: nested too deeply"
    if isinstance(exc, OSError):
        return f"unreadable HDF5, truncated or corrupt ({str(exc).splitlines()[0][:120]})"
    return f"unreadable result ({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''})"


def iter_units(source: str | Path, on_skip: Callable[[str, str], None] | None = None
               ) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """``(name, result, meta)`` of every unit in a results folder or a merged file.

    Files that are not readable units (corrupt, truncated, foreign ``.h5``) are
    skipped; ``on_skip(name, reason)`` is called for each (hidden ``.*`` files,
    units still being written, are not reported).
    """
    src = Path(source)
    if src.is_dir():
        for p in sorted(src.rglob("*.h5")):
            if p.name.startswith("."):
                continue
            try:
                res, meta = read_unit(p)
            except (OSError, KeyError, ValueError, TypeError, RecursionError) as exc:
                if on_skip is not None:
                    on_skip(str(p.relative_to(src)), skip_reason(p, exc))
                continue
            yield str(p.relative_to(src)), res, meta
        return
    with h5py.File(src, "r") as f:
        budget = ReadBudget(f)

        def skipped(name: str, exc: BaseException) -> None:
            if on_skip is not None:
                on_skip(name, skip_reason(src, exc) if not isinstance(exc, KeyError) else f"unreadable result ({exc})")

        def visit(g: h5py.Group, prefix: str, depth: int) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
            for k in g.keys():
                name = f"{prefix}{k}"
                try:
                    if depth >= MAX_DEPTH:
                        raise UnsafeResults(f"{g.name}: nested more than {MAX_DEPTH} levels deep")
                    item = hard_member(g, k)
                    if not isinstance(item, h5py.Group):
                        continue
                    if RESULT not in item:
                        yield from visit(item, f"{name}/", depth + 1)
                        continue
                    unit = (name, _read(hard_member(item, RESULT), budget), read_meta(item))
                except (OSError, KeyError, ValueError, TypeError, RecursionError) as exc:
                    skipped(name, exc)
                    continue
                yield unit
        yield from list(visit(f, "", 0))


def merge(source: str | Path, target: str | Path,
          on_skip: "Callable[[Path, str], None] | None" = None) -> int:
    """Copy every unit under ``source`` into one HDF5 file ``target`` (atomically); returns the count.

    ``on_skip(path, reason)`` hears of every ``.h5`` file that is not copied (corrupt,
    truncated, not a sam-probe unit)."""
    src = Path(source)
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    os.chmod(tmp, file_mode())
    skip = on_skip or (lambda p, why: None)
    n = 0
    try:
        with h5py.File(tmp, "w") as out:
            for p in sorted(src.rglob("*.h5")):
                if p.name.startswith(".") or p.resolve() == target.resolve():
                    continue
                try:
                    f = h5py.File(p, "r")
                except OSError:  # unreadable or half-written foreign file: skip it
                    skip(p, "not a readable HDF5 file (corrupt or truncated)")
                    continue
                with f:
                    if RESULT not in f:
                        skip(p, "not a sam-probe result unit")
                        continue
                    name = str(p.relative_to(src).with_suffix(""))
                    g = out.require_group(name)
                    for k, v in f.attrs.items():
                        g.attrs[k] = v
                    f.copy(f[RESULT], g, name=RESULT)
                    n += 1
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return n
