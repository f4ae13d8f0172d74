"""User-facing errors: each carries a one-line message that says what to do.

The CLI prints ``error: <message>`` and exits with code 2 (no traceback unless
``--debug``).

Errors are *neutral*: the core and loading layers never write a command-line
flag.  An error about one setting names it in ``option`` (its Python name: a
:class:`~sam_probe.settings.Settings` field such as ``"loss"`` or
``"batch_size"``, or an analysis option such as ``"top_k"``) with the ``value``
that was given; any other setting the message mentions is written
``{opt("batch_size")}`` (optionally with a value, ``{opt("hvp", "fwd-rev")}``)::

    raise SpecError("the model returned no scalar loss; put labels in the batch or choose "
                    f"{opt('loss')} ce, lm or a function", option="loss", value="model")

``str(exc)`` renders those names in the current :func:`style`: Python names in
notebooks (``loss='model': ... choose loss ce, lm ...``), flags on the command
line, which runs inside ``with style(CLI):`` (``--loss model: ... choose --loss
ce, lm ...``).  Free text (paths, values) may be formatted into the message
freely: only the markers :func:`opt` writes are rendered.
"""
from __future__ import annotations

import contextlib
import contextvars
import difflib
import re
from collections.abc import Callable, Iterator
from typing import Any

_MARK, _VALUE = "\x1f", "\x1e"  # ASCII unit/record separators: never in a message's own text
_REF = re.compile(f"{_MARK}([A-Za-z_][A-Za-z0-9_]*)(?:{_VALUE}([^{_MARK}]*))?{_MARK}")


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()  # "no value given" (None is a value)

Style = Callable[[str, Any], str]  # (option name, value or MISSING) -> text


def python_style(name: str, value: Any = MISSING) -> str:
    """``batch_size`` / ``loss='model'``: how the Python API spells a setting."""
    return name if value is MISSING else f"{name}={value!r}"


def cli_style(name: str, value: Any = MISSING) -> str:
    """``--batch-size`` / ``--loss model``: how the command line spells a setting."""
    flag = FLAGS.get(name) or "--" + name.replace("_", "-")
    return flag if value is MISSING else f"{flag} {value}"


PYTHON: Style = python_style
CLI: Style = cli_style

FLAGS: dict[str, str] = {  # Python names whose flag is not --name-with-dashes (the CLI adds its own)
    "model_args": "--model-arg", "data_args": "--data-arg", "allow_models": "--allow-model",
    "store": "--no-store", "m": "--m-sharpness", "run_names": "--run-name",
}

_STYLE: contextvars.ContextVar[Style] = contextvars.ContextVar("sam_probe_error_style", default=python_style)


@contextlib.contextmanager
def style(new: Style) -> Iterator[None]:
    """Render every error message (and note) inside the block in ``new`` (:data:`CLI` or :data:`PYTHON`)."""
    token = _STYLE.set(new)
    try:
        yield
    finally:
        _STYLE.reset(token)


def current_style() -> Style:
    """The style messages render in here (:data:`PYTHON` unless inside :func:`style`)."""
    return _STYLE.get()


def opt(name: str, value: Any = MISSING) -> str:
    """A reference to the setting ``name`` (with ``value``) inside a message; see the module docstring."""
    if value is MISSING:
        return f"{_MARK}{name}{_MARK}"
    return f"{_MARK}{name}{_VALUE}{str(value).replace(_MARK, '')}{_MARK}"


def render(text: str, how: Style | None = None) -> str:
    """``text`` with every :func:`opt` reference spelled in style ``how`` (default: the current style)."""
    if _MARK not in text:
        return text
    how = how or _STYLE.get()
    text = _REF.sub(lambda m: how(m.group(1), MISSING if m.group(2) is None else m.group(2)), text)
    return text.replace(_MARK, "").replace(_VALUE, "")


class SamProbeError(Exception):
    """Base class of every error caused by the user's input (files, specs, options).

    ``option``/``value``: the setting the error is about (Python name) and the value given;
    the rendered message starts with them (``--loss model: ...`` on the command line).
    ``rows``: optional ``(name, expected, found)`` detail rows a table may show.
    """

    exit_code = 2

    def __init__(self, message: str = "", *, option: str | None = None, value: Any = MISSING,
                 rows: list[tuple[str, str, str]] | None = None):
        super().__init__(message)
        self.message = message
        self.option = option
        self.value = value
        if rows is not None:
            self.rows = rows

    def render(self, how: Style | None = None) -> str:
        """The one-line message, with settings spelled in style ``how`` (default: the current one)."""
        how = how or _STYLE.get()
        text = render(self.message, how)
        if self.option is None:
            return text
        head = how(self.option, self.value)
        return f"{head}: {text}" if text else head

    def __str__(self) -> str:
        return self.render()

    def __reduce__(self) -> Any:  # keyword fields survive pickling (worker processes)
        return (_rebuild, (type(self), self.message, self.__dict__))


def _rebuild(cls: type[SamProbeError], message: str, state: dict[str, Any]) -> SamProbeError:
    exc = cls.__new__(cls)
    Exception.__init__(exc, message)
    exc.__dict__.update(state)
    return exc


class CheckpointError(SamProbeError):
    """A checkpoint file cannot be read, is unsafe, or does not fit the model."""


class SpecError(SamProbeError):
    """A ``--model`` / ``--data`` / option value is not understood, or the inputs do not fit together."""


class UserCodeError(SpecError):
    """An exception raised inside the user's model, data or loss (not by sam-probe itself).

    ``where``: ``"model"`` (the forward or the factory), ``"data"`` or ``"code"`` (a user
    function); ``location``: ``file:line`` of the innermost user frame, when known;
    ``original``: the type name of the exception raised there.
    """

    def __init__(self, message: str = "", *, where: str = "code", location: str | None = None,
                 original: str = "", **kw: Any):
        super().__init__(message, **kw)
        self.where = where
        self.location = location
        self.original = original


def suggest(name: str, choices: Any, n: int = 3) -> str:
    """`` (did you mean 'a', 'b'?)`` for the closest ``choices``, or ``''``."""
    close = difflib.get_close_matches(name, list(choices), n=n, cutoff=0.5)
    return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""


class RankLost(BaseException):
    """A rank of a multi-process run died, or failed where its peers cannot follow (out of memory): the
    others would wait in a collective, so nothing catches it per unit; the CLI's entry point prints its
    one line and exits 2.  Units stored before it are whole (a unit is written after it is computed)."""

    exit_code = 2


class Interrupted(BaseException):
    """Ctrl-C / SIGINT: like KeyboardInterrupt, nothing catches it on the way out but the CLI's
    entry point, which says what was kept and exits 130.

    The CLI's handler also records the signal (:func:`note_interrupt`): a library that swallows the
    exception (an import that catches everything, leaving a half-imported module behind) cannot hide it,
    because the error boundary of each unit (:func:`sam_probe.pipeline.outcome.failure`) and the
    entry point ask :func:`interrupt_seen` before they treat what follows as an ordinary error."""

    exit_code = 130


_INTERRUPT = {"seen": False}


def note_interrupt(seen: bool = True) -> None:
    """Record that SIGINT arrived (called by the CLI's handler before it raises :class:`Interrupted`;
    ``seen=False`` when a command starts: a batch worker runs one command after another)."""
    _INTERRUPT["seen"] = seen


def interrupt_seen() -> bool:
    """Whether SIGINT arrived in this process since the CLI started."""
    return _INTERRUPT["seen"]
