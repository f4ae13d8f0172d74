"""What curvature operators and Hessian-product engines need of an objective: :class:`ObjectiveLike`.

An objective is ``L(w) = Σ_chunks Σ_terms ℓ / N``: the chunks of this rank's data, a model
call ``f(x; w)`` per chunk, a loss object that sums a chunk's terms from its outputs, and the
term count ``N`` of the whole selection.  :class:`~sam_probe.core.objective.Objective` is the one
implementation; operators and engines rely on nothing else.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import Tensor, nn

    from .losses import Loss
    from .params import ParamSpace

Chunk = tuple[Any, "Tensor | None"]


@runtime_checkable
class ObjectiveLike(Protocol):
    """The objective protocol of the curvature operators (see module docstring)."""

    model: "nn.Module"
    params: dict[str, "Tensor"]
    space: "ParamSpace"
    dtype: "torch.dtype"
    device: "torch.device"
    bn_mode: str
    loss_obj: "Loss"  # the loss object (sums, counts, output-space curvature)
    lo: int  # global index of this rank's first sample
    chunk_size: int  # samples per chunk
    vector_block: int | None  # most vectors one product pass handles
    n_grad: int
    n_hvp: int

    @property
    def denominator(self) -> float:
        """Loss terms of the whole selection (summed over ranks)."""
        ...

    @property
    def n_local(self) -> int:
        """Samples in this rank's shard."""
        ...

    def chunks(self) -> Iterator[Chunk]:
        """This rank's ``(x, y)`` chunks."""
        ...

    def mode(self) -> contextlib.AbstractContextManager:
        """The context every forward pass runs in."""
        ...

    def outputs(self, params: dict[str, "Tensor"], x: Any) -> "Tensor":
        """``f(x; w)`` of one chunk, differentiable in ``params``."""
        ...

    def loss_sum_from_outputs(self, out: "Tensor", y: "Tensor | None", x: Any = None) -> "Tensor":
        """``Σ ℓ`` of one chunk from its outputs."""
        ...

    def chunk_loss(self, params: dict[str, "Tensor"], x: Any, y: "Tensor | None") -> "Tensor":
        """``Σ ℓ`` of one chunk as a function of the parameters (model call included)."""
        ...

    def grad_flat(self, params: Any = None, count: bool = True) -> "Tensor":
        """``∇L(w)`` as a flat ``[P]`` vector (``count``: in ``n_grad``)."""
        ...

    def first_chunk(self, n: int = 2) -> Chunk:
        """The first ``n`` samples of the selection (probes)."""
        ...

    def reduce(self, t: "Tensor") -> "Tensor":
        """``t`` summed over ranks (in place; identity in one process)."""
        ...
