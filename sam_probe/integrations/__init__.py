"""sam-probe inside the tools researchers already use, one module per tool.

- :mod:`.scalars`: the scalar results of a stored unit, derived from its analysis's declared schema
  (what every tracker logs);
- :mod:`.tensorboard` and :mod:`.wandb`: a command's results to TensorBoard (``--tensorboard DIR``) and
  Weights & Biases (``--wandb PROJECT``, offline without an API key);
- :mod:`.live`: an analysis on a live module (no checkpoint), what the training callbacks run;
- :mod:`.lightning` (``SamProbeCallback``, a ``lightning.Callback``) and :mod:`.transformers`
  (``SamProbeCallback``, a ``transformers.TrainerCallback``): probe every N steps during training.

Nothing here is imported by ``sam_probe`` itself, and each module imports its tool only when used:
the packages are optional (``pip install torch==2.13.0 -e '.[integrations]'``).
"""
from __future__ import annotations

import importlib
from typing import Any


def require(module: str, pip_name: str, what: str) -> Any:
    """``import module``, or a one-line :class:`~sam_probe.errors.SpecError` (exit 2) naming the install."""
    from ..errors import SpecError

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise SpecError(f"{what} needs the {pip_name} package ({str(exc).splitlines()[0] if str(exc) else 'missing'}): "
                        f"pip install {pip_name}") from None
