"""Loading torch pickles without ever running their code.

Every load goes through ``torch.load(weights_only=True)``.  Checkpoints often
pickle other objects beside their tensors (``argparse.Namespace``
hyper-parameters, config classes, numpy scalars).  Their globals are replaced by
*inert placeholders*: dynamically made classes that carry the original
``module.qualname`` so the restricted unpickler accepts them, record the
arguments and state they are given, and are never imported or called.  Globals
in modules that torch blocks outright (``os``, ``sys``, ``subprocess``, ...) are
refused: such a pickle was written to run code on load.

Full unpickling (``trust=True``) is the caller's explicit, loud opt-in.
"""
from __future__ import annotations

import _compat_pickle
import io
import pickletools
import re
import zipfile
from typing import Any

import torch

_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+) was not an allowed global")
_BLOCKED_RE = re.compile(r"unsupported GLOBAL ([\w.]+) whose module ([\w.]+) is blocked")
_MAX_PLACEHOLDERS = 256

# Globals that only a pickle written to run code would reference.
_DANGEROUS_MODULES = {
    "os", "posix", "nt", "sys", "subprocess", "shutil", "importlib", "runpy", "socket",
    "pty", "webbrowser", "ctypes", "multiprocessing", "code", "codeop", "pickle", "marshal",
    "tempfile", "pathlib", "io", "_io", "signal", "threading", "platform", "commands",
}
_DANGEROUS_BUILTINS = {
    "eval", "exec", "compile", "__import__", "getattr", "setattr", "delattr", "open",
    "breakpoint", "input", "globals", "locals", "vars", "apply", "execfile",
}


def python3_name(full_name: str) -> str:
    """Protocol-2 pickles name py2 modules (``__builtin__``, ``commands``); give the py3 name."""
    module, _, name = full_name.rpartition(".")
    return f"{_compat_pickle.IMPORT_MAPPING.get(module, module) or 'builtins'}.{name}"


def is_dangerous(full_name: str) -> bool:
    """Whether a pickled global can run code or touch the system when called."""
    module, _, name = python3_name(full_name).rpartition(".")
    root = module.split(".", 1)[0]
    if module in ("", "builtins", "__builtin__"):
        return name in _DANGEROUS_BUILTINS
    return root in _DANGEROUS_MODULES

# Data-only numpy constructors: they build arrays/scalars from bytes and call nothing else.
_NUMPY_SAFE = (
    "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct",
    "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar",
    "numpy.ndarray", "numpy.dtype",
)


class UnsafePickleError(Exception):
    """The pickle references a global from a module that can run code (os, sys, ...)."""

    def __init__(self, global_name: str):
        super().__init__(global_name)
        self.global_name = python3_name(global_name)


class Placeholder:
    """Inert stand-in for an object whose class was not loaded.

    ``args`` are the constructor arguments the pickle passed and ``state`` the
    state it set; nothing of the original class is imported or run.
    """

    _sam_probe_global = "?"

    def __new__(cls, *args: Any, **kwargs: Any):
        obj = object.__new__(cls)
        object.__setattr__(obj, "args", args)
        object.__setattr__(obj, "state", kwargs or None)
        return obj

    def __init__(self, *args: Any, **kwargs: Any):
        pass

    def __setstate__(self, state: Any) -> None:
        object.__setattr__(self, "state", state)

    def __repr__(self) -> str:
        return f"<unloaded {self._sam_probe_global}>"

    def plain(self) -> Any:
        """The recorded state as plain data (e.g. a Namespace's ``__dict__``)."""
        st = self.state
        if isinstance(st, tuple) and len(st) == 2 and isinstance(st[0], dict):
            st = st[0]
        if st is not None:
            return st
        return list(self.args) if self.args else None


