"""Building a model whose sizes a file chose: on the meta device first, bounded by the weights it must hold.

A ``config.json`` or a checkpoint's ``model_spec`` picks sizes (layers, widths,
labels) before any weight is compared with them.  Before such a model is built
for real it is built on the meta device (parameters and buffers get no memory)
while torch's global module/parameter/buffer registration hooks count what is
built, and the build stops as soon as it exceeds what the weights can fill:

- modules: at most ``8 x (tensors in the weights) + 256``;
- parameters registered: at most ``2 x (SIZE_SLACK x weights' entries + 2^20)``
  (tied weights register twice); the finished model then holds at most
  ``SIZE_SLACK x weights' entries + 2^20`` parameters;
- buffers: at most ``max(64 MiB, 2 x the weights' bytes)``;
- memory: where ``RLIMIT_AS`` exists, the address space may grow by at most
  ``max(2 GiB, 2 x the weights' bytes)`` during the meta build (code that
  allocates tables from config numbers on the CPU fails instead of swapping).

So the work is proportional to the weights, not to the numbers in the file.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

SIZE_SLACK = 2.0  # a model may have at most this many times the parameters its weights hold (+ 2^20)
MIN_EXTRA = 2**20
MODULES_PER_TENSOR, MIN_MODULES = 8, 256
MIN_BUFFER_BYTES = 64 * 2**20
MIN_GROWTH = 2 * 2**30
_NUMBERED = re.compile(r"\.(\d{1,9})(?=\.|$)")


@dataclass(frozen=True)
class Budget:
    """What the weights hold: entries of floating tensors, tensors, bytes, their largest dimension and the
    largest count of numbered parts (``h.0 .. h.11`` -> 12)."""

    numel: int
    tensors: int
    nbytes: int
    largest_dim: int = 0
    numbered: int = 0

    @classmethod
    def of(cls, state: dict[str, Any]) -> "Budget":
        numel = sum(t.numel() for t in state.values() if t.is_floating_point() or t.is_complex())
        nbytes = sum(t.numel() * t.element_size() for t in state.values())
        dim = max((max(t.shape, default=0) for t in state.values()), default=0)
        parts = max((int(m) + 1 for k in state for m in _NUMBERED.findall("." + k)), default=0)
        return cls(numel, len(state), nbytes, int(dim), parts)

    @classmethod
    def from_numel(cls, numel: int) -> "Budget":
        """Only a parameter count known: at most one module per parameter entry."""
        return cls(numel, max(1, numel // MODULES_PER_TENSOR), 4 * numel)

    @property
    def max_params(self) -> int:
        return int(SIZE_SLACK * self.numel) + MIN_EXTRA

    @property
    def max_modules(self) -> int:
        return MODULES_PER_TENSOR * self.tensors + MIN_MODULES

    @property
    def max_buffer_bytes(self) -> int:
        return max(MIN_BUFFER_BYTES, 2 * self.nbytes)

    @property
    def max_count(self) -> int:
        """The largest count of repeated parts (layers, heads, experts) a config may name."""
        return max(2**16, 4 * max(self.largest_dim, self.numbered, self.tensors))


class TooLarge(Exception):
    """The model being built exceeds its budget (the message says how)."""


def _address_space_cap(growth: int):
    """Lower the soft ``RLIMIT_AS`` to the current size + ``growth``; returns how to restore it (or ``None``)."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        with open("/proc/self/status") as fh:
            vm = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmSize"))
    except (ImportError, OSError, StopIteration, ValueError):
        return None
    cap = vm + growth
    if soft != resource.RLIM_INFINITY and soft <= cap:
        return None
    if hard != resource.RLIM_INFINITY and cap > hard:
        return None
    try:
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    except (ValueError, OSError):
        return None
    return lambda: resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def meta_build(build: Callable[[], Any], budget: Budget) -> tuple[int, int]:
    """Run ``build()`` on the meta device within ``budget``; ``(parameters, buffer bytes)`` of the result.

    Raises :class:`TooLarge` when it exceeds the budget (before finishing); other exceptions of ``build``
    pass through."""
    import torch
    from torch.nn.modules import module as nn_module

    seen = {"modules": 0, "params": 0, "buffers": 0}

    def on_module(_m, _name, sub):
        if sub is not None:
            seen["modules"] += 1
            if seen["modules"] > budget.max_modules:
                raise TooLarge(f"more than {budget.max_modules:,} modules for weights of {budget.tensors:,} tensors")

    def on_param(_m, _name, p):
        if p is not None:
            seen["params"] += p.numel()
            if seen["params"] > 2 * budget.max_params:
                raise TooLarge(f"more than {budget.max_params:,} parameters")

    def on_buffer(_m, _name, b):
        if b is not None:
            seen["buffers"] += b.numel() * b.element_size()
            if seen["buffers"] > 2 * budget.max_buffer_bytes:
                raise TooLarge(f"buffers of more than {budget.max_buffer_bytes:,} bytes")

    hooks = [nn_module.register_module_module_registration_hook(on_module),
             nn_module.register_module_parameter_registration_hook(on_param),
             nn_module.register_module_buffer_registration_hook(on_buffer)]
    restore = _address_space_cap(max(MIN_GROWTH, 2 * budget.nbytes))
    try:
        with torch.device("meta"):
            model = build()
        n = sum(p.numel() for p in model.parameters())
        nbuf = sum(b.numel() * b.element_size() for b in model.buffers())
        del model
    except MemoryError:
        raise TooLarge(f"more than {max(MIN_GROWTH, 2 * budget.nbytes):,} bytes of memory") from None
    finally:
        if restore is not None:
            restore()
        for h in hooks:
            h.remove()
    if n > budget.max_params:
        raise TooLarge(f"{n:,} parameters")
    if nbuf > budget.max_buffer_bytes:
        raise TooLarge(f"buffers of {nbuf:,} bytes")
    return n, nbuf
