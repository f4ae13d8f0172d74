"""Loading torch files without ever running their code, with bounded work.

Both torch formats are read here, by sam-probe itself, with torch's restricted
``weights_only`` unpickler doing the unpickling:

- **zip** (``torch.save`` since 1.6): the archive is verified first (layout and
  the CRC-32 of every member, :mod:`.archive`); ``data.pkl`` is pre-scanned
  (:mod:`.pickle_scan`) and unpickled; each tensor record it references must
  exist and hold exactly the bytes the pickle claims, and becomes a storage over
  the memory-mapped file (no copy).
- **legacy** (``_use_new_zipfile_serialization=False``): the magic number,
  protocol and system-information pickles, then the main pickle and the list of
  storage keys, each pre-scanned; the storages the pickle claims must fit in the
  bytes that follow it, and are filled from the file, each checked against the
  element count the file records for it.  **Legacy files carry no checksum**:
  damaged tensor bytes cannot be detected, only bad structure.  Every other bound
  applies.

Globals the pickle names are resolved before unpickling: torch's own
allow-list (tensors, storages, ``OrderedDict``, ...), the numpy recorders of
:mod:`.numpy_safe` (validated rebuild of plain arrays and scalars), and for
every other name an inert :class:`Placeholder`.  Globals that can run code
(:func:`is_dangerous`; torch also blocks ``os``/``sys``) refuse the file before
anything is unpickled.  Storages are never resizable, so a tensor whose storage
is too small for its size and stride is refused by torch's ``set_``.

Full unpickling (``trust=True``) is the caller's explicit, loud opt-in; zip
archives are still verified first.
"""
from __future__ import annotations

import io
import pickle
import pickletools
import re
import struct
import sys
import warnings
from typing import Any, Callable

from .archive import TorchZip
from .files import MappedFile, RefusedFile, map_file
from .numpy_safe import RECORDERS, UnrebuiltNumpy, is_recorder, made, rebuild
from .objgraph import replace_all
from .pickle_scan import PickleScan, scan_pickle
from .placeholders import Placeholder, is_dangerous, make_placeholder, names_code, python3_name
from .rebuild_guard import Guard, UnbuiltTensor

__all__ = ["Placeholder", "RefusedFile", "UnsafePickleError", "globals_in_pickle", "is_dangerous", "load_mapped",
           "make_placeholder", "python3_name", "safe_load"]

MAX_PLACEHOLDERS = 256
MAX_STORAGE_KEY = 256
MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001
_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+) was not an allowed global")
_BLOCKED_RE = re.compile(r"unsupported GLOBAL ([\w.]+) whose module ([\w.]+) is blocked")
_RECORDER_NAMES = frozenset(name for _, name in RECORDERS)


class UnsafePickleError(RefusedFile):
    """The pickle references a global that can run code (os, sys, subprocess, eval, ...)."""

    def __init__(self, global_name: str):
        self.global_name = python3_name(global_name)
        super().__init__(f"refused: its pickle references {self.global_name}, a construct sam-probe will not "
                         "execute (it would run code on load); nothing was executed", "unsafe")


def globals_in_pickle(data: bytes, max_ops: int = 1_000_000) -> set[str]:
    """Best-effort ``module.name`` of the globals in a pickle of any protocol (read, never run).

    Used to classify pickles the restricted unpickler cannot read (e.g. protocol
    4 ``STACK_GLOBAL``); a partial scan is still useful, so it never raises.
    """
    names: set[str] = set()
    strings: list[str] = []
    memo: dict[int, Any] = {}
    try:
        for n, (op, arg, _) in enumerate(pickletools.genops(io.BytesIO(data))):
            if n > max_ops:
                break
            if op.name in ("GLOBAL", "INST"):
                names.add(str(arg).replace(" ", "."))
            elif op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8", "SHORT_BINSTRING",
                             "BINSTRING", "STRING"):
                strings.append(str(arg)[:200])
            elif op.name == "MEMOIZE" and strings:
                memo[len(memo)] = strings[-1]
            elif op.name in ("BINPUT", "LONG_BINPUT", "PUT") and strings:
                memo[int(arg)] = strings[-1]
            elif op.name in ("BINGET", "LONG_BINGET", "GET") and isinstance(memo.get(int(arg)), str):
                strings.append(memo[int(arg)])
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                names.add(f"{strings[-2]}.{strings[-1]}")
    except Exception:  # noqa: BLE001 - a partial scan is still useful
        pass
    return names