def make_placeholder(full_name: str) -> type:
    """A :class:`Placeholder` subclass whose ``module.qualname`` is ``full_name``."""
    module, _, qualname = full_name.rpartition(".")
    cls = type(qualname.rsplit(".", 1)[-1] or "Unknown", (Placeholder,), {"_sam_probe_global": full_name})
    cls.__module__ = module or "builtins"
    cls.__qualname__ = qualname
    return cls


def _numpy_globals() -> list[Any]:
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a dependency
        return []
    found = []
    for path in _NUMPY_SAFE:
        mod, _, name = path.rpartition(".")
        try:
            obj = __import__(mod, fromlist=[name])
            found.append(getattr(obj, name))
        except (ImportError, AttributeError):
            continue
    found.extend(getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType"))
    return found


def globals_in_pickle(data: bytes) -> set[str]:
    """``module.name`` of every GLOBAL / STACK_GLOBAL in one pickle (read, never run)."""
    names: set[str] = set()
    strings: list[str] = []
    memo: dict[int, Any] = {}
    try:
        for op, arg, _ in pickletools.genops(io.BytesIO(data)):
            if op.name == "GLOBAL":
                names.add(str(arg).replace(" ", "."))
            elif op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8", "SHORT_BINSTRING", "BINSTRING", "STRING"):
                strings.append(str(arg))
            elif op.name == "MEMOIZE" and strings:
                memo[len(memo)] = strings[-1]
            elif op.name in ("BINPUT", "LONG_BINPUT", "PUT") and strings:
                memo[int(arg)] = strings[-1]
            elif op.name in ("BINGET", "LONG_BINGET", "GET") and isinstance(memo.get(int(arg)), str):
                strings.append(memo[int(arg)])
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                names.add(f"{strings[-2]}.{strings[-1]}")
    except Exception:  # noqa: BLE001 - a partial scan is still useful; load() decides
        pass
    return names


def zip_pickle_globals(path: str) -> set[str]:
    """Globals referenced by the pickles inside a torch zip archive."""
    names: set[str] = set()
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if info.filename.endswith(".pkl") and info.file_size < 512 * 2**20:
                    names |= globals_in_pickle(zf.read(info))
    except (zipfile.BadZipFile, OSError):
        pass
    return names


def _allowed_globals() -> set[str]:
    try:
        from torch import _weights_only_unpickler as wou
        return set(wou._get_allowed_globals())
    except Exception:  # noqa: BLE001 - private API; fall back to the retry loop
        return set()


def safe_load(path: str, *, mmap: bool = False, trust: bool = False) -> tuple[Any, list[str]]:
    """Load a torch file; return ``(object, names of globals replaced by placeholders)``.

    Raises :class:`UnsafePickleError` for a pickle that would run code, and
    lets torch's own errors (corrupt, truncated) propagate.
    """
    if trust:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap), []
    known = set(_allowed_globals())
    extra = _numpy_globals()
    known |= {f"{g.__module__}.{g.__qualname__}" for g in extra}
    wanted = {n for n in zip_pickle_globals(path) if n not in known} if zipfile.is_zipfile(path) else set()
    for name in sorted(wanted):
        if is_dangerous(name):
            raise UnsafePickleError(name)
    placeholders = {n: make_placeholder(n) for n in wanted}
    for _ in range(_MAX_PLACEHOLDERS):
        try:
            with torch.serialization.safe_globals(extra + list(placeholders.values())):
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            return obj, sorted(placeholders)
        except Exception as exc:  # noqa: BLE001 - classify torch's message
            msg = str(exc)
            blocked = _BLOCKED_RE.search(msg)
            if blocked:
                raise UnsafePickleError(blocked.group(1)) from None
            m = _GLOBAL_RE.search(msg)
            if not m or m.group(1) in placeholders:
                raise
            if is_dangerous(m.group(1)):
                raise UnsafePickleError(m.group(1)) from None
            placeholders[m.group(1)] = make_placeholder(m.group(1))
    raise UnsafePickleError("too many unknown globals")
