"""Fitting a checkpoint's tensors to a model's parameter and buffer names.

A prefix such as Lightning's ``model.`` is inferred by choosing the dotted
prefix whose removal matches the most of the model's names.  Any remaining
mismatch is an error listing missing, unexpected and shape-mismatched names,
each with the closest name on the other side.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import CheckpointError

# Buffers that may be absent from old checkpoints without changing any result.
_OPTIONAL_BUFFERS = ("num_batches_tracked",)


@dataclass
class Matched:
    """The checkpoint's tensors split into the model's parameters and buffers."""

    params: dict[str, Tensor]
    buffers: dict[str, Tensor]
    prefix: str


class KeyMismatchError(CheckpointError):
    """Names or shapes differ; :attr:`rows` is the table ``(kind, name, detail)``."""

    def __init__(self, message: str, rows: list[tuple[str, str, str]]):
        super().__init__(message)
        self.rows = rows


def infer_prefix(names: list[str], expected: set[str]) -> str:
    """The leading ``a.b.`` prefix whose removal matches the most ``expected`` names."""
    best, best_hits = "", sum(n in expected for n in names)
    candidates: set[str] = set()
    for n in names:
        parts = n.split(".")
        for i in range(1, len(parts)):
            candidates.add(".".join(parts[:i]) + ".")
    for pre in candidates:
        hits = sum(n[len(pre):] in expected for n in names if n.startswith(pre))
        if hits > best_hits:
            best, best_hits = pre, hits
    return best


def _closest(name: str, pool: list[str]) -> str:
    m = difflib.get_close_matches(name, pool, n=1, cutoff=0.4)
    return f"closest: {m[0]}" if m else ""


def match_state(model: nn.Module, state: dict[str, Tensor]) -> Matched:
    """Split ``state`` into ``model``'s parameters and buffers (copies are not made)."""
    pnames = [n for n, _ in model.named_parameters()]
    bnames = [n for n, b in model.named_buffers() if b is not None]
    expected = set(pnames) | set(bnames)
    prefix = infer_prefix(list(state), expected)
    if prefix:
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    model_shapes = {n: t.shape for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t is not None}
    missing = [n for n in pnames + bnames if n not in state and not n.endswith(_OPTIONAL_BUFFERS)]
    unexpected = [n for n in state if n not in expected]
    mismatched = [n for n in state if n in model_shapes and tuple(state[n].shape) != tuple(model_shapes[n])]
    if missing or unexpected or mismatched:
        rows = [("missing", n, _closest(n, unexpected or list(state))) for n in missing]
        rows += [("unexpected", n, _closest(n, missing or pnames)) for n in unexpected]
        rows += [("shape", n, f"checkpoint {tuple(state[n].shape)} vs model {tuple(model_shapes[n])}") for n in mismatched]
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
    params = {n: state[n] for n in pnames}
    buffers = {n: state[n] for n in bnames if n in state}
    for n in bnames:
        if n not in buffers:
            buffers[n] = torch.zeros((), dtype=torch.long) if n.endswith("num_batches_tracked") else dict(model.named_buffers())[n]
    return Matched(params, buffers, prefix)
