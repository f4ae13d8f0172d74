"""The core's exceptions: neutral (no command-line flag in any message).

Each names the setting it is about in ``option``/``value`` and any other setting through
:func:`~sam_probe.errors.opt`, so ``str(exc)`` reads ``loss='lm': ...`` in a notebook and
``--loss lm: ...`` on the command line (:mod:`sam_probe.errors`)."""
from __future__ import annotations

from ..errors import SpecError, opt  # noqa: F401 - opt re-exported for core modules


class LossError(SpecError, ValueError):
    """A loss cannot be computed from what the model returned or the data holds (one-line reason)."""


class DoubleBackwardError(SpecError):
    """An operation of the model has no second derivative (or no forward-mode one) in PyTorch;
    ``option='hvp'``, ``value`` the method that failed."""


class CurvatureError(SpecError, ValueError):
    """A curvature operator does not apply to this objective (e.g. a Fisher without a predictive
    distribution); ``option='curvature'``."""
