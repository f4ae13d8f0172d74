"""Fitting a checkpoint's tensors to a model's ``state_dict()`` names.

The names a checkpoint must provide are those of ``model.state_dict()``:
parameters and *persistent* buffers.  Non-persistent buffers (Hugging Face's
``position_ids``, ``token_type_ids``) are never saved; they keep the model's own
values, and a checkpoint that holds them anyway (older exports) has them
ignored.  Tied weights (``lm_head.weight`` sharing the embedding's tensor) are
one parameter: an alias absent from the checkpoint is fine, and an alias present
alone stands for its parameter.

A prefix such as Lightning's ``model.`` is inferred by choosing the dotted
prefix whose removal matches the most of the model's names.  Any remaining
mismatch is an error listing missing, unexpected and shape-mismatched names;
a missing model name points to the closest *unexpected* checkpoint name and
vice versa (the likely renames), never to a name that already matched.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..errors import CheckpointError

# Buffers that may be absent from old checkpoints without changing any result.
_OPTIONAL_BUFFERS = ("num_batches_tracked",)


@dataclass
class Matched:
    """The checkpoint's tensors split into the model's parameters and buffers.

    ``prefix``: the attribute prefix removed here (Lightning ``model.``);
    ``stripped``: wrapper prefixes removed when loading (``module.``, ``_orig_mod.``);
    ``tied``: tied aliases absent from the checkpoint; ``ignored``: checkpoint tensors
    naming non-persistent buffers (the model's own values are used).
    """

    params: dict[str, Tensor]
    buffers: dict[str, Tensor]
    prefix: str
    stripped: list[str] = field(default_factory=list)
    tied: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    @property
    def prefixes(self) -> str:
        """One line for tables: the prefixes removed, e.g. ``module. + model.`` (``-`` when none)."""
        parts = [p for p in self.stripped] + ([self.prefix] if self.prefix else [])
        return " + ".join(parts) if parts else "-"

    @property
    def layout(self) -> str:
        """Old name of :attr:`prefixes` (it never was a layout), kept for one release."""
        return self.prefixes


class KeyMismatchError(CheckpointError):
    """Names or shapes differ; :attr:`rows` is the table ``(kind, name, detail)``."""

    def __init__(self, message: str, rows: list[tuple[str, str, str]]):
        super().__init__(message)
        self.rows = rows


MAX_PREFIX_PARTS = 32  # a prefix has at most this many dotted parts (checked in one pass over the names)
MAX_ROWS = 40  # rows per kind (missing / unexpected / shape) in a mismatch table
MAX_POOL = 2000  # names searched for the closest one


def infer_prefix(names: list[str], expected: set[str]) -> str:
    """The leading ``a.b.`` prefix whose removal matches the most ``expected`` names (ties: the first in
    sorted order); one pass over the names, at most ``MAX_PREFIX_PARTS`` prefixes each."""
    best, best_hits = "", sum(n in expected for n in names)
    hits: dict[str, int] = {}
    for n in names:
        parts = n.split(".", MAX_PREFIX_PARTS)
        for i in range(1, min(len(parts), MAX_PREFIX_PARTS)):
            pre = ".".join(parts[:i]) + "."
            if n[len(pre):] in expected:
                hits[pre] = hits.get(pre, 0) + 1
    for pre in sorted(hits):
        if hits[pre] > best_hits:
            best, best_hits = pre, hits[pre]
    return best


def _closest(name: str, pool: list[str]) -> str:
    m = difflib.get_close_matches(name[:200], [p[:200] for p in pool[:MAX_POOL]], n=1, cutoff=0.4)
    return f"closest: {m[0]}" if m else ""


def _capped(rows: list[tuple[str, str, str]], kind: str, total: int) -> list[tuple[str, str, str]]:
    return rows + ([(kind, f"... {total - len(rows):,} more", "")] if total > len(rows) else [])


@dataclass
class ModelNames:
    """What a model's state dict consists of (see module docstring)."""

    params: list[str]                   # canonical parameter names (tied ones once)
    buffers: list[str]                  # persistent buffers
    transient: dict[str, Tensor]        # non-persistent buffers -> the model's values
    aliases: dict[str, str]             # tied alias -> canonical parameter name
    shapes: dict[str, tuple[int, ...]]

    @classmethod
    def of(cls, model: nn.Module) -> "ModelNames":
        canon = {id(p): n for n, p in model.named_parameters()}
        sd = model.state_dict(keep_vars=True)
        params = [n for n, _ in model.named_parameters()]
        aliases = {k: canon[id(v)] for k, v in sd.items() if isinstance(v, nn.Parameter) and id(v) in canon
                   and canon[id(v)] != k}
        buffers = [k for k, v in sd.items() if not isinstance(v, nn.Parameter) and k not in aliases]
        transient = {n: b for n, b in model.named_buffers() if b is not None and n not in sd}
        shapes = {k: tuple(v.shape) for k, v in sd.items() if v is not None}
        return cls(params, buffers, transient, aliases, shapes)

    @property
    def expected(self) -> set[str]:
        return set(self.params) | set(self.buffers) | set(self.aliases)


def match_state(model: nn.Module, state: dict[str, Tensor], stripped: list[str] | None = None) -> Matched:
    """Split ``state`` into ``model``'s parameters and buffers (copies are not made)."""
    names = ModelNames.of(model)
    expected = names.expected
    prefix = infer_prefix(list(state), expected | set(names.transient))
    if prefix:
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    ignored = [n for n in state if n in names.transient]
    state = {k: v for k, v in state.items() if k not in names.transient}
    for alias, canonical in names.aliases.items():  # an alias saved without its parameter stands for it
        if canonical not in state and alias in state:
            state[canonical] = state[alias]
    tied = [a for a in names.aliases if a not in state]
    missing = [n for n in names.params + names.buffers if n not in state and not n.endswith(_OPTIONAL_BUFFERS)]
    unexpected = [n for n in state if n not in expected]
    mismatched = [n for n in state if n in names.shapes and tuple(state[n].shape) != names.shapes[n]]
    if missing or unexpected or mismatched:
        rows = _capped([("missing", n, _closest(n, unexpected)) for n in missing[:MAX_ROWS]], "missing", len(missing))
        rows += _capped([("unexpected", n, _closest(n, missing)) for n in unexpected[:MAX_ROWS]], "unexpected",
                        len(unexpected))
        rows += _capped([("shape", n, f"checkpoint {tuple(state[n].shape)} vs model {names.shapes[n]}")
                         for n in mismatched[:MAX_ROWS]], "shape", len(mismatched))
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected")
        if mismatched:
            parts.append(f"{len(mismatched)} shape-mismatched")
        raise KeyMismatchError(
            f"checkpoint does not fit the model ({', '.join(parts)} tensors); check --model/--model-arg or use --key",
            rows)
    params = {n: state[n] for n in names.params}
    buffers = {n: state[n] for n in names.buffers if n in state}
    model_buffers = dict(model.named_buffers())
    for n in names.buffers:
        if n not in buffers:
            buffers[n] = torch.zeros((), dtype=torch.long) if n.endswith("num_batches_tracked") else model_buffers[n]
    buffers.update(names.transient)
    return Matched(params, buffers, prefix, list(stripped or []), tied, ignored)
