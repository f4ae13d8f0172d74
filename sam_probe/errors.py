"""User-facing errors: each carries a one-line message that says what to do.

The CLI prints ``error: <message>`` and exits with code 2 (no traceback unless
``--debug``).
"""
from __future__ import annotations

import difflib


class SamProbeError(Exception):
    """Base class of every error caused by the user's input (files, specs, options)."""

    exit_code = 2


class CheckpointError(SamProbeError):
    """A checkpoint file cannot be read, is unsafe, or does not fit the model."""


class SpecError(SamProbeError):
    """A ``--model`` / ``--data`` / option value is not understood."""


def suggest(name: str, choices, n: int = 3) -> str:
    """`` (did you mean 'a', 'b'?)`` for the closest ``choices``, or ``''``."""
    close = difflib.get_close_matches(name, list(choices), n=n, cutoff=0.5)
    return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""


class Interrupted(BaseException):
    """Ctrl-C / SIGINT: like KeyboardInterrupt, nothing catches it on the way out but the CLI's
    entry point, which says what was kept and exits 130."""

    exit_code = 130
