"""Inert placeholders for the globals a checkpoint's pickle names, and which globals are refused.

A placeholder class carries the original ``module.qualname`` only as a label.
Calling it, ``__new__``-ing it (``NEWOBJ``) or setting its state (``BUILD``)
records the arguments and state; nothing of the original is imported or run.
Globals that can run code or touch the system when called (``os.*``,
``subprocess.*``, ``eval``, ``open``, ...) are not given placeholders: a pickle
that names them was written to run code on load, and the file is refused.
"""
from __future__ import annotations

import _compat_pickle
from typing import Any

# Globals that only a pickle written to run code would reference.
_DANGEROUS_MODULES = {
    "os", "posix", "nt", "sys", "subprocess", "_posixsubprocess", "shutil", "importlib", "runpy", "socket",
    "pty", "webbrowser", "ctypes", "multiprocessing", "code", "codeop", "pickle", "_pickle", "marshal",
    "tempfile", "pathlib", "io", "_io", "signal", "threading", "_thread", "platform", "commands", "pdb",
    "dill", "cloudpickle",
}
_DANGEROUS_BUILTINS = {
    "eval", "exec", "compile", "__import__", "getattr", "setattr", "delattr", "open",
    "breakpoint", "input", "globals", "locals", "vars", "apply", "execfile", "__build_class__",
}


def python3_name(full_name: str) -> str:
    """Protocol-2 pickles name py2 modules (``__builtin__``, ``commands``); give the py3 name."""
    module, _, name = full_name.rpartition(".")
    return f"{_compat_pickle.IMPORT_MAPPING.get(module, module) or 'builtins'}.{name}"


def is_dangerous(full_name: str) -> bool:
    """Whether a pickled global can run code or touch the system when called.

    Any part of its dotted path counts, so an alias reached through another module's
    attribute (``posixpath.os.system``, ``uuid.os.system``, ``torch.serialization.os.system``,
    ``shutil.os.popen``) is as dangerous as the callable it names."""
    module, _, name = python3_name(full_name).rpartition(".")
    if module in ("", "builtins", "__builtin__"):
        return name in _DANGEROUS_BUILTINS
    parts = module.split(".")
    if any(p in _DANGEROUS_MODULES for p in parts):
        return True
    return any(p in ("builtins", "__builtin__", "__builtins__") for p in parts[1:]) and name in _DANGEROUS_BUILTINS


def names_code(full_name: str) -> bool:
    """Whether a global looks like a function (lower-case last name) rather than a class: a pickle that calls
    one runs that code when fully unpickled, so sam-probe never suggests ``--trust-checkpoint`` for it.
    Builtin types (``set``, ``frozenset``, ...) are classes."""
    import builtins

    module, _, name = python3_name(full_name).rpartition(".")
    if module in ("builtins", "__builtin__") and isinstance(getattr(builtins, name, None), type):
        return False
    return not name.lstrip("_")[:1].isupper()


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
    """A :class:`Placeholder` subclass labelled ``full_name`` (``module.qualname``)."""
    label = full_name.replace("\0", "\\0")  # any text but NUL can be a name in a pickle
    module, _, qualname = label.rpartition(".")
    cls = type(qualname.rsplit(".", 1)[-1] or "Unknown", (Placeholder,), {"_sam_probe_global": label})
    cls.__module__ = module or "builtins"
    cls.__qualname__ = qualname or "Unknown"
    return cls
