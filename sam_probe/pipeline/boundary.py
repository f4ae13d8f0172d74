"""The trust boundary: what a checkpoint may choose, and what only the user may.

A checkpoint is hostile input.  It may *name* a built-in model (zoo, ``hf``)
with plain keyword arguments, built-in data, and a built-in loss; it may never
make sam-probe import, read or call anything else: a factory, file or function
runs only when the user typed it (``--model``, ``--data``, ``--loss``,
``--allow-model``).  Whatever the user typed wins over what the checkpoint says.

Pure functions of the user's settings and the checkpoint's saved fields
(no files, no torch); each returns the choice or raises one line saying what to pass.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from ..errors import CheckpointError, SpecError, opt
from ..settings import Settings


def plain_value(v: Any) -> bool:
    """A keyword argument a checkpoint may pass to a built-in factory: numbers, strings, bools,
    None, or flat lists of those (at most 1024)."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return True
    return isinstance(v, list) and len(v) <= 1024 and all(x is None or isinstance(x, (bool, int, float, str)) for x in v)


def resolve_model(s: Settings, saved: Mapping[str, Any] | None, where: str, hf_config: bool) -> tuple[str, dict[str, Any]]:
    """The model name and keyword arguments: the user's ``--model`` (with the saved arguments when
    the checkpoint names the same model), else the checkpoint's, which may only be a built-in model
    (or one allowed with ``--allow-model``) with plain arguments; ``hf`` when only a ``config.json``
    lies beside the weights (``hf_config``).  ``--model-arg`` is applied last."""
    from ..loading.models import ZOO, is_builtin_model

    saved = saved or {}
    if s.model:
        name = s.model
        args = dict(saved.get("args") or {}) if s.model == saved.get("name") else {}
    else:
        named = saved.get("name") or ("hf" if hf_config else None)
        if not named:
            raise SpecError(f"{where}: the checkpoint does not name its model; pass {opt('model')} (zoo: "
                            f"{', '.join(sorted(ZOO))}, hf, or pkg.module:factory / file.py:factory)")
        name = str(named)
        if not is_builtin_model(name) and name not in s.allow_models:
            raise CheckpointError(f"{where}: the checkpoint names its model {name!r}, which is not a built-in model; "
                                  "sam-probe never imports or calls code named inside a checkpoint: if you trust that "
                                  f"code, pass {opt('model', name)} yourself")
        saved_args = saved.get("args") or {}
        if not isinstance(saved_args, dict):
            raise CheckpointError(f"{where}: the saved model arguments are not key=value pairs; pass {opt('model_args')}")
        args = dict(saved_args)
        bad = [k for k, v in args.items() if not isinstance(k, str) or not plain_value(v)]
        if bad:
            raise CheckpointError(f"{where}: saved model argument {str(bad[0])[:40]!r} is not a plain value; "
                                  f"pass the model's arguments with {opt('model_args')}")
    args.update(s.model_args)
    return name, args


def saved_factory_args(factory: Callable[..., Any], hparams: Mapping[str, Any], args: dict[str, Any]) -> dict[str, Any]:
    """``args`` plus the saved hyper-parameters that fill the factory's *named* parameters the user
    left open (plain values only; never through ``**kwargs``)."""
    try:
        accepted = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return dict(args)
    filled = dict(args)
    for k, v in hparams.items():
        if k in accepted and k not in filled and plain_value(v) and accepted[k].kind not in (
                inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL):
            filled[k] = v
    return filled


def resolve_data(s: Settings, hparams: Mapping[str, Any] | None, where: str | None) -> tuple[str, dict[str, Any]]:
    """``--data`` and ``--data-arg``, else the built-in data the checkpoint's hyper-parameters name
    (never a file or a factory: those the user passes), with its saved plain arguments unless
    ``--data-arg`` is given."""
    from ..loading.data import is_builtin_data

    if s.data:
        return s.data, dict(s.data_args)
    named = hparams.get("data") if hparams is not None else None
    if not named:
        raise SpecError(f"no {opt('data')} given and the checkpoint does not name its data; pass {opt('data')} "
                        "(e.g. digits)")
    if not isinstance(named, str) or not is_builtin_data(named):
        raise CheckpointError(f"{where}: the checkpoint names its data {str(named)[:80]!r}, which is not built-in "
                              "data; sam-probe never reads files or runs code named inside a checkpoint: pass "
                              f"{opt('data')} yourself")
    saved = hparams.get("data_args") if not s.data_args and hparams is not None else None
    args = dict(s.data_args)
    if isinstance(saved, dict) and all(isinstance(k, str) and plain_value(v) for k, v in saved.items()):
        args = dict(saved)
    return named, args


def resolve_loss(s: Settings, hparams: Mapping[str, Any], where: str, causal_lm: bool,
                 data_default: str | None) -> str | None:
    """``--loss``, else a built-in loss the checkpoint names, else ``lm`` for causal language models,
    else the data's default (``None``: the objective picks from the targets)."""
    from ..loading.models import is_factory_spec

    if s.loss:
        return s.loss
    saved = hparams.get("loss")
    if isinstance(saved, str) and saved:
        if is_factory_spec(saved) or saved.endswith(".py"):
            raise CheckpointError(f"{where}: the checkpoint names its loss {saved[:80]!r}; sam-probe never "
                                  f"imports code named inside a checkpoint: pass {opt('loss')} yourself")
        return saved
    if causal_lm:
        return "lm"
    return data_default