def _scan(buf, start: int = 0, what: str = "its pickle") -> PickleScan:
    """:func:`scan_pickle`, but a pickle we cannot read is refused as hostile when it names code."""
    try:
        return scan_pickle(buf, start, what=what)
    except RefusedFile as exc:
        if exc.kind != "unsupported":
            raise
        names = globals_in_pickle(bytes(buf[start:start + 64 * 2**20]))
        for name in sorted(names):
            if is_dangerous(name):
                raise UnsafePickleError(name) from None
        calls = _code_names(names)
        if calls:
            raise RefusedFile(f"{exc}; it calls {calls[0]}, code sam-probe never runs; re-save the weights with "
                              "torch.save(model.state_dict(), path)", "unsupported") from None
        raise RefusedFile(f"{exc}; re-save it with torch.save (default pickle protocol 2)", "foreign") from None


def _code_names(names) -> list[str]:
    """The function-like globals of ``names`` that torch's allow-list and the numpy recorders do not cover."""
    from torch import _weights_only_unpickler as wou

    allowed = wou._get_allowed_globals()
    return sorted(python3_name(n) for n in names
                  if n not in allowed and n not in _RECORDER_NAMES and names_code(n))


def _check_globals(names: set[str]) -> None:
    for name in sorted(names):
        if is_dangerous(name):
            raise UnsafePickleError(name)
    if len(names) > MAX_PLACEHOLDERS:
        raise RefusedFile(f"its pickle names {len(names)} different classes and functions (more than "
                          f"{MAX_PLACEHOLDERS}); refusing it", "limit")


def _classify(exc: BaseException, placeholders: dict[str, type]) -> RefusedFile:
    """A torch unpickler error as a :class:`RefusedFile` with the right kind."""
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    blocked = _BLOCKED_RE.search(msg)
    if blocked:
        return UnsafePickleError(blocked.group(1))
    if isinstance(exc, MemoryError):
        return RefusedFile("unpickling it needs more memory than is available", "limit")
    if isinstance(exc, RecursionError):
        return RefusedFile("its pickle nests too deeply to rebuild", "limit")
    if isinstance(exc, RuntimeError) and "not resizable" in msg:
        return RefusedFile("corrupt: a tensor's size and stride need more bytes than its storage holds; re-save or "
                           "re-copy it")
    if isinstance(exc, pickle.UnpicklingError):
        calls = _code_names(placeholders)
        if calls and ("Only persistent_load of storage" in msg or re.search(r"Can only (?:append|extend|SETITEMS?)",
                                                                             msg)):
            return RefusedFile(f"it calls {calls[0]}, code sam-probe never runs, to rebuild its objects; re-save the "
                               "weights with torch.save(model.state_dict(), path)", "unsupported")
        target = re.search(r"Can only (?:append|extend|SETITEMS?)\b.* but got <class '([\w.]+)'>", msg)
        if target and target.group(1) in placeholders:  # a list or dict subclass of the user's own
            return RefusedFile(f"it holds objects of its own list or dict class {target.group(1)}, which cannot be "
                               "rebuilt without running their code", "foreign")
        if "Only persistent_load of storage" in msg:
            return RefusedFile("it references pickled modules or objects stored outside its pickle (a whole-model "
                               "torch.save?), which cannot be rebuilt without running code; re-save it as "
                               "torch.save(model.state_dict(), path)", "foreign")
        return RefusedFile(f"its pickle is malformed ({msg[:160]}); nothing was executed")
    return RefusedFile(f"its pickle cannot be rebuilt ({type(exc).__name__}: {msg[:160]})")


def _unpickle(data: bytes, scan: PickleScan, persistent_load: Callable[[Any], Any] | None,
              guard: Guard) -> tuple[Any, list[str]]:
    """Unpickle ``data`` with torch's restricted unpickler; return ``(object, placeholder names)``."""
    import torch
    from torch import _weights_only_unpickler as wou

    _check_globals(scan.globals)
    allowed = wou._get_allowed_globals()
    placeholders = {n: make_placeholder(n) for n in sorted(scan.globals)
                    if n not in allowed and n not in _RECORDER_NAMES}

    def no_persistent(pid: Any) -> Any:
        raise RefusedFile("a record that should hold plain data references tensor storage")

    for _ in range(8):  # the scan finds every global; this only guards against a disagreement with torch
        unpickler = wou.Unpickler(io.BytesIO(data), encoding="utf-8")
        unpickler.persistent_load = persistent_load or no_persistent
        extra = [*RECORDERS, *((cls, name) for name, cls in placeholders.items())]
        try:
            with guard, torch.serialization.safe_globals(extra), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                obj = unpickler.load()
            return obj, sorted(placeholders)
        except RefusedFile:
            raise
        except Exception as exc:  # noqa: BLE001 - classified below
            m = _GLOBAL_RE.search(str(exc))
            if not m or m.group(1) in placeholders:
                raise _classify(exc, placeholders) from None
            _check_globals({m.group(1)})
            placeholders[m.group(1)] = make_placeholder(m.group(1))
    raise RefusedFile("its pickle names globals that cannot be resolved")


