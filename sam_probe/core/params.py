"""Flat views of a named parameter dict: ``w ∈ R^P  <->  {name: tensor}``.

The order of names is the order of ``model.named_parameters()``; every core
routine that works on flat vectors (Lanczos, ratios, alignment) uses this map.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor


class ParamSpace:
    """Layout of a parameter dict as one flat vector of ``P`` entries."""

    def __init__(self, params: Mapping[str, Tensor]):
        self.names: list[str] = list(params)
        self.shapes: list[torch.Size] = [params[n].shape for n in self.names]
        self.numels: list[int] = [params[n].numel() for n in self.names]
        offsets = [0]
        for k in self.numels:
            offsets.append(offsets[-1] + k)
        self.offsets = offsets
        self.size: int = offsets[-1]
        first = next(iter(params.values())) if params else torch.empty(0)
        self.dtype = first.dtype
        self.device = first.device

    def __len__(self) -> int:
        return self.size

    def slices(self) -> dict[str, slice]:
        """``{name: slice}`` of each tensor inside the flat vector."""
        return {n: slice(self.offsets[i], self.offsets[i + 1]) for i, n in enumerate(self.names)}

    def flatten(self, tensors: Mapping[str, Tensor]) -> Tensor:
        """Concatenate ``tensors`` (same names/shapes) into a flat ``[P]`` vector."""
        return torch.cat([tensors[n].reshape(-1) for n in self.names])

    def flatten_batched(self, tensors: Mapping[str, Tensor]) -> Tensor:
        """``{name: [b, *shape]}`` -> ``[b, P]``."""
        return torch.cat([tensors[n].reshape(tensors[n].shape[0], -1) for n in self.names], dim=1)

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """Flat ``[P]`` vector -> ``{name: view}`` with the parameter shapes."""
        if flat.shape[-1] != self.size:
            raise ValueError(f"expected a vector of {self.size} entries, got {tuple(flat.shape)}")
        return {
            n: flat[..., self.offsets[i]:self.offsets[i + 1]].reshape(*flat.shape[:-1], *self.shapes[i])
            for i, n in enumerate(self.names)
        }
