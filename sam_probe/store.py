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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .atomic import atomic_write

KIND = "__kind__"
JSON_KEYS = "__json__"  # a group's attributes stored as JSON text (values HDF5 cannot hold as they are)
META = "__meta__"
RESULT = "result"


def config_key(*parts: Any) -> str:
    """Short stable hash of JSON-able parts (12 hex digits)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


MAX_NAME_BYTES = 160  # of a unit's file name and of its run folder's name (file systems allow 255)


def _short(name: str, keep: int = 96) -> str:
    """``name`` when it fits ``MAX_NAME_BYTES``, else its first ``keep`` characters and a hash of the whole."""
    if len(name.encode("utf-8", "surrogateescape")) <= MAX_NAME_BYTES:
        return name
    digest = hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:12]
    return f"{name[:keep]}~{digest}"


def unit_path(out: str | Path, analysis: str, run: str, name: str, key: str) -> Path:
    """``OUT/<analysis>/<run>/<name>-<key>.h5``; a run or unit name too long for a file name is cut and
    completed with a hash of the whole (names of any length get distinct paths)."""
    safe = "".join(c if c.isalnum() or c in "-_.=" else "_" for c in name)
    return Path(out) / analysis / _short(run) / f"{_short(safe)}-{key}.h5"


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
            if not all(_INT64[0] <= v <= _INT64[1] for v in value):
                return None  # kept as JSON text: HDF5 has no integers this large
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


_INT64 = (-(2**63), 2**63 - 1)


def _plain(v: Any) -> Any:
    """Builtin scalar for subclasses h5py rejects (e.g. ``torch.__version__``); storable text; an integer
    outside int64 as its decimal text (HDF5 has no larger integers)."""
    if isinstance(v, np.generic):
        return v
    if isinstance(v, int) and not isinstance(v, bool) and not _INT64[0] <= v <= _INT64[1]:
        return str(v)
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
            if arr is None:  # ragged or mixed lists, integers beyond int64: JSON text, named for the reader
                group.attrs[k] = json.dumps(v, default=str)
                group.attrs[JSON_KEYS] = json.dumps([*json.loads(group.attrs.get(JSON_KEYS, "[]")), k])
                continue
            big = arr.size > 4096 and arr.dtype.kind in "biuf"
            group.create_dataset(k, data=arr, compression="gzip" if big else None, shuffle=big)


class UnstorableResult(RuntimeError):
    """A computed value HDF5 cannot hold (the message names it); the result itself is kept and printed."""


STORE_CONSEQUENCE = ("the results above were computed but not stored: free space or pass another --out "
                     "(or --no-store)")


def describe_write_error(path: str | Path, out: str | Path, exc: Exception,
                         consequence: str = STORE_CONSEQUENCE) -> str:
    """One line naming where results could not be written and why (``exc``: an OSError, or the
    RuntimeError h5py raises when a write fails under it)."""
    import errno
    import shutil

    out = Path(out)
    if isinstance(exc, UnstorableResult):
        return f"cannot store {path}: {exc}; the results above were computed but not stored"
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
    with atomic_write(path) as tmp:
        with h5py.File(tmp, "w") as f:
            try:
                for k, v in meta.items():
                    if v is not None:
                        f.attrs[k] = _plain(v) if isinstance(v, (str, int, float, bool)) else json.dumps(v, default=str)
                _write(f.create_group(RESULT), result)
            except (OSError, RuntimeError):
                raise
            except Exception as exc:  # noqa: BLE001 - a value h5py cannot store: say which, keep the result
                raise UnstorableResult(f"a value cannot be stored in HDF5 ({type(exc).__name__}: "
                                       f"{str(exc).splitlines()[0][:160] if str(exc) else ''})") from None
            f.flush()
    return path


# ----------------------------------------------------------------- reading
def _attr(v: Any) -> Any:
    if isinstance(v, bytes):
        v = v.decode(errors="replace")
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
MIN_BUDGET = 256 << 20  # bytes any unit may declare, however small its file (bit-packed codes of 1B+ parameters)
MIN_TEXT = 16 << 20  # bytes of strings (vlen data, attributes) any unit may hold
TEXT_EXPANSION = 2  # ... or this many times its file's size (strings are not compressed; aliases are)
MAX_ITEMS = 1 << 18  # groups, datasets and attributes of one unit
MAX_ATTR_VALUES = 4096  # values of one non-string attribute (units write scalars only)
_PLAIN_KINDS = "biuf"


class ReadBudget:
    """What one unit may still declare and hold: dataset bytes ``max(MIN_BUDGET, EXPANSION x file size)``, string
    bytes (vlen data and attributes, by their real lengths) ``max(MIN_TEXT, TEXT_EXPANSION x file size)``, and
    ``MAX_ITEMS`` groups, datasets and attributes.  A file-wide ``total`` (a merged file) is charged what every
    unit read; a unit that exceeds its own budget is refused alone."""

    def __init__(self, f: h5py.File | None = None, *, size: int | None = None, total: "ReadBudget | None" = None):
        if size is None:
            try:
                size = os.path.getsize(f.filename) if f is not None else 0
            except OSError:
                size = 0
        self.size = size
        self.left = max(MIN_BUDGET, EXPANSION * size)
        self.text = max(MIN_TEXT, TEXT_EXPANSION * size)
        self.items = MAX_ITEMS
        self.total = total

    def unit(self) -> "ReadBudget":
        """A fresh budget for one unit of the same file, charging this one as its total."""
        return ReadBudget(size=self.size, total=self)

    def take(self, item: h5py.Dataset | int, what: str = "") -> None:
        n = item if isinstance(item, int) else int(item.size) * max(int(item.dtype.itemsize), 1)
        name = what or getattr(item, "name", "")
        self.left -= n
        if self.left < 0:
            raise UnsafeResults(f"{name}: declares {n:,} bytes, more than a file of this size can hold "
                                "(a compression bomb?)")
        if self.total is not None:
            self.total.take(n, f"{name} (all units of the file together)")

    def take_text(self, n: int, what: str) -> None:
        self.text -= n
        if self.text < 0:
            raise UnsafeResults(f"{what}: holds more text than a file of this size can (aliased strings?)")
        if self.total is not None:
            self.total.take_text(n, f"{what} (all units of the file together)")

    def count(self, what: str, n: int = 1) -> None:
        self.items -= n
        if self.items < 0:
            raise UnsafeResults(f"{what}: more than {MAX_ITEMS:,} groups, datasets and attributes in one unit")


def hard_member(group: h5py.Group, k: str) -> Any:
    """``group[k]`` if it is a hard link (soft, external and user-defined links are refused)."""
    link = group.get(k, getlink=True)
    if link is None:
        raise KeyError(k)
    if not isinstance(link, h5py.HardLink):
        raise UnsafeResults(f"{group.name}/{k}: a {type(link).__name__} (units hold no links to other objects "
                            "or files)")
    return group[k]


def _strings(item: Any, budget: ReadBudget, what: str) -> np.ndarray:
    """The vlen strings of a 0-d or 1-d dataset, read in blocks of at most (text left / file size) strings and
    charged by their real lengths: a string's bytes are stored once, however often it is aliased, so one is
    at most the file's size and a block never exceeds what the budget has left by more than one string."""
    if item.ndim == 0:
        blocks = [lambda: np.atleast_1d(item[()])]
        n = 1
    else:
        n = int(item.shape[0])
        blocks = []
    out = np.empty(n, dtype=object)
    i = 0
    while i < n:
        k = max(1, min(n - i, budget.text // max(budget.size, 4096)))
        block = blocks[0]() if blocks else item[i:i + k]
        texts = [a.decode(errors="replace") if isinstance(a, bytes) else str(a) for a in block]
        budget.take_text(sum(len(t) for t in texts) + 16 * len(texts), what)
        out[i:i + len(texts)] = texts
        i += max(1, len(texts))
    return out


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
    if is_str and h5py.check_vlen_dtype(dt) is not None:  # vlen: charged by the real lengths, block by block
        if item.ndim > 1:
            raise UnsafeResults(f"{item.name}: a {item.ndim}-d array of strings (units hold lists of strings)")
        return _strings(item, budget, item.name)
    arr = item[()]
    if is_str or dt.kind in "OS":
        budget.take_text(int(np.asarray(arr).nbytes), item.name)
        arr = np.array([a.decode(errors="replace") if isinstance(a, bytes) else str(a) for a in np.atleast_1d(arr)],
                       dtype=object)
    return arr


def _attributes(obj: h5py.HLObject, budget: ReadBudget) -> dict[str, Any]:
    """An object's attributes, each checked and charged before it is read (units write scalars only)."""
    out: dict[str, Any] = {}
    names = list(obj.attrs.keys())
    budget.count(f"{obj.name} attributes", len(names))
    for k in names:
        aid = obj.attrs.get_id(k)
        dt = aid.dtype
        shape = aid.shape or ()
        n = int(np.prod(shape)) if shape else 1
        is_str = h5py.check_string_dtype(dt) is not None
        if dt.fields is not None or h5py.check_dtype(ref=dt) is not None or not (is_str or dt.kind in _PLAIN_KINDS
                                                                                  or dt.kind == "b"):
            raise UnsafeResults(f"{obj.name}: attribute {k[:80]!r} is a {dt} (units hold plain numbers and strings)")
        if is_str and h5py.check_vlen_dtype(dt) is not None:
            if n != 1:
                raise UnsafeResults(f"{obj.name}: attribute {k[:80]!r} is an array of {n:,} strings (units write "
                                    "single values)")
            v = obj.attrs[k]  # one string: at most the file's size
            text = v.decode(errors="replace") if isinstance(v, bytes) else str(v)
            budget.take_text(len(text) + 64, f"{obj.name}: attribute {k[:80]!r}")
            out[k] = text
            continue
        if n > MAX_ATTR_VALUES:
            raise UnsafeResults(f"{obj.name}: attribute {k[:80]!r} holds {n:,} values (units write single values)")
        budget.take(n * max(int(dt.itemsize), 1), f"{obj.name}: attribute {k[:80]!r}")
        out[k] = _attr(obj.attrs[k])
    return out


def _read(group: Any, budget: ReadBudget | None = None, depth: int = 0) -> Any:
    """A unit's ``result`` group as nested dicts and lists (:class:`UnsafeResults` for anything a unit never
    holds: a dataset where a group belongs, list items that are not groups, nesting beyond ``MAX_DEPTH``)."""
    if depth > MAX_DEPTH:
        raise UnsafeResults(f"{group.name}: nested more than {MAX_DEPTH} levels deep")
    if not isinstance(group, h5py.Group):
        raise UnsafeResults(f"{group.name}: a {type(group).__name__} where a unit holds a group")
    budget = budget or ReadBudget(group.file)
    attrs = _attributes(group, budget)
    keys = list(group.keys())
    budget.count(group.name, len(keys))
    if attrs.get(KIND) == "list":
        items = [hard_member(group, k) for k in sorted(keys)]
        bad = next((it for it in items if not isinstance(it, h5py.Group)), None)
        if bad is not None:
            raise UnsafeResults(f"{bad.name}: a list item that is not a group")
        return [_read(it, budget, depth + 1) for it in items]
    out: dict[str, Any] = {_unkey(k): v for k, v in attrs.items() if k not in (KIND, JSON_KEYS)}
    for k in _json_keys(attrs, group.name):
        out[_unkey(k)] = _parse_json(attrs[k], f"{group.name}: attribute {k[:80]!r}")
    for k in keys:
        item = hard_member(group, k)
        if isinstance(item, h5py.Group):
            out[_unkey(k)] = _read(item, budget, depth + 1)
        elif isinstance(item, h5py.Dataset):
            out[_unkey(k)] = plain_dataset(item, budget)
        else:
            raise UnsafeResults(f"{group.name}/{k}: a {type(item).__name__} (units hold groups and datasets)")
    return out


MAX_JSON_DEPTH = 32


def _json_keys(attrs: dict[str, Any], where: str) -> list[str]:
    """The names in a group's :data:`JSON_KEYS` attribute that are string attributes of the group."""
    names = _parse_json(attrs.get(JSON_KEYS, "[]"), f"{where}: attribute {JSON_KEYS}")
    if not isinstance(names, list):
        raise UnsafeResults(f"{where}: attribute {JSON_KEYS} is not a list of names")
    return [k for k in names if isinstance(k, str) and k not in (KIND, JSON_KEYS) and isinstance(attrs.get(k), str)]


def _parse_json(text: Any, where: str) -> Any:
    """``text`` parsed as JSON (:class:`UnsafeResults` when it is not, or nests beyond ``MAX_JSON_DEPTH``)."""
    try:
        v = json.loads(text)
    except (TypeError, ValueError):
        raise UnsafeResults(f"{where}: not JSON text") from None
    except RecursionError:
        raise UnsafeResults(f"{where}: nests JSON too deeply") from None
    if not _json_depth_ok(v):
        raise UnsafeResults(f"{where}: nests JSON more than {MAX_JSON_DEPTH} levels deep")
    return v


def _json_depth_ok(v: Any) -> bool:
    """Whether parsed JSON nests at most ``MAX_JSON_DEPTH`` levels (checked without recursion)."""
    stack = [(v, 0)]
    while stack:
        x, d = stack.pop()
        if d > MAX_JSON_DEPTH:
            return False
        if isinstance(x, dict):
            stack += [(y, d + 1) for y in x.values()]
        elif isinstance(x, list):
            stack += [(y, d + 1) for y in x]
    return True


def read_meta(f: h5py.File | h5py.Group, budget: ReadBudget | None = None) -> dict[str, Any]:
    """A unit's attributes, its JSON ones (config, specs, command, shard plan) parsed; nesting beyond ``MAX_JSON_DEPTH``
    is refused (:class:`UnsafeResults`)."""
    meta = {}
    for k, v in _attributes(f, budget or ReadBudget(f.file)).items():
        if k in ("config", "model_spec", "data_spec", "command", "shard_plan") and isinstance(v, str):
            try:
                parsed = json.loads(v)
            except ValueError:
                parsed = v
            except RecursionError:
                raise UnsafeResults(f"{f.name}: attribute {k} nests JSON too deeply") from None
            if not _json_depth_ok(parsed):
                raise UnsafeResults(f"{f.name}: attribute {k} nests JSON more than {MAX_JSON_DEPTH} levels deep")
            v = parsed
        meta[k] = v
    return meta


class NotRegular(OSError):
    """A path named like a results file that is not a regular file (a FIFO would block the reader)."""


def _regular(path: Path) -> None:
    import stat

    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        what = "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a directory" if stat.S_ISDIR(st.st_mode) else \
            "a device or socket"
        raise NotRegular(f"is {what}, not a regular file")


def _open(path: str | Path) -> h5py.File:
    """``h5py.File(path, "r")`` of a regular file only (checked first: opening a FIFO blocks)."""
    _regular(Path(path))
    return h5py.File(path, "r")


READ_ERRORS = (OSError, KeyError, ValueError, TypeError, RecursionError, AttributeError, IndexError,
               UnicodeError, MemoryError, OverflowError, RuntimeError)


def read_unit(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(result, meta)`` of one unit file; arrays come back as numpy arrays.  Anything a unit never holds
    raises :class:`UnsafeResults` (a ``ValueError``); an unreadable file raises ``OSError``."""
    with _open(path) as f:
        budget = ReadBudget(f)
        try:
            return _read(hard_member(f, RESULT), budget), read_meta(f, budget)
        except (OSError, KeyError, UnsafeResults):
            raise
        except READ_ERRORS as exc:
            raise UnsafeResults(f"{_text(str(path))}: unreadable ({type(exc).__name__}: "
                                f"{_text(str(exc)).splitlines()[0][:120] if str(exc) else ''})") from None


def exists(path: str | Path) -> bool:
    """Whether a complete unit is stored at ``path`` (a corrupt file does not count)."""
    p = Path(path)
    try:
        with _open(p) as f:
            return RESULT in f
    except OSError:
        return False


def skip_reason(path: str | Path, exc: BaseException) -> str:
    """Why ``path`` is not a readable unit, in words (for :func:`iter_units`'s ``on_skip``)."""
    if isinstance(exc, NotRegular):
        return f"not read: {exc}"
    if isinstance(exc, KeyError):
        try:
            with _open(path) as f:
                if any(isinstance(g, h5py.Group) for g in f.values()):
                    return "a merged results file or a foreign HDF5 file (no top-level 'result' group)"
        except OSError:
            pass
        return "not a sam-probe unit (no 'result' group)"
    if isinstance(exc, UnsafeResults):
        return f"refused: {_text(str(exc))[:200]}"
    if isinstance(exc, RecursionError):
        return "refused: nested too deeply"
    if isinstance(exc, OSError):
        return f"unreadable HDF5, truncated or corrupt ({_text(str(exc)).splitlines()[0][:120]})"
    return f"unreadable result ({type(exc).__name__}: {_text(str(exc)).splitlines()[0][:120] if str(exc) else ''})"


def walk_h5(root: Path) -> Iterator[Path]:
    """Every ``*.h5`` entry under ``root`` in sorted path order, without recursion (any depth) and without
    following links to directories (no cycles); hidden ``.*`` entries (units being written) are left out."""
    stack = [root]
    found: list[Path] = []
    while stack:
        d = stack.pop()
        try:
            entries = list(os.scandir(d))
        except OSError:
            continue
        for e in entries:
            if e.name.startswith("."):
                continue
            try:
                if e.is_dir(follow_symlinks=False):
                    stack.append(Path(e.path))
                elif e.name.endswith(".h5"):
                    found.append(Path(e.path))
            except OSError:
                continue
    return iter(sorted(found))


def display_name(name: str) -> str:
    """A unit's name as text that HDF5, HTML and terminals accept (undecodable bytes as ``\\xNN``)."""
    return _text(name)


def iter_units(source: str | Path, on_skip: Callable[[str, str], None] | None = None
               ) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """``(name, result, meta)`` of every unit in a results folder or a merged file.

    Files that are not readable units (corrupt, truncated, foreign ``.h5``, FIFOs, crafted ones) are
    skipped; ``on_skip(name, reason)`` is called for each (hidden ``.*`` files, units still being written,
    are not reported).  Every unit is read within its own :class:`ReadBudget` (a merged file's units also
    within one total), so one refused unit never hides another.  A source that is not a folder or a
    regular file raises ``OSError``.
    """
    src = Path(source)
    if src.is_dir():
        for p in walk_h5(src):
            name = display_name(str(p.relative_to(src)))
            try:
                res, meta = read_unit(p)
            except READ_ERRORS as exc:
                if on_skip is not None:
                    on_skip(name, skip_reason(p, exc))
                continue
            yield name, res, meta
        return
    units: list[tuple[str, dict[str, Any], dict[str, Any]]] = []
    with _open(src) as f:
        total = ReadBudget(f)

        def skipped(name: str, exc: BaseException) -> None:
            if on_skip is not None:
                on_skip(name, skip_reason(src, exc) if not isinstance(exc, KeyError) else f"unreadable result ({exc})")

        stack: list[tuple[h5py.Group, str, int]] = [(f, "", 0)]
        while stack:  # depth-first, in name order, without recursion
            g, prefix, depth = stack.pop()
            later = []
            try:
                keys = sorted(g.keys())
            except READ_ERRORS as exc:
                skipped(prefix or "/", exc)
                continue
            for k in keys:
                name = display_name(f"{prefix}{k}")
                try:
                    if depth >= MAX_DEPTH:
                        raise UnsafeResults(f"{g.name}: nested more than {MAX_DEPTH} levels deep")
                    item = hard_member(g, k)
                    if not isinstance(item, h5py.Group):
                        continue
                    if RESULT not in item:
                        later.append((item, f"{prefix}{k}/", depth + 1))
                        continue
                    budget = total.unit()
                    units.append((name, _read(hard_member(item, RESULT), budget), read_meta(item, budget)))
                except READ_ERRORS as exc:
                    skipped(name, exc)
            stack += reversed(later)
    units.sort(key=lambda u: u[0])
    yield from units


def merge(source: str | Path, target: str | Path,
          on_skip: "Callable[[Path, str], None] | None" = None) -> int:
    """Copy every unit under ``source`` into one HDF5 file ``target`` (atomically); returns the count.

    Each unit is first read through the hardened reader (:func:`read_unit`'s checks and budget) on the
    same open file it is then copied from, so a unit ``report`` would refuse (links, external or virtual
    storage, compound types, bombs) is never copied or counted.  ``on_skip(path, reason)`` hears of every
    ``.h5`` file that is not copied (corrupt, truncated, not a sam-probe unit, refused)."""
    src = Path(source)
    target = Path(target)
    skip = on_skip or (lambda p, why: None)
    n = 0
    with atomic_write(target) as tmp:
        with h5py.File(tmp, "w") as out:
            for p in walk_h5(src):
                if p.resolve() == target.resolve():
                    continue
                try:
                    f = _open(p)
                except NotRegular as exc:
                    skip(p, f"not read: {exc}")
                    continue
                except OSError:  # unreadable or half-written foreign file: skip it
                    skip(p, "not a readable HDF5 file (corrupt or truncated)")
                    continue
                with f:
                    if RESULT not in f:
                        skip(p, "not a sam-probe result unit")
                        continue
                    try:
                        budget = ReadBudget(f)
                        _read(hard_member(f, RESULT), budget)
                        read_meta(f, budget)
                    except READ_ERRORS as exc:
                        skip(p, skip_reason(p, exc))
                        continue
                    g = out.require_group(display_name(str(p.relative_to(src).with_suffix(""))))
                    for k, v in f.attrs.items():
                        g.attrs[k] = v
                    f.copy(f[RESULT], g, name=RESULT)
                    n += 1
    return n
