"""The error boundary: whose exception is it?

An exception that is not a :class:`~sam_probe.errors.SamProbeError` escaped a unit.
Its traceback says where it was raised:

- inside code the user chose: the model's forward (a frame of ``nn.Module.__call__``),
  a data source being iterated (``torch.utils.data``), or a function of a file or
  package the user named (a frame outside sam-probe and the libraries it is built
  on) — a **user error**: one line, naming where, with advice on ``--model`` /
  ``--data`` / ``--loss``;
- in sam-probe's own code, as a Python error (``KeyError``, ``AttributeError``,
  ``TypeError``, ...) — a **sam-probe bug**: one line that says so and where
  (never advice about the inputs), the traceback kept for ``--debug``;
- in a library (torch, numpy) called by sam-probe itself on the user's tensors —
  including torch's compiled operations, whose errors (``RuntimeError``,
  ``IndexError``, ``ValueError``) surface in sam-probe's frame — not attributable:
  one line naming the place, advice stated as a condition.

Only the first kind is ever worded as the user's mistake.
"""
from __future__ import annotations

import os
import sys
import traceback
from dataclasses import dataclass
from types import TracebackType

from ..errors import SamProbeError, UserCodeError, opt

LIBRARIES = frozenset({
    "torch", "functorch", "numpy", "scipy", "h5py", "safetensors", "sklearn", "matplotlib", "seaborn",
    "typer", "click", "rich", "pyhessian", "typing_extensions", "importlib_metadata",
})
_FORWARD = ("_call_impl", "_wrapped_call_impl")
# what only Python code raises (torch's compiled operations raise RuntimeError, IndexError, ValueError,
# NotImplementedError): raised in sam-probe's own frame, these are sam-probe's bugs
PYTHON_ERRORS = (KeyError, AttributeError, NameError, TypeError, AssertionError, ZeroDivisionError,
                 RecursionError, ImportError)


@dataclass(frozen=True)
class Blame:
    """``who``: ``model``, ``data`` or ``code`` (the user's), ``sam-probe`` (a bug), ``library``
    (unattributed), ``memory`` or ``system`` (a file or device error: its own message says it); ``location``: ``file:line`` of the frame that says most."""

    who: str
    location: str | None = None

    @property
    def users(self) -> bool:
        return self.who in ("model", "data", "code")


def owner(module: str) -> str:
    """``ours``, ``library`` or ``user`` for a frame of module ``module``."""
    top = module.split(".", 1)[0]
    if top == "sam_probe":
        return "ours"
    if top in LIBRARIES or top in sys.stdlib_module_names:
        return "library"
    return "user"


def _frames(tb: TracebackType | None) -> list[tuple[str, str, str, int]]:
    """``(module, function, file, line)`` of every frame, outermost first."""
    out = []
    while tb is not None:
        f = tb.tb_frame
        out.append((str(f.f_globals.get("__name__", "")), f.f_code.co_name, f.f_code.co_filename, tb.tb_lineno))
        tb = tb.tb_next
    return out


_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the sam_probe package folder


def _where(frame: tuple[str, str, str, int]) -> str:
    """``file:line``; sam-probe's files relative to the package's folder (``sam_probe/store.py:12``)."""
    module, _, filename, line = frame
    if owner(module) == "ours" and os.path.abspath(filename).startswith(_ROOT + os.sep):
        filename = os.path.relpath(os.path.abspath(filename), os.path.dirname(_ROOT))
    return f"{filename}:{line}"


def blame(exc: BaseException) -> Blame:
    """Who raised ``exc`` (see the module docstring)."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return Blame("memory")
    if isinstance(exc, OSError):
        return Blame("system")
    frames = _frames(exc.__traceback__)
    kinds = [owner(m) for m, *_ in frames]
    if "ours" in kinds:  # what sam-probe called: from its outermost frame inwards
        start = kinds.index("ours")
        frames, kinds = frames[start:], kinds[start:]
    if not frames:
        return Blame("sam-probe")
    in_forward = any(m == "torch.nn.modules.module" and fn in _FORWARD for m, fn, *_ in frames)
    in_data = any(m.startswith("torch.utils.data") for m, *_ in frames)
    users = [f for f, k in zip(frames, kinds) if k == "user"]
    if kinds[-1] == "ours" and isinstance(exc, PYTHON_ERRORS):
        return Blame("sam-probe", _where(frames[-1]))
    if in_forward or in_data or users:
        who = "model" if in_forward else "data" if in_data else "code"
        return Blame(who, _where(users[-1]) if users else None)
    ours = [f for f, k in zip(frames, kinds) if k == "ours"]
    return Blame("library", _where(ours[-1]) if ours else None)


def first_line(exc: BaseException, limit: int = 200) -> str:
    """``Type: first line of the message`` (at most ``limit`` characters of it)."""
    text = (str(exc).strip().splitlines() or [""])[0][:limit]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def explain(exc: BaseException, subject: str) -> str:
    """One line for ``exc`` raised while computing ``subject`` (a checkpoint path or a run)."""
    if isinstance(exc, SamProbeError):
        return str(exc)
    b = blame(exc)
    head = f"{subject}: {first_line(exc)}"
    if b.users:
        return str(user_error(exc, subject, b))
    if b.who == "memory":
        return str(SamProbeError(f"{head} (out of memory: pass {opt('max_memory')} to chunk the data and vectors, "
                                 f"or select fewer samples with {opt('max_samples')})"))
    if b.who == "system":
        return head
    if b.who == "sam-probe":
        return (f"{head} (at {b.location}: a bug in sam-probe, not in your inputs; rerun with --debug for the "
                "traceback and please report it)")
    at = f" called at {b.location}" if b.location else ""
    return str(SamProbeError(
        f"{head} (raised in a library{at}: if {opt('model')}, {opt('data')} and {opt('loss')} fit together, "
        "this is a bug in sam-probe; rerun with --debug for the traceback)"))


def user_error(exc: BaseException, subject: str, b: Blame | None = None) -> UserCodeError:
    """A :class:`UserCodeError` for ``exc`` raised in the user's model, data or code."""
    b = b or blame(exc)
    where = {"model": "in the model's forward", "data": "while reading the data"}.get(b.who, "in your code")
    at = f" at {b.location}" if b.location else ""
    advice = (f"check that {opt('model')}/{opt('model_args')} fit {opt('data')} and {opt('loss')}"
              if b.who != "data" else f"check {opt('data')}/{opt('data_args')}")
    return UserCodeError(f"{subject}: {first_line(exc)} ({where}{at}: {advice})", where=b.who, location=b.location,
                         original=type(exc).__name__)


def trace_of(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