def _finish(obj: Any, guard: Guard, scan_globals: set[str], made_before: int) -> tuple[Any, list[str]]:
    """Rebuild numpy values and replace tensors not made from the file (one pass, only when needed)."""
    if made() == made_before and not guard.constructs_tensors(scan_globals):
        return obj, []
    notes: list[str] = []

    def pick(o: Any) -> Any:
        new = rebuild(o) if is_recorder(o) else guard.pick(o)
        if isinstance(new, (UnrebuiltNumpy, UnbuiltTensor)) and repr(new)[1:-1] not in notes:
            notes.append(repr(new)[1:-1])
        return new

    return replace_all(obj, pick), notes


# ------------------------------------------------------------------ storages
def _storage_id(pid: Any, n: int) -> tuple:
    """Validate a persistent id ``('storage', storage_type, key, location, numel[, view])``."""
    import torch

    if type(pid) is not tuple or len(pid) != n:
        raise RefusedFile("its pickle references tensor storage with a malformed id")
    typename, storage_type, key, location, numel = pid[:5]
    if type(typename) not in (str, bytes) or typename not in ("storage", b"storage"):
        raise RefusedFile("its pickle references an object stored outside it that is not tensor data")
    if type(key) is not str or not 0 < len(key) <= MAX_STORAGE_KEY:
        raise RefusedFile("its pickle references tensor storage under a malformed key")
    if type(location) not in (str, bytes) or type(numel) is not int or not 0 <= numel < 2**62:
        raise RefusedFile(f"its pickle gives tensor storage {key} an invalid location or size")
    if storage_type is torch.UntypedStorage:
        dtype = torch.uint8
    elif isinstance(storage_type, torch.serialization.StorageType):
        dtype = storage_type.dtype
    else:
        raise RefusedFile(f"its pickle gives tensor storage {key} an unknown storage type")
    return key, dtype, numel, pid[5:]


def _typed(storage, dtype):
    import torch

    return torch.storage.TypedStorage(wrap_storage=storage, dtype=dtype, _internal=True)


def _load_zip(mf: MappedFile, arc: TorchZip, copy: bool) -> tuple[Any, list[str]]:
    import torch

    data = arc.read("data.pkl")
    scan = _scan(data)
    order = arc.read("byteorder") if arc.member("byteorder") else b"little"
    if order not in (b"little", b"big"):
        raise RefusedFile(f"its byteorder record says {order[:16]!r}, not little or big")
    loaded: dict[str, Any] = {}
    base: list = []
    guard = Guard()

    def persistent_load(pid: Any) -> Any:
        key, dtype, numel, _ = _storage_id(pid, 5)
        if key in loaded:
            return loaded[key]
        m = arc.member(f"data/{key}")
        if m is None:
            raise RefusedFile(f"its pickle refers to tensor record {arc.prefix}data/{key}, which the archive lacks")
        nbytes = numel * torch._utils._element_size(dtype)
        if nbytes != m.size:
            raise RefusedFile(f"corrupt: tensor record {m.name} holds {m.size} bytes but its pickle claims "
                              f"{nbytes}; re-save or re-copy it")
        if not base:
            base.append(torch.frombuffer(mf.data, dtype=torch.uint8).untyped_storage())
        storage = base[0][m.offset:m.offset + nbytes]
        if copy or m.offset % torch._utils._element_size(dtype):  # torch aligns records; others are copied
            storage = storage.clone()
        if order.decode() != sys.byteorder and nbytes:
            storage.byteswap(dtype)
        loaded[key] = guard.back(_typed(storage, dtype))
        return loaded[key]

    before = made()
    obj, names = _unpickle(data, scan, persistent_load, guard)
    obj, notes = _finish(obj, guard, scan.globals, before)
    return obj, names + notes


