"""Tiny models shared by the core tests."""
from __future__ import annotations

import torch
from torch import nn


class DiagLinear(nn.Module):
    """f(x) = <u * v, x>: a depth-2 diagonal linear net (negative curvature with mse), random init."""

    def __init__(self, d: int):
        super().__init__()
        self.u = nn.Parameter(torch.randn(d))
        self.v = nn.Parameter(torch.randn(d))

    def forward(self, x):
        return (x * (self.u * self.v)).sum(-1, keepdim=True)