def _load_legacy(mf: MappedFile) -> tuple[Any, list[str]]:
    import torch

    mm, size = mf.data, mf.size

    guard = Guard()

    def record(pos: int, what: str) -> tuple[Any, int]:
        scan = _scan(mm, pos, what)
        return _unpickle(mm[pos:scan.end], scan, None, guard)[0], scan.end

    magic, pos = record(0, "its magic-number record")
    if type(magic) is not int or magic != MAGIC_NUMBER:
        raise RefusedFile("not a torch file (a pickle without torch's magic number)", "unsupported")
    protocol, pos = record(pos, "its protocol record")
    if type(protocol) is not int or protocol != PROTOCOL_VERSION:
        raise RefusedFile(f"unsupported legacy torch protocol {protocol!r:.20}", "unsupported")
    _, pos = record(pos, "its system-information record")
    main = _scan(mm, pos)
    keys, raw = record(main.end, "its storage list")
    if type(keys) is not list or not all(type(k) is str for k in keys) or len(set(keys)) != len(keys):
        raise RefusedFile("its storage list is not a list of distinct keys")
    room = size - raw - 8 * len(keys)
    storages: dict[str, tuple[Any, bytearray, int]] = {}
    views: dict[str, Any] = {}

    def persistent_load(pid: Any) -> Any:
        nonlocal room
        key, dtype, numel, (view,) = _storage_id(pid, 6)
        if key not in storages:
            nbytes = numel * torch._utils._element_size(dtype)
            room -= nbytes
            if room < 0:
                raise RefusedFile("truncated or corrupt file (its pickle claims more tensor data than the file "
                                  "holds); re-save or re-copy it")
            buf = bytearray(max(nbytes, 1))
            storage = torch.frombuffer(buf, dtype=torch.uint8).untyped_storage()[0:nbytes]
            storages[key] = (guard.back(_typed(storage, dtype)), buf, numel)
        typed, _, root_numel = storages[key]
        if view is None:
            return typed
        if type(view) is not tuple or len(view) != 3 or not all(type(v) is int for v in view[1:]) \
                or type(view[0]) is not str or not (0 <= view[1] and 0 <= view[2] and view[1] + view[2] <= root_numel):
            raise RefusedFile(f"its pickle gives tensor storage {key} an invalid view")
        if view[0] not in views:
            el = torch._utils._element_size(typed.dtype)
            views[view[0]] = guard.back(_typed(typed._untyped_storage[view[1] * el:(view[1] + view[2]) * el],
                                               typed.dtype))
        return views[view[0]]

    before = made()
    obj, names = _unpickle(mm[pos:main.end], main, persistent_load, guard)
    if set(keys) != set(storages):
        raise RefusedFile("truncated or corrupt file (its storage list does not match the tensors its pickle uses); "
                          "re-save or re-copy it")
    with memoryview(mm) as view:
        for key in keys:
            typed, buf, numel = storages[key]
            nbytes = typed._untyped_storage.nbytes()
            if raw + 8 + nbytes > size:
                raise RefusedFile("truncated or corrupt file (its tensor data ends early); re-save or re-copy it")
            (count,) = struct.unpack_from("<q", mm, raw)
            if count != numel:
                raise RefusedFile(f"truncated or corrupt file (tensor data {key} has {count} elements, its pickle "
                                  f"says {numel}); re-save or re-copy it")
            memoryview(buf)[:nbytes] = view[raw + 8:raw + 8 + nbytes]
            raw += 8 + nbytes
    obj, notes = _finish(obj, guard, main.globals, before)
    return obj, names + notes


def _trusted(mf: MappedFile) -> Any:
    import torch

    with open(mf.path, "rb") as fh:
        return torch.load(fh, map_location="cpu", weights_only=False)


def load_mapped(mf: MappedFile, *, archive: TorchZip | None = None, mmap: bool = True,
                trust: bool = False) -> tuple[Any, list[str]]:
    """Load a mapped torch file; return ``(object, placeholder globals and numpy notes)``.

    Raises :class:`RefusedFile` (``kind`` says why: ``unsafe``, ``limit``,
    ``corrupt``, ``unsupported`` or ``foreign``).  ``mmap=False`` copies the
    tensors of a zip file out of the mapping.
    """
    import torch

    head = bytes(mf.data[:4])
    if hasattr(torch._utils, "_sparse_tensors_to_validate"):  # a failed earlier load may have left some behind
        torch._utils._sparse_tensors_to_validate.clear()
    if head == b"PK\x03\x04":
        arc = archive or TorchZip(mf)
        if arc.torchscript:
            raise RefusedFile("TorchScript archive, not a checkpoint; load it with torch.jit.load and "
                              "torch.save(m.state_dict(), ...)", "unsupported")
        if trust:
            return _trusted(mf), []
        obj, names = _load_zip(mf, arc, copy=not mmap)
    elif head[:1] == b"\x80":
        if trust:
            return _trusted(mf), []
        obj, names = _load_legacy(mf)
    else:
        raise RefusedFile("not a torch file (neither a zip archive nor a pickle)", "unsupported")
    try:
        torch._utils._validate_loaded_sparse_tensors()
    except Exception as exc:  # noqa: BLE001 - torch's own check of sparse indices
        raise RefusedFile(f"it holds an invalid sparse tensor ({str(exc)[:120]})") from None
    return obj, names


def safe_load(path: str, *, mmap: bool = True, trust: bool = False) -> tuple[Any, list[str]]:
    """Load a torch file; return ``(object, names of globals replaced by placeholders)``.

    Raises :class:`UnsafePickleError` for a pickle that would run code and
    :class:`RefusedFile` for everything else that cannot be loaded safely.
    """
    return load_mapped(map_file(path), mmap=mmap, trust=trust)
